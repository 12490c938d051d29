"""The sga command line end to end on a tiny model saved to disk, its help and its errors."""
import argparse
import dataclasses
import json
import os
import subprocess
import time

import pytest
import yaml

from sga.benchmarks.synthetic import write_synthetic_tofu
from sga.cli import build_parser, main
from sga.config import SECTIONS
from sga.models import tiny_random_model, tiny_tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer()
    model_dir = root / "model"
    tiny_random_model("llama", tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data_dir = write_synthetic_tofu(root / "tofu", 4, n_perturbed=2)
    return root, model_dir, data_dir


def _sga(*args, cwd=None):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["sga", *map(str, args)], capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def test_unlearn_estimate_rate_and_eval_end_to_end(assets, tmp_path):
    root, model_dir, data_dir = assets
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "method": {"name": "sga", "rate": 0.25},
        "train": {"learning_rate": 1.0e-3, "batch_size": 2, "max_steps": 2},
    }))
    out = tmp_path / "out"
    done = _sga(
        "unlearn", "--config", config, "--model", model_dir, "--data-dir", data_dir, "--tofu-split", "forget10",
        "--pairing", "tfidf", "--pairing-cache-dir", tmp_path / "cache", "--output-dir", out, "--lr", "2e-3", "--backend", "torch",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["step"] == 2
    assert (out / "final" / "model.safetensors").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["learning_rate"] == 2e-3  # the flag overrides the file
    assert saved["method"]["rate"] == 0.25  # the file overrides the default
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all("normal_nll" in s for s in steps)

    done = _sga(
        "estimate-rate", "--model", out / "final", "--data-dir", data_dir, "--tofu-split", "forget10", "--pairing", "tfidf",
        "--pairing-cache-dir", tmp_path / "cache", "--K", "3", "--rate-batches", "1", "--batch-size", "2", "--output", tmp_path / "rate.json",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    estimate = json.loads(done.stdout.strip().splitlines()[-1])
    assert estimate["num_classes"] == 3 and estimate["num_forget"] == 2 and estimate["num_normal"] == 4
    assert json.loads((tmp_path / "rate.json").read_text())["rate"] == estimate["rate"]

    done = _sga(
        "eval", "--model", out / "final", "--benchmark", "tofu", "--data-dir", data_dir, "--tofu-split", "forget10",
        "--max-samples", "2", "--max-new-tokens", "4", "--output", tmp_path / "eval.json",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 <= results["forget_prob"] <= 1.0 and "model_utility" in results


def test_interrupted_unlearn_exits_130_and_resumes(assets, tmp_path):
    root, model_dir, data_dir = assets
    out = tmp_path / "out"
    common = ["--model", model_dir, "--data-dir", data_dir, "--tofu-split", "forget10", "--method", "ga", "--output-dir", out,
              "--batch-size", "2", "--backend", "torch"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(["sga", "unlearn", *map(str, common), "--max-steps", "100000"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    process.send_signal(2)  # SIGINT, as Ctrl-C
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "--resume auto" in stderr
    step = json.loads(stdout.strip().splitlines()[-1])["step"]
    done = _sga("unlearn", *common, "--max-steps", step + 1, "--resume", "auto")
    # a resumed run with another max_steps is another run: refused with a one-line error
    assert done.returncode == 2 and "other settings" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["unlearn", "--model", "m", "--lr", "fast"], "argument --lr: expected float"),
    (["unlearn", "--model", "m", "--method", "magic"], "invalid choice"),
    (["unlearn", "--model", "m", "--K", "1"], "num_classes (K) must be >= 2"),
    (["unlearn", "--dataset", "json", "--model", "m"], "forget_file is required"),
    (["unlearn", "--model", "m", "--data-dir", "/nonexistent/tofu"], "no such folder"),
    (["unlearn", "--model", "m", "--method", "ga", "--adaptive-rate-every", "3"], "adaptive_rate_every applies"),
    (["unlearn", "--config", "/nonexistent.yaml"], "config file not found"),
    (["estimate-rate", "--model", "m", "--method", "npo"], "sga or sga_gls"),
    (["eval", "--model", "m", "--benchmark", "hp"], "--book and --heldout"),
    (["eval", "--model", "m", "--benchmark", "tofu", "--batch-size", "0"], "must be positive"),
])
def test_bad_values_are_one_line_errors(capsys, args, message):
    try:
        code = main(args)
    except SystemExit as exit:  # argparse's own errors (types, choices)
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_a_bad_yaml_key_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rat: 0.1\n")
    assert main(["unlearn", "--config", str(path), "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) ['learning_rat'] in section 'train'" in err and err.count("\n") == 1


def test_every_flag_is_documented():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"unlearn", "estimate-rate", "eval", "demo", "study", "compare"}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, (name, action.option_strings)
    unlearn = subparsers.choices["unlearn"]
    flags = {s for a in unlearn._actions for s in a.option_strings}
    for section, cls in SECTIONS.items():  # every config field is a flag of `sga unlearn`
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            assert flag in flags, (section, f.name)
    done = _sga("unlearn", "--help")
    assert done.returncode == 0 and "--max-forget-nll" in done.stdout and "--lora-r" in done.stdout
