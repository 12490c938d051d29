"""The training engine under hostile conditions: non-finite losses and gradients, signals during
the final save, output folders of other runs, resumes with changed settings or data, corrupted checkpoints,
out-of-range settings, bad records and broken files."""
import json
import os
import shutil
import signal

import pytest
import torch
import yaml

from engine_helpers import (
    make_config,
    memorized_model,
    records,
    tokenizer,
    unlearning_data,
)
from sga.benchmarks.prompts import EncodedExample
from sga.config import ConfigError
from sga.data import read_records
from sga.data.pairing import pair_normal_samples
from sga.data.unlearning import UnlearningData, build_unlearning_data, data_fingerprint
from sga.engine import checkpoint
from sga.engine.trainer import UnlearningTrainer
from sga.methods import build_objective
from sga.models import tiny_random_model


def _train(config, model=None, objective=None, data=None):
    tok = tokenizer()
    model = model if model is not None else memorized_model()
    objective = objective or build_objective(config.method, backend=config.train.backend)
    data = data if data is not None else unlearning_data(tok, config.method.num_classes, normal=objective.uses_normal)
    return UnlearningTrainer(model, tok, data, config, objective=objective).train()


def _strict_lines(path):
    """metrics.jsonl parsed as strict JSON: a bare NaN / Infinity token is an error."""
    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


class _NaNGradient(torch.autograd.Function):
    """Identity forward; a NaN gradient backward (a finite loss with a non-finite gradient norm)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _SpoilAt:
    """Wraps an objective; from micro-batch ``call`` on, its loss is made ``kind``: nan (loss) or grad_nan."""

    def __init__(self, objective, call, kind):
        object.__setattr__(self, "_inner", objective)
        object.__setattr__(self, "_call", call)
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_calls", 0)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)

    def compute(self, model, batch, num_forget):
        object.__setattr__(self, "_calls", self._calls + 1)
        out = self._inner.compute(model, batch, num_forget)
        if self._calls >= self._call:
            out.loss = out.loss * float("nan") if self._kind == "nan" else _NaNGradient.apply(out.loss)
        return out


# ------------------------------------------------------------------------------------------- divergence


def test_a_nan_weight_stops_at_step_one_even_under_a_forget_nll_bound(tmp_path):
    """`NaN > bound` is False: the bound alone let a NaN model train to the end and save an all-NaN final/."""
    model = memorized_model()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    result = _train(make_config(tmp_path, "ga", max_steps=4, max_forget_nll=50.0), model=model)
    assert result.status == "diverged" and result.step == 1
    assert "non-finite" in result.reason and "loss" in result.reason
    assert result.final_model is None and not (tmp_path / "final").exists()
    assert result.checkpoint is None and checkpoint.list_checkpoints(tmp_path) == []
    (line,) = _strict_lines(tmp_path / "metrics.jsonl")
    assert line["loss"] == "NaN" and line["forget_nll"] == "NaN"


@pytest.mark.parametrize("kind, bad", [("nan", "loss"), ("grad_nan", "grad_norm")])
def test_a_non_finite_step_is_not_saved_and_the_last_good_checkpoint_stays(tmp_path, kind, bad):
    config = make_config(tmp_path, "ga", max_steps=5, save_every=1, save_total_limit=5)
    objective = _SpoilAt(build_objective(config.method, backend="torch"), call=3, kind=kind)
    result = _train(config, objective=objective)
    assert result.status == "diverged" and result.step == 3 and bad in result.reason
    assert result.final_model is None and not (tmp_path / "final").exists()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    assert result.checkpoint == checkpoint.checkpoint_root(tmp_path) / "step-00000002"
    lines = _strict_lines(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3] and lines[-1][bad] == "NaN"
    assert all(isinstance(line["grad_norm"], float) for line in lines[:2])  # logged every step, clipping or not


def test_a_finite_bound_still_saves_the_final_model(tmp_path):
    result = _train(make_config(tmp_path, "ga", max_steps=5, max_forget_nll=1.0))
    assert result.status == "diverged" and result.step == 1 and "max_forget_nll" in result.reason
    assert (result.final_model / "model.safetensors").is_file()


# --------------------------------------------------------------------------------- the final save


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_final_save_still_leaves_final(tmp_path, monkeypatch, signum):
    """The final save ran outside the interrupt guard: Ctrl-C there lost the whole run (no checkpoint)."""
    original = checkpoint.save_final_model

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_final_model", signalled)
    result = _train(make_config(tmp_path, "ga", max_steps=2))
    assert result.status == "completed" and (result.final_model / "model.safetensors").is_file()


def test_a_second_ctrl_c_during_the_final_save_leaves_a_resumable_checkpoint(tmp_path, monkeypatch):
    """KeyboardInterrupt escaped `except Exception`: nothing was saved."""
    original = checkpoint.save_final_model

    def aborted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_final_model", aborted)
    result = _train(make_config(tmp_path, "ga", max_steps=2))
    assert result.status == "interrupted" and result.step == 2
    assert result.checkpoint == checkpoint.latest_checkpoint(tmp_path)
    monkeypatch.setattr(checkpoint, "save_final_model", original)
    resumed = _train(make_config(tmp_path, "ga", max_steps=2, resume="auto"))
    assert resumed.status == "completed" and (resumed.final_model / "model.safetensors").is_file()


# ------------------------------------------------------------------- checkpoints belong to their run


def test_a_fresh_run_into_a_folder_with_another_runs_checkpoints_is_refused(tmp_path):
    _train(make_config(tmp_path, "ga", max_steps=3, save_every=1))
    with pytest.raises(checkpoint.CheckpointError, match=r"holds a finished run.*--overwrite"):
        _train(make_config(tmp_path, "ga", max_steps=2))
    result = _train(make_config(tmp_path, "ga", max_steps=2, overwrite=True))
    assert result.status == "completed" and checkpoint.list_checkpoints(tmp_path) == []
    assert [line["step"] for line in _strict_lines(tmp_path / "metrics.jsonl")] == [1, 2]  # no mix of two runs


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A 3-step sga run with checkpoints after steps 1 and 2, stopped before its final model (a run to resume)."""
    out = tmp_path_factory.mktemp("saved-run")
    _train(make_config(out, "sga", max_steps=3, save_every=1, save_total_limit=3))
    shutil.rmtree(out / "final")
    return out


