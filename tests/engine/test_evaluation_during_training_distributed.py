"""Evaluation during training with two processes (torchrun, gloo on CPU): only the main process evaluates, the
other waits; both log the same records and the same best, written once; a failed evaluation stops both."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sga.benchmarks.synthetic import write_synthetic_tofu

WORKER = Path(__file__).resolve().parents[1] / "support" / "train_eval_worker.py"


def _launch(nproc: int, out_dir: Path, tofu_dir: Path, mode: str = "ok") -> subprocess.CompletedProcess:
    out_dir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER), str(out_dir), str(tofu_dir), mode]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tofu_dir(tmp_path_factory):
    return write_synthetic_tofu(tmp_path_factory.mktemp("tofu"), 4, n_perturbed=2)


def test_two_processes_evaluate_once_on_the_main_process(tmp_path, tofu_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    for nproc, out in ((1, one), (2, two)):
        done = _launch(nproc, out, tofu_dir)
        assert done.returncode == 0, done.stderr[-4000:]
    assert (two / "evaluated-by-0.txt").read_text().split() == ["0", "2", "4"]
    assert not (two / "evaluated-by-1.txt").exists()  # process 1 only waited
    main, other = (json.loads((two / f"history-{i}.json").read_text()) for i in (0, 1))
    assert main["num_processes"] == 2 and main == other  # the same records and best on both processes
    single = json.loads((one / "history-0.json").read_text())
    evaluations = [h for h in main["history"] if h.get("event") == "eval"]
    assert [h["step"] for h in evaluations] == [0, 2, 4]
    for a, b in zip([h for h in single["history"] if h.get("event") == "eval"], evaluations):
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert b[key] == (pytest.approx(value, rel=1e-4, abs=1e-5) if isinstance(value, float) else value), (key, a, b)
    lines = [json.loads(line) for line in (two / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if l.get("event") == "eval"] == [0, 2, 4]  # each written once
    best = json.loads((two / "run" / "best" / "best.json").read_text())
    assert best["step"] == max(h["step"] for h in evaluations if h["best"])  # the last evaluation flagged best
    assert (two / "run" / "best" / "model.safetensors").is_file() and not list((two / "run").glob(".tmp-*"))


def test_a_failed_evaluation_stops_every_process(tmp_path, tofu_dir):
    began = time.monotonic()
    done = _launch(2, tmp_path / "fail", tofu_dir, "fail")
    assert done.returncode != 0
    assert "ValueError: scripted failure at step 2" in done.stderr
    # process 1 raised the broadcast error itself rather than waiting for the process group's timeout
    assert "the evaluation at step 2 failed on the main process (ValueError: scripted failure at step 2)" in done.stderr
    assert time.monotonic() - began < 240
