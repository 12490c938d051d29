"""Experiment tracking through accelerate's trackers (``train.report_to``) and through HFUnlearningTrainer's
``report_to``: TensorBoard's event files, read back with TensorBoard's own reader, hold every number of
metrics.jsonl."""
import importlib.util
import json

import pytest

from engine_helpers import make_config, tokenizer, unlearning_data
from sga.config import ConfigError
from sga.engine import check_run_config
from sga.engine.trainer import UnlearningTrainer, tracker_scalars
from sga.models import tiny_random_model

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
transformers = pytest.importorskip("transformers")


def _scalars(log_dir):
    """{tag: {step: value}} of every TensorBoard event file under ``log_dir``."""
    found = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        reader = event_accumulator.EventAccumulator(str(events.parent), size_guidance={event_accumulator.SCALARS: 0})
        reader.Reload()
        for tag in reader.Tags()["scalars"]:
            found.setdefault(tag, {}).update({e.step: e.value for e in reader.Scalars(tag)})
    return found


def test_tensorboard_holds_every_scalar_of_metrics_jsonl(tmp_path):
    tok = tokenizer()
    config = make_config(tmp_path, "sga", max_steps=3, report_to="tensorboard")
    config.evaluation.eval_every = 2

    def evaluator(model, tokenizer, step):
        return {"forget_quality": 0.01 * (step + 1), "model_utility": 0.5 - 0.1 * step}

    UnlearningTrainer(tiny_random_model("llama", tok), tok, unlearning_data(tok), config, evaluator=evaluator).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("event") for r in records} == {None, "eval"} and len(records) == 3 + 3  # steps 1-3; evals 0, 2, 3
    scalars = _scalars(tmp_path / "logs")
    expected = {(tag, record["step"]): value for record in records for tag, value in tracker_scalars(record).items()}
    assert {"train/forget_nll", "train/normal_nll", "train/lr", "train/rate", "eval/forget_quality"} <= set(scalars)
    for (tag, step), value in expected.items():
        assert scalars[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)
    assert sum(len(steps) for steps in scalars.values()) == len(expected)  # nothing else, nothing twice


def test_unknown_or_missing_trackers_are_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker.*tensorbaord"):
        make_config(tmp_path, "ga", report_to="tensorbaord")
    config = make_config(tmp_path, "ga", report_to="wandb")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"report_to=wandb needs the wandb package \(pip install wandb\)"):
        check_run_config(config)


def test_hf_unlearning_trainer_reports_the_objectives_numbers(tmp_path):
    from sga.engine.hf_trainer import HFUnlearningTrainer

    tok = tokenizer()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, logging_steps=1,
        report_to=["tensorboard"], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )

    def evaluator(model, tokenizer, step):
        return {"forget_quality": 0.25 * step}

    trainer = HFUnlearningTrainer(tiny_random_model("llama", tok), args, data=unlearning_data(tok), method="sga",
                                  pad_token_id=tok.pad_token_id, backend="torch", evaluator=evaluator, eval_every=1)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all("forget_nll" in h and "normal_nll" in h and h["rate"] == 0.5 for h in logged)
    scalars = _scalars(tmp_path)  # the Trainer's TensorBoard folder: output_dir/runs/<date>
    assert {"train/forget_nll", "train/normal_nll", "train/rate", "eval/forget_quality"} <= set(scalars)
    assert scalars["train/forget_nll"][1] == pytest.approx(logged[0]["forget_nll"], rel=1e-6)
    assert scalars["eval/forget_quality"][2] == pytest.approx(0.5)