@pytest.mark.parametrize("setting, value", [
    ("learning_rate", 2e-3), ("weight_decay", 0.5), ("scheduler", "cosine"), ("warmup_steps", 1),
    ("max_grad_norm", 0.5), ("max_length", 64), ("rate", 0.25), ("seed", 1), ("lora", True),
])
def test_resume_with_a_changed_setting_is_refused_naming_it(saved_run, setting, value):
    config_file = saved_run / "config.yaml"
    before = config_file.read_text() if config_file.is_file() else None
    with pytest.raises(ConfigError, match=rf"other settings \(.*{setting}: "):
        _train(make_config(saved_run, "sga", max_steps=3, resume="auto", **{setting: value}))
    assert before is not None and config_file.read_text() == before  # config.yaml never claims the refused value


def test_resume_with_other_data_of_the_same_size_is_refused(saved_run):
    tok = tokenizer()
    data = unlearning_data(tok)
    first = data.forget[0]
    changed = EncodedExample(first.input_ids[:-1] + [first.input_ids[-1] ^ 1], first.labels, first.prompt_length)
    other = UnlearningData([changed] + data.forget[1:], data.normal, data.pairs)
    assert data_fingerprint(other) != data_fingerprint(data)
    with pytest.raises(ConfigError, match=r"data\.sha256"):
        _train(make_config(saved_run, "sga", max_steps=3, resume="auto"), data=other)


def test_resume_with_another_architecture_is_a_one_line_error(saved_run):
    with pytest.raises(ConfigError, match=r"model\.identity") as info:
        _train(make_config(saved_run, "sga", max_steps=3, resume="auto"), model=tiny_random_model("qwen2", tokenizer()))
    assert "\n" not in str(info.value)


def test_allowed_changes_resume_and_update_config_yaml(saved_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    config = make_config(run, "sga", max_steps=3, resume=str(checkpoint.list_checkpoints(run)[0]), save_total_limit=5, progress=False)
    result = _train(config)
    assert result.status == "completed" and result.step == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["save_total_limit"] == 5


# ------------------------------------------------------------------------------ verified checkpoints


def _corrupt(path, offset=1000):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * 64)


