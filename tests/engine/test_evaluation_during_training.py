"""Evaluation during training (sga.engine.evaluation): the schedule, the best-model criterion on scripted metric
sequences, best/ and best.json, resume after an interrupt or a crash, the real TOFU and MUSE benchmarks on a
tiny model, the CLI flags and their validation."""
import dataclasses
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from engine_helpers import make_config, memorized_model, tokenizer, unlearning_data
from sga.benchmarks.report import save_results
from sga.benchmarks.synthetic import write_synthetic_tofu
from sga.benchmarks.tofu import evaluate_tofu
from sga.cli import EXIT_BAD_INPUT, main
from sga.config import ConfigError, EvaluationConfig
from sga.engine import checkpoint
from sga.engine.evaluation import TrainerCallback, TrainingEvaluation, read_best
from sga.engine.trainer import (
    UnlearningTrainer,  # (forget_quality, model_utility) per step; step 0 is the baseline (utility 1.0)
)
from sga.models import tiny_random_model

SCRIPT = {0: (0.0, 1.0), 1: (0.1, 0.9), 2: (0.4, 0.7), 3: (0.9, 0.3), 4: (0.4, 0.8), 5: (0.6, 0.55), 6: (0.2, 0.9)}


def scripted(step_values):
    """An evaluator returning the scripted metrics of each step (any model)."""

    def evaluator(model, tok, step):
        quality, utility = step_values[step]
        return {"forget_quality": quality, "model_utility": utility, "forget_rouge": 1.0 - quality, "per_item": {"ignored": [1]}}

    return evaluator


class Snapshots(TrainerCallback):
    """Keeps the weights after every step and every evaluation record."""

    def __init__(self):
        self.weights, self.evaluations = {}, []

    def on_step_end(self, trainer, step, record):
        assert record["step"] == step and "loss" in record
        self.weights[step] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    def on_evaluate(self, trainer, step, record):
        self.evaluations.append(record)


class InterruptAfter(TrainerCallback):
    """Sends SIGINT after step ``step``, as Ctrl-C would: the next step is the interrupted one."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, record):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def _config(out, **settings):
    """Scripted runs: 6 steps, evaluated after each; a stand-in retain log (the validation asks for one
    before forget quality can be a criterion, the scripted evaluator does not read it). ``settings``: fields
    of the evaluation section or of make_config's."""
    reference = Path(out).parent / "retain-log.json"
    save_results({"settings": {"benchmark": "tofu", "forget_split": "forget01"}, "forget_truth_ratios": [0.5]}, reference)
    evaluation = {"eval_every": 1, "retain_reference": str(reference)}
    evaluation.update({k: settings.pop(k) for k in list(settings) if k in {f.name for f in dataclasses.fields(EvaluationConfig)}})
    config = make_config(out, "ga", **{"max_steps": 6, "batch_size": 2, **settings})
    for key, value in evaluation.items():
        setattr(config.evaluation, key, value)
    return config.validate()


def _train(config, evaluator=None, callbacks=(), model=None):
    tok = tokenizer()
    model = model if model is not None else memorized_model()
    data = unlearning_data(tok, normal=False)
    trainer = UnlearningTrainer(model, tok, data, config, callbacks=callbacks, evaluator=evaluator)
    return model, trainer.train()


def _eval_lines(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line.get("event") == "eval"]


def test_the_criterion_picks_the_highest_forget_quality_above_the_utility_floor(tmp_path):
    snapshots = Snapshots()
    config = _config(tmp_path, best_metric="forget_quality", utility_floor=0.5)
    _, result = _train(config, scripted(SCRIPT), [snapshots])
    assert result.status == "completed" and result.best_model == tmp_path / "best"
    # step 3 has the highest forget quality but utility 0.3 < 0.5 x 1.0; step 4 ties step 2 (the earlier stays)
    # until step 5 beats both
    assert [r["best"] for r in snapshots.evaluations] == [False, True, True, False, False, True, False]
    best = read_best(tmp_path)
    assert best["step"] == 5 and best["value"] == 0.6 and best["score"] == 0.6 and best["baseline_utility"] == 1.0
    assert best["metrics"]["model_utility"] == 0.55 and "per_item" not in best["metrics"]
    saved = load_file(str(tmp_path / "best" / "model.safetensors"))
    for name, value in snapshots.weights[5].items():
        assert torch.equal(saved[name], value), name
    # every file of best/ is in its manifest, with its size and SHA-256
    manifest = json.loads((tmp_path / "best" / "manifest.json").read_text())["files"]
    assert {"best.json", "model.safetensors", "config.json"} <= set(manifest)
    assert manifest["model.safetensors"]["size"] == (tmp_path / "best" / "model.safetensors").stat().st_size
    # metrics.jsonl: each evaluation right after its step's record, strict JSON
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(l["step"], l.get("event")) for l in lines] == [(0, "eval")] + [(s, e) for s in range(1, 7) for e in (None, "eval")]
    assert [l["model_utility"] for l in _eval_lines(tmp_path)] == [SCRIPT[s][1] for s in range(7)]
    assert result.history == lines


