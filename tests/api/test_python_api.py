"""The short Python API: ``sga.unlearn`` and ``sga.evaluate``, over the config objects of the command line."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

import sga
from engine_helpers import records, tokenizer
from sga.benchmarks.synthetic import write_synthetic_tofu
from sga.cli import main
from sga.models import tiny_random_model


def test_unlearn_returns_the_trained_model_and_its_history(tmp_path):
    tok = tokenizer()
    model = tiny_random_model("llama", tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forget, retain = records()
    result = sga.unlearn(model, tok, forget=forget, retain=retain, method="sga", rate=0.8, num_classes=3,
                         learning_rate=1e-3, max_steps=2, train__batch_size=4, output_dir=str(tmp_path / "run"),
                         backend="torch", pairing="tfidf", progress=False)
    assert result.result.status == "completed" and result.model is model  # trained in place
    assert [r["step"] for r in result.history] == [1, 2] and all("normal_nll" in r for r in result.history)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["method"]["name"], saved["method"]["rate"], saved["method"]["num_classes"]) == ("sga", 0.8, 3)
    lines = (tmp_path / "run" / "data" / "forget.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == forget


def test_the_saved_config_repeats_the_run_from_the_command_line(tmp_path, capsys):
    tok = tokenizer()
    forget, _ = records()
    common = dict(learning_rate=1e-3, max_steps=2, train__batch_size=4, backend="torch", progress=False)
    first = sga.unlearn(tiny_random_model("llama", tok), tok, forget=forget, method="ga", output_dir=str(tmp_path / "a"), **common)
    # the config names the model "(in-memory model)": give the same tiny model by its shortcut
    assert main(["unlearn", "--config", str(tmp_path / "a" / "config.yaml"), "--model", "tiny", "--output-dir", str(tmp_path / "b")]) == 0
    again = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["forget_nll"] for r in again] == pytest.approx([r["forget_nll"] for r in first.history], rel=1e-5)


def test_bad_options_fail_before_any_work(tmp_path):
    tok = tokenizer()
    forget, _ = records()
    model = tiny_random_model("llama", tok)
    with pytest.raises(TypeError, match="unknown option 'learning_rat'"):
        sga.unlearn(model, tok, forget=forget, learning_rat=1e-3, output_dir=str(tmp_path / "x"))
    with pytest.raises(TypeError, match="option 'batch_size' is a field of several sections: write one of train__batch_size, evaluation__batch_size"):
        sga.unlearn(model, tok, forget=forget, batch_size=2, output_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="method sga needs normal \\(retain\\) data"):
        sga.unlearn(model, tok, forget=forget, method="sga", output_dir=str(tmp_path / "y"), backend="torch")
    with pytest.raises(ValueError, match="record 0 of forget"):
        sga.unlearn(model, tok, forget=[{"question": None}], output_dir=str(tmp_path / "z"))


def test_evaluate_runs_the_benchmark(tmp_path):
    tok = tokenizer()
    data_dir = write_synthetic_tofu(tmp_path / "tofu", 4, n_perturbed=2)
    results = sga.evaluate(tiny_random_model("llama", tok), tok, benchmark="tofu", data_dir=data_dir, split="forget10",
                           max_samples=2, max_new_tokens=4, membership_inference=False)
    assert 0.0 <= results["model_utility"] and "forget_rouge" in results


def test_import_sga_kernels_loads_no_engine_dependency():
    code = "import sys, sga.kernels; print(sorted(m for m in ('transformers', 'accelerate', 'sga.api') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
