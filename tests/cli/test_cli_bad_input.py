"""`sga unlearn` under hostile input: each case works or stops with one line on stderr and exit
status 2 (3 for a diverged run), before the model and data are loaded where that is possible."""
import json
import shutil
import time
from unittest import mock

import pytest
import torch
import yaml

from sga.benchmarks.synthetic import write_synthetic_tofu
from sga.cli import EXIT_BAD_INPUT, EXIT_DIVERGED, main
from sga.engine import checkpoint
from sga.models import tiny_random_model, tiny_tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening-cli")
    tok = tiny_tokenizer()
    for arch in ("llama", "qwen2"):
        tiny_random_model(arch, tok).save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
    data_dir = write_synthetic_tofu(root / "tofu", 4, n_perturbed=2)
    return root, data_dir


def _args(assets, out, *extra, model="llama"):
    root, data_dir = assets
    model_path = root / model if model in ("llama", "qwen2") else model
    return [
        "unlearn", "--model", str(model_path), "--data-dir", str(data_dir), "--tofu-split", "forget10", "--pairing", "tfidf",
        "--pairing-cache-dir", str(root / "cache"), "--output-dir", str(out), "--batch-size", "2", "--max-steps", "3",
        "--lr", "1e-3", "--backend", "torch", "--no-progress", *map(str, extra),
    ]


def _run(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(capsys, argv, message):
    code, _, err = _run(capsys, argv)
    assert code == EXIT_BAD_INPUT, err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]  # not transformers' load bar
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    return lines[0]


def _no_model_load():
    return mock.patch("sga.models.load_model", side_effect=AssertionError("the model was loaded"))


# ------------------------------------------------------------------------------------------- --model


def test_model_paths_that_are_no_model_fail_in_one_line(assets, tmp_path, capsys):
    root, _ = assets
    (tmp_path / "empty").mkdir()
    cases = [
        ("/nonexistent/model-folder", "no such model folder: /nonexistent/model-folder"),
        (str(root / "llama" / "config.json"), "is a file, not a model folder"),
        (str(tmp_path / "empty"), f"folder {tmp_path / 'empty'} holds no model (no config.json)"),
    ]
    for model, message in cases:
        with _no_model_load():
            _one_line_error(capsys, _args(assets, tmp_path / "out", model=model), message)


def test_an_uncached_hub_id_offline_fails_at_once(assets, tmp_path, capsys, monkeypatch):
    """It retried the network for 51 s before a 45-79 line traceback."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    _one_line_error(capsys, _args(assets, tmp_path / "out", model="sga-tests-nobody/no-such-model"), "HF_HUB_OFFLINE is set")
    assert time.monotonic() - start < 10


def test_an_uncached_hub_id_online_is_probed_once(assets, tmp_path, capsys, monkeypatch):
    """With the hub unreachable (this machine) or reachable (no such repository): one quick request, one line."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    err = _one_line_error(capsys, _args(assets, tmp_path / "out", model="sga-tests-nobody/no-such-model"), "sga-tests-nobody/no-such-model is no local folder")
    assert "unreachable" in err or "no model on the hub" in err
    assert time.monotonic() - start < 30


# ---------------------------------------------------------------------------------------- --output-dir


def test_an_output_dir_that_is_a_file_or_unwritable_fails_before_loading(assets, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with _no_model_load():
        _one_line_error(capsys, _args(assets, a_file), f"--output-dir {a_file} is a file")
        # /proc refuses new folders even to root (a chmod-ed folder would not stop root)
        _one_line_error(capsys, _args(assets, "/proc/sga-hardening-test/out"), "is not writable")


# -------------------------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("flags, message", [
    (["--method", "sga", "--rate", "3", "--K", "2"], "the forget weight -(1 - r + r/K) must stay negative"),
    (["--method", "sga", "--rate=-1e9"], "method.rate must be in [-10, 2)"),
    (["--method", "ga", "--lora", "--lora-alpha", "-5"], "model.lora_alpha must be positive"),
    (["--method", "ga", "--max-grad-norm", "inf"], "train.max_grad_norm must be a finite number"),
])
def test_out_of_range_flags_are_one_line_errors(assets, tmp_path, capsys, flags, message):
    with _no_model_load():
        _one_line_error(capsys, _args(assets, tmp_path / "out", *flags), message)


# ------------------------------------------------------------------------------------------ divergence


