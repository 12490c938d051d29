"""``sga demo`` end to end at the --quick size (tiny random Llama), its outputs, and its one-line errors."""
import dataclasses
import json
import math
from pathlib import Path

import pytest

from sga import models
from sga.cli import main
from sga.experiments import demo
from tofu_data import TOFU_DIR

REPORT_KEYS = {"model", "data", "protocol", "torch_threads", "methods", "table", "results", "trajectories", "training", "plot", "timings_s", "total_s"}


def _run(capsys, *args):
    status = main(["demo", "--quick", "--threads", "1", *map(str, args)])
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    return captured.out


def _check_outputs(out: Path, printed: str) -> dict:
    report = json.loads((out / demo.REPORT_FILE).read_text())
    assert REPORT_KEYS <= set(report)
    assert report["model"]["kind"] == "tiny"
    assert report["protocol"] == json.loads(json.dumps({"name": "quick", **dataclasses.asdict(demo.QUICK)}))
    labels = [demo.method_label(m, demo.QUICK) for m in demo.QUICK.methods]
    assert report["methods"] == labels
    assert list(report["results"]) == [demo.BASE, demo.FINETUNED] + labels
    assert list(report["training"]) == [demo.FINETUNED] + labels
    # the printed table is the saved one, with a row per model
    assert report["table"] in printed
    rows = report["table"].splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == [demo.BASE, demo.FINETUNED] + labels
    for name, results in report["results"].items():
        for key, _ in demo.COLUMNS:
            assert 0.0 <= results[key] <= 1.0, (name, key, results[key])
            assert f"{results[key]:.3f}" in rows[list(report["results"]).index(name)]
        assert results["settings"]["n_questions"]["forget"] == demo.QUICK.eval_samples
    for name, summary in report["training"].items():
        assert summary["status"] == "completed" and summary["steps"] >= 1 and math.isfinite(summary["last_nll"]), name
    # fine-tuning descends, every unlearning method ascends on the forget answers
    assert report["training"][demo.FINETUNED]["last_nll"] < report["training"][demo.FINETUNED]["first_nll"]
    # a trajectory per method: the fine-tuned model (epoch 0), then one evaluation per epoch; the last is the table's row
    assert list(report["trajectories"]) == labels
    for label in labels:
        points = report["trajectories"][label]
        assert [p["epoch"] for p in points] == list(range(demo.QUICK.unlearn_epochs + 1)), label
        assert points[-1]["step"] == report["training"][label]["steps"]
        assert all(points[0][key] == report["results"][demo.FINETUNED][key] for key in demo.TRAJECTORY_KEYS)
        assert all(points[-1][key] == report["results"][label][key] for key in demo.TRAJECTORY_KEYS)
    for label in labels:
        assert report["training"][label]["last_nll"] > report["training"][label]["first_nll"], label
    # one timing per phase, each printed, and a total that covers them
    phases = report["timings_s"]
    assert {"load model", f"evaluate {demo.BASE}", "fine-tune (sft)", f"evaluate {demo.FINETUNED}"} <= set(phases)
    for method in demo.QUICK.methods:
        assert {f"unlearn {method}", f"evaluate {method} (every epoch)"} <= set(phases)
    assert sum(phases.values()) <= report["total_s"] + 0.1
    assert all(name in printed for name in phases) and "total" in printed
    png = out / report["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # run logs and configs stay, model weights are deleted once evaluated
    for method in ("sft",) + demo.QUICK.methods:
        assert (out / "runs" / method / "metrics.jsonl").is_file() and (out / "runs" / method / "config.yaml").is_file()
        assert not (out / "runs" / method / "final").exists()
    return report


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    printed = _run(capsys, "--out", out)
    report = _check_outputs(out, printed)
    assert report["total_s"] < 60
    assert report["data"]["source"].startswith("synthetic")
    n_forget, n_retain = report["data"]["forget_records"], report["data"]["retain_records"]
    assert n_forget == 10 and n_retain == demo.QUICK.retain_records  # one fictitious author; the first retain records
    finetune = (out / "train" / "finetune.json").read_text().splitlines()
    assert len(finetune) == n_forget + n_retain
    assert report["training"][demo.FINETUNED]["samples"] == n_forget + n_retain
    assert all(summary["samples"] == n_forget for name, summary in report["training"].items() if name != demo.FINETUNED)


@pytest.mark.skipif(not TOFU_DIR.is_dir(), reason="real TOFU files not present beside the checkout")
def test_quick_demo_on_real_tofu_files(tmp_path, capsys):
    out = tmp_path / "demo"
    report = _check_outputs(out, _run(capsys, "--out", out, "--data", TOFU_DIR))
    assert report["data"]["forget_records"] == 40 and report["data"]["source"].startswith("TOFU")
    assert not (out / "data").exists()  # the TOFU folder is read in place


def test_protocol_choice():
    assert demo.choose_protocol(pretrained=False, real_tofu=True) == "quick"
    assert demo.choose_protocol(pretrained=True, real_tofu=False) == "full"
    assert demo.choose_protocol(pretrained=True, real_tofu=True) == "tofu"
    # one protocol for every unlearning method of a run, GA and SGA among them, over several epochs (trajectories)
    for protocol in demo.PROTOCOLS.values():
        assert {"ga", "sga"} <= set(protocol.methods) and protocol.unlearn_epochs >= 2


def test_auto_model_falls_back_to_the_tiny_model(monkeypatch, capsys):
    monkeypatch.setattr(models, "_smollm2_installed", lambda: False)
    monkeypatch.setattr(models, "_hub_snapshot", lambda: None)
    monkeypatch.setattr(models, "_hub_reachable", lambda: False)
    loaded = models.load_model_choice("auto")
    assert loaded.kind == "tiny" and not loaded.pretrained
    assert "tiny random model" in capsys.readouterr().out


def test_hub_check_respects_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models._hub_reachable() is False


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope"], "--model must be one of auto, smollm2, hub, tiny or a model folder"),
        (["--model", "EMPTY"], "has no config.json: not a Hugging Face model folder"),
        (["--quick", "--model", "smollm2"], "--quick runs the tiny random model"),
        (["--data", "/no/such/folder"], "--data: no such folder"),
        (["--data", "EMPTY"], "is not a TOFU folder: it lacks forget01.json"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--out", "FILE"], "exists and is not a folder"),
    ],
)
def test_bad_options_give_one_line_errors(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    args = [{"EMPTY": tmp_path / "empty", "FILE": tmp_path / "file"}.get(a, a) for a in args]
    assert main(["demo", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sga demo: error: ") and message in err and err.count("\n") == 1


def test_bad_flag_values_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--seed", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "sga demo: error: argument --seed" in err and err.count("\n") == 1