@pytest.mark.parametrize("metric, values, expected", [
    ("forget_quality", [0.2, 0.5, 0.5, 0.1], 2),  # max; the earliest of a tie
    ("forget_rouge", [0.2, 0.5, 0.05, 0.05], 3),  # min
    ("privleak", [-30.0, 12.0, -4.0, 4.0], 3),  # closest to 0
    ("forget_quality", [float("nan"), None, 0.1, float("inf")], 3),  # NaN, None and inf are never eligible
])
def test_goals_and_ties_on_scripted_sequences(metric, values, expected):
    from accelerate.utils import DistributedType

    config = make_config("unused")
    config.evaluation.eval_every, config.evaluation.best_metric = 1, metric
    evaluation = TrainingEvaluation(config, SimpleNamespace(distributed_type=DistributedType.NO), scripted(SCRIPT))
    for step, value in enumerate(values, start=1):
        evaluation.observe(step, {metric: value, "model_utility": 1.0})
    assert evaluation.best["step"] == expected


def test_forget_rouge_is_minimized(tmp_path):
    _, result = _train(_config(tmp_path, best_metric="forget_rouge"), scripted(SCRIPT))
    assert read_best(tmp_path)["step"] == 3 and read_best(tmp_path)["score"] == pytest.approx(-0.1)


def test_an_interrupted_run_resumes_with_the_same_best(tmp_path):
    """The best (step 2) is found before the interrupt (at step 3); every later evaluation scores lower than it
    but higher than the earlier ones, so a resumed run that forgot the best would keep step 4 or 5 instead."""
    script = {0: (0.0, 1.0), 1: (0.1, 1.0), 2: (0.9, 1.0), 3: (0.2, 1.0), 4: (0.5, 1.0), 5: (0.6, 1.0), 6: (0.3, 1.0)}
    full_model, full = _train(_config(tmp_path / "full", best_metric="forget_quality"), scripted(script))
    cut_dir = tmp_path / "cut"
    _, cut = _train(_config(cut_dir, best_metric="forget_quality"), scripted(script), [InterruptAfter(2)])
    assert cut.status == "interrupted" and cut.step == 3 and read_best(cut_dir)["step"] == 2
    state = checkpoint.read_state(cut.checkpoint)
    assert state["evaluation"]["best"]["step"] == 2 and state["evaluation"]["baseline_utility"] == 1.0

    resumed_model, resumed = _train(_config(cut_dir, best_metric="forget_quality", resume="auto"), scripted(script))
    assert resumed.status == "completed" and resumed.best_model == cut_dir / "best"
    assert [h["step"] for h in resumed.history if h.get("event") == "eval"] == [4, 5, 6]  # step 0 is not redone
    assert read_best(cut_dir) == read_best(tmp_path / "full")
    for name, value in load_file(str(tmp_path / "full" / "best" / "model.safetensors")).items():
        assert torch.equal(load_file(str(cut_dir / "best" / "model.safetensors"))[name], value), name
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time_s", "eval_s")} for r in rows]
    assert strip(_eval_lines(cut_dir)) == strip(_eval_lines(tmp_path / "full"))
    for (name, p), (_, q) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(p, q), name


def test_a_crash_after_a_best_beyond_the_last_checkpoint_keeps_that_best(tmp_path):
    """Checkpoints at steps 2 and 4, the best at step 5, the evaluation of step 6 crashes: the resumed run
    (from step 4) starts from best/ of step 5, and ends as the run that never crashed."""
    script = {0: (0.0, 1.0), 1: (0.1, 1.0), 2: (0.2, 1.0), 3: (0.3, 1.0), 4: (0.1, 1.0), 5: (0.8, 1.0), 6: (0.4, 1.0)}

    def crashing(model, tok, step):
        if step == 6:
            raise RuntimeError("evaluation crashed")
        return scripted(script)(model, tok, step)

    config = _config(tmp_path, best_metric="forget_quality", save_every=2)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        _train(config, crashing)
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000004" and read_best(tmp_path)["step"] == 5
    _, resumed = _train(_config(tmp_path, best_metric="forget_quality", save_every=2, resume="auto"), scripted(script))
    assert resumed.status == "completed" and read_best(tmp_path)["step"] == 5
    assert [(r["step"], r["best"]) for r in resumed.history if r.get("event")] == [(5, True), (6, False)]