@pytest.mark.parametrize("damage", ["garble_model", "delete_rng", "garble_rng", "garble_state"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_older_one(saved_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    older, latest = checkpoint.list_checkpoints(run)
    if damage == "garble_model":
        _corrupt(latest / "model.safetensors")
    elif damage == "delete_rng":
        (latest / "random_states_0.pkl").unlink()
    elif damage == "garble_rng":
        _corrupt(latest / "random_states_0.pkl", offset=10)
    else:
        (latest / checkpoint.STATE_FILE).write_text('{"step": 2, "fingerprint": {"broken"', encoding="utf-8")
    with pytest.raises(checkpoint.CheckpointError, match=str(latest)):
        checkpoint.verify_checkpoint(latest)
    checkpoint.verify_checkpoint(older)
    with pytest.warns(UserWarning, match=rf"skipping a checkpoint: .*{latest.name}.*resuming from .*{older.name}"):
        assert checkpoint.latest_verified_checkpoint(run) == older
    with pytest.raises(checkpoint.CheckpointError, match="corrupted|missing|bytes"):  # named explicitly: no fallback
        _train(make_config(run, "sga", max_steps=3, resume=str(latest)))
    with pytest.warns(UserWarning, match="skipping a checkpoint"):
        result = _train(make_config(run, "sga", max_steps=3, resume="auto"))
    assert result.status == "completed" and [h["step"] for h in result.history if "event" not in h] == [2, 3]


def test_no_verified_checkpoint_is_a_one_line_error(saved_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    for path in checkpoint.list_checkpoints(run):
        _corrupt(path / "model.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .* verifies .*--overwrite") as info:
        _train(make_config(run, "sga", max_steps=3, resume="auto"))
    assert "\n" not in str(info.value)


def test_the_manifest_lists_every_file_with_its_size_and_sha256(saved_run):
    latest = checkpoint.latest_checkpoint(saved_run)
    files = json.loads((latest / checkpoint.MANIFEST_FILE).read_text())["files"]
    assert {"model.safetensors", "random_states_0.pkl", "optimizer.bin", checkpoint.STATE_FILE, checkpoint.TENSORS_FILE} <= set(files)
    for name, entry in files.items():
        assert (latest / name).stat().st_size == entry["size"] and len(entry["sha256"]) == 64


# ---------------------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("settings, message", [
    (dict(method="sga", rate=3.0, num_classes=2), r"method.rate must be in \[-10, 2\) for sga with K=2 .*--allow-positive-forget-weight"),
    (dict(method="sga", rate=2.0, num_classes=2), r"forget weight"),  # c_f = 0: no ascent at all
    (dict(method="sga_gls", rate=1.5, num_classes=3), r"in \[-10, 1.5\) for sga_gls with K=3"),
    (dict(method="sga", rate=-1e9), r"method.rate must be in \[-10, 2\)"),
    (dict(method="sga_token", rate=-1e9), r"in \[-10, 1\]"),
    (dict(method="sga", adaptive_rate_every=2, rate_max=2.5), r"method.rate_max must be in"),
    (dict(method="ga", lora_alpha=-5.0), r"model.lora_alpha must be positive"),
    (dict(method="ga", lora_alpha=float("inf")), r"model.lora_alpha must be a finite number"),
    (dict(method="ga", weight_decay=-0.1), r"train.weight_decay must be >= 0"),
    (dict(method="ga", max_grad_norm=float("inf")), r"train.max_grad_norm must be a finite"),
    (dict(method="grad_diff", retain_weight=-1.0), r"retain_weight must be >= 0"),
    (dict(method="simnpo", gamma=float("nan")), r"method.gamma must be a finite"),
    (dict(method="ga", overwrite=True, resume="auto"), r"give one of --overwrite, --resume"),
])
def test_out_of_range_settings_are_refused(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, **settings)


def test_a_positive_forget_weight_needs_the_explicit_flag(tmp_path):
    config = make_config(tmp_path, "sga", rate=3.0, num_classes=2, allow_positive_forget_weight=True)
    assert config.method.rate == 3.0


# ----------------------------------------------------------------------------------------- records


@pytest.mark.parametrize("record, key", [
    ({"question": None, "answer": None}, "question"),
    ({"question": "Who?", "answer": 42}, "answer"),
    ({"text": None}, "text"),
    ({"question": "Who?"}, None),
])
def test_records_with_non_string_fields_name_the_file_and_index(tmp_path, record, key):
    path = tmp_path / "forget.jsonl"
    path.write_text(json.dumps({"question": "Q?", "answer": "A."}) + "\n" + json.dumps(record) + "\n")
    expected = rf"record 1 of {path}: '{key}' must be a string" if key else rf"record 1 of {path} needs"
    with pytest.raises(ValueError, match=expected):
        read_records(str(path))


def test_tofu_records_with_a_null_answer_name_the_file(tmp_path):
    from sga.benchmarks.synthetic import write_synthetic_tofu

    data_dir = write_synthetic_tofu(tmp_path / "tofu", 4, n_perturbed=2)
    path = data_dir / "forget10.json"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if not path.read_text().lstrip().startswith("[") else json.loads(path.read_text())
    rows[2]["answer"] = None
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = make_config(tmp_path, "ga", dataset="tofu", data_dir=str(data_dir), tofu_split="forget10")
    with pytest.raises(ValueError, match=rf"record 2 of {path}: 'answer' must be a string"):
        build_unlearning_data(config.data, tokenizer(), normal_per_sample=0)


@pytest.mark.parametrize("content, message", [
    (b'{"question": "Q?", "answer": "A."}\n{"question": "Q?", "ans', "is not valid JSON"),
    ('{"question": "Qü?", "answer": "A."}\n'.encode("latin-1"), "is not UTF-8 text"),
])
def test_a_broken_data_file_is_named(tmp_path, content, message):
    path = tmp_path / "forget.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{path} {message}"):
        read_records(str(path))


def test_a_broken_pairing_cache_is_named_and_recomputed(tmp_path):
    forget, retain = records()
    texts = [f"{r['question']} {r['answer']}" for r in forget], [f"{r['question']} {r['answer']}" for r in retain]
    pairs = pair_normal_samples(*texts, 2, method="tfidf", cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("*.json")
    cache_file.write_text('{"pairs": [[1], [2', encoding="utf-8")
    with pytest.warns(UserWarning, match=rf"broken pairing cache {cache_file}"):
        assert pair_normal_samples(*texts, 2, method="tfidf", cache_dir=tmp_path) == pairs
    assert json.loads(cache_file.read_text())["pairs"] == pairs  # rewritten