def test_a_diverged_run_exits_3_and_saves_nothing_of_the_bad_step(assets, tmp_path, capsys):
    root, _ = assets
    broken = tmp_path / "nan-model"
    shutil.copytree(root / "llama", broken)
    model = tiny_random_model("llama", tiny_tokenizer())
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    model.save_pretrained(broken)
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, _args(assets, out, "--method", "ga", "--max-forget-nll", "50", model=str(broken)))
    assert code == EXIT_DIVERGED, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "diverged" and summary["step"] == 1 and summary["final_model"] is None
    assert "diverged (non-finite" in err and not (out / "final").exists()
    (line,) = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line, parse_constant=lambda token: pytest.fail(f"bare {token}"))["loss"] == "NaN"


# -------------------------------------------------------------------------- output folders and resumes


@pytest.fixture
def checkpointed(assets, tmp_path, capsys):
    """A 3-step ga run with checkpoints after steps 1 and 2, stopped before its final model (a run to resume)."""
    out = tmp_path / "run"
    code, _, err = _run(capsys, _args(assets, out, "--method", "ga", "--save-every", "1"))
    assert code == 0, err
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-00000001", "step-00000002"]
    shutil.rmtree(out / "final")
    return out


def test_a_fresh_run_into_another_runs_folder_is_refused_unless_overwritten(assets, checkpointed, capsys):
    _one_line_error(capsys, _args(assets, checkpointed, "--method", "ga"), "holds a started run")
    code, _, err = _run(capsys, _args(assets, checkpointed, "--method", "ga", "--overwrite"))
    assert code == 0, err
    assert checkpoint.list_checkpoints(checkpointed) == []
    assert [json.loads(l)["step"] for l in (checkpointed / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("flags, named, model", [
    (["--lr", "2e-3"], "train.learning_rate: 0.001 -> 0.002", "llama"),
    (["--lora"], "model.lora: False -> True", "llama"),
    ([], "model.identity", "qwen2"),
])
def test_resume_with_changed_settings_is_a_one_line_error(assets, checkpointed, capsys, flags, named, model):
    before = (checkpointed / "config.yaml").read_text()
    argv = _args(assets, checkpointed, "--method", "ga", "--resume", "auto", *flags, model=model)
    with mock.patch("sga.engine.checkpoint.load_checkpoint", side_effect=AssertionError("a state was loaded")):
        _one_line_error(capsys, argv, named)
    assert (checkpointed / "config.yaml").read_text() == before
    assert yaml.safe_load(before)["train"]["learning_rate"] == 1e-3


def test_a_corrupt_latest_checkpoint_falls_back_to_the_older_one(assets, checkpointed, capsys):
    latest = checkpoint.latest_checkpoint(checkpointed)
    with open(latest / "model.safetensors", "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\xff" * 64)
    with pytest.warns(UserWarning, match=f"skipping a checkpoint: checkpoint file {latest / 'model.safetensors'} is corrupted"):
        code, stdout, err = _run(capsys, _args(assets, checkpointed, "--method", "ga", "--resume", "auto"))
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == "completed"
    steps = [json.loads(l)["step"] for l in (checkpointed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # resumed after step 1: steps 2 and 3 rerun, each logged once


def test_a_broken_trainer_state_is_named(assets, checkpointed, capsys):
    for path in checkpoint.list_checkpoints(checkpointed):
        (path / checkpoint.STATE_FILE).write_text("{", encoding="utf-8")
    _one_line_error(capsys, _args(assets, checkpointed, "--method", "ga", "--resume", "auto"), f"{checkpoint.STATE_FILE}")


# ------------------------------------------------------------------------------------------------- data


def test_a_truncated_data_file_is_named(assets, tmp_path, capsys):
    forget = tmp_path / "forget.jsonl"
    forget.write_text('{"question": "Who?", "answer": "Me."}\n{"question": "Wh')
    argv = _args(assets, tmp_path / "out", "--method", "ga", "--dataset", "json", "--forget-file", forget)
    with _no_model_load():  # local data files are read before the model is loaded
        _one_line_error(capsys, argv, f"{forget} is not valid JSON")


def test_a_null_answer_is_refused_naming_the_record(assets, tmp_path, capsys):
    forget = tmp_path / "forget.jsonl"
    forget.write_text('{"question": "Who?", "answer": "Me."}\n{"question": null, "answer": null}\n')
    argv = _args(assets, tmp_path / "out", "--method", "ga", "--dataset", "json", "--forget-file", forget)
    with _no_model_load():
        _one_line_error(capsys, argv, f"record 1 of {forget}: 'question' must be a string, got None")