def test_a_resume_with_another_criterion_is_refused(tmp_path):
    _train(_config(tmp_path, best_metric="forget_quality"), scripted(SCRIPT), [InterruptAfter(1)])
    with pytest.raises(ConfigError, match=r"scored with other settings \(best_metric: 'forget_quality' -> 'model_utility'"):
        _train(_config(tmp_path, best_metric="model_utility", resume="auto"), scripted(SCRIPT))


def test_a_fresh_run_drops_a_previous_runs_best(tmp_path):
    _train(_config(tmp_path, best_metric="forget_quality"), scripted(SCRIPT))
    assert (tmp_path / "best").is_dir()
    config = _config(tmp_path, best_metric="forget_quality")
    config.evaluation.eval_every = 0
    config.evaluation.best_metric = None
    config.train.overwrite = True  # a fresh run into the finished run's folder
    _, result = _train(config.validate())
    assert result.best_model is None and not (tmp_path / "best").exists()


def test_sharded_training_is_refused(tmp_path):
    from accelerate.utils import DistributedType

    with pytest.raises(ConfigError, match="main process alone.*not FSDP / DeepSpeed"):
        TrainingEvaluation(_config(tmp_path / "run"), SimpleNamespace(distributed_type=DistributedType.FSDP))


# ---------------------------------------------------------------------------------- the real benchmarks


@pytest.fixture(scope="module")
def tofu_assets(tmp_path_factory):
    """A synthetic TOFU folder, a tiny model saved to disk, and a retain model's log (another random model)."""
    root = tmp_path_factory.mktemp("tofu")
    tok = tokenizer()
    data_dir = write_synthetic_tofu(root / "tofu", 4, n_perturbed=2)
    model_dir = root / "model"
    memorized_model().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    retain = evaluate_tofu(tiny_random_model("llama", tok, seed=1), tok, data_dir, "forget10", max_samples=3, max_new_tokens=4)
    return data_dir, model_dir, save_results(retain, root / "retain.json")


def _unlearn(tofu_assets, out, *flags):
    data_dir, model_dir, _ = tofu_assets
    return main([
        "unlearn", "--model", str(model_dir), "--data-dir", str(data_dir), "--tofu-split", "forget10", "--method", "ga",
        "--batch-size", "2", "--max-steps", "3", "--lr", "1e-3", "--backend", "torch", "--no-progress",
        "--output-dir", str(out), *flags,
    ])


def test_tofu_during_training_from_the_cli(tofu_assets, tmp_path, capsys):
    """Forget quality against the retain model's log and model utility (0 here: the tiny model knows no real author)
    at steps 0, 2 and 3 (the last); best/
    under forget quality with a utility floor; the same weights as a run without evaluation."""
    _, _, reference = tofu_assets
    flags = ("--eval-every", "2", "--eval-max-samples", "3", "--eval-max-new-tokens", "4", "--eval-batch-size", "4",
             "--eval-retain-reference", str(reference), "--best-metric", "forget_quality", "--utility-floor", "0.2")
    assert _unlearn(tofu_assets, tmp_path / "eval", *flags) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = _eval_lines(tmp_path / "eval")
    assert [r["step"] for r in records] == [0, 2, 3]
    for r in records:
        assert r["benchmark"] == "tofu" and 0.0 <= r["forget_quality"] <= 1.0 and 0.0 <= r["model_utility"] <= 1.0
        assert {"forget_rouge", "retain_prob", "extraction_strength"} <= set(r) and "forget_truth_ratios" not in r
    # the rule, recomputed from the log
    eligible = [r for r in records[1:] if r["model_utility"] >= 0.2 * records[0]["model_utility"]]
    expected = max(eligible, key=lambda r: (r["forget_quality"], -r["step"])) if eligible else None
    best = read_best(tmp_path / "eval")
    if expected is None:
        assert best is None and summary["best_model"] is None
    else:
        assert best["step"] == expected["step"] and best["value"] == expected["forget_quality"]
        assert summary["best_model"] == str(tmp_path / "eval" / "best")
        from sga.models import load_model

        loaded, _ = load_model(tmp_path / "eval" / "best")  # a model folder like final/
        assert loaded.config.model_type == "llama"
    assert [r["best"] for r in records] == [False] + [r is expected for r in records[1:]]

    assert _unlearn(tofu_assets, tmp_path / "plain") == 0
    plain = load_file(str(tmp_path / "plain" / "final" / "model.safetensors"))
    evaluated = load_file(str(tmp_path / "eval" / "final" / "model.safetensors"))
    for name, value in plain.items():
        assert torch.equal(evaluated[name], value), name  # evaluation leaves the trajectory alone


def test_evaluation_leaves_a_dropout_models_trajectory_alone(tofu_assets, tmp_path):
    """GPT-2 trains with dropout on (its RNG stream and train mode matter): the same weights with TOFU
    evaluations after steps 0, 1 and 2 as without."""
    data_dir, _, _ = tofu_assets
    weights = []
    for eval_every in (0, 1):
        config = make_config(tmp_path / f"every{eval_every}", "ga", max_steps=2, batch_size=2)
        config.evaluation.eval_every, config.evaluation.data_dir = eval_every, str(data_dir)
        config.evaluation.tofu_split, config.evaluation.max_samples, config.evaluation.max_new_tokens = "forget10", 2, 4
        model, result = _train(config.validate(), model=tiny_random_model("gpt2", tokenizer(), seed=0))
        assert model.training and len([h for h in result.history if h.get("event")]) == 3 * eval_every
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for name, value in weights[0].items():
        assert torch.equal(weights[1][name], value), name


def test_muse_during_training(tmp_path):
    from muse_data import write_muse

    muse_dir = write_muse(tmp_path)
    config = make_config(tmp_path / "run", "ga", max_steps=2, batch_size=2)
    config.evaluation.eval_every, config.evaluation.benchmark, config.evaluation.data_dir = 1, "muse", str(muse_dir)
    config.evaluation.max_new_tokens, config.evaluation.best_metric = 4, "knowmem_r"
    _, result = _train(config.validate())
    records = [h for h in result.history if h.get("event") == "eval"]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all({"verbmem_f", "knowmem_f", "knowmem_r", "extraction_strength"} <= set(r) and r["benchmark"] == "muse" for r in records)
    assert read_best(tmp_path / "run")["step"] in (1, 2)


@pytest.mark.parametrize("flags, message", [
    (("--eval-every", "-1"), r"evaluation.eval_every must be >= 0"),
    (("--eval-every", "2", "--best-metric", "forget_qualty"), r"'forget_qualty' is not a tofu metric; choose from forget_quality"),
    (("--best-metric", "model_utility"), r"need evaluation.eval_every > 0 \(--eval-every N\)"),
    (("--eval-every", "2", "--best-metric", "forget_quality"), r"forget_quality needs a retain model's TOFU log: --eval-retain-reference"),
    (("--eval-every", "2", "--utility-floor", "0.9"), r"utility_floor constrains the best model: give evaluation.best_metric"),
    (("--eval-every", "2", "--best-metric", "model_utility", "--utility-floor", "90"), r"must be in \(0, 1\], got 90.0"),
    (("--eval-every", "2", "--best-metric", "model_utility", "--utility-floor", "0.9", "--no-eval-at-start"), r"turn evaluation.eval_at_start back on"),
    (("--eval-every", "2", "--best-metric", "privleak"), r"membership-inference metric: turn on evaluation.mia \(--eval-mia\)"),
    (("--eval-every", "2", "--eval-mia"), r"lacks holdout10.json"),
    (("--eval-every", "2", "--eval-retain-reference", "REFERENCE", "--eval-max-samples", "2"), r"3 truth ratios for 2 forget questions"),
    (("--eval-every", "2", "--eval-retain-reference", "REFERENCE", "--eval-tofu-split", "forget05"), r"is of forget10, the evaluation of forget05"),
    (("--eval-every", "2", "--eval-retain-reference", "missing.json"), r"evaluation.retain_reference: no such file"),
])
def test_bad_evaluation_settings_are_one_line_errors_before_any_work(tofu_assets, tmp_path, capsys, flags, message):
    _, _, reference = tofu_assets
    flags = [str(reference) if f == "REFERENCE" else f for f in flags]
    assert _unlearn(tofu_assets, tmp_path / "out", *flags) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sga unlearn: error: ")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
