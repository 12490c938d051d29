"""Two processes (torchrun, gloo on CPU) give the same run as one process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parents[1] / "support" / "distributed_worker.py"


def _launch(nproc: int, out_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER), str(out_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out_dir / "result.json").read_text())


def test_two_processes_match_one(tmp_path):
    one = _launch(1, tmp_path / "one")
    two = _launch(2, tmp_path / "two")
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert "MULTI_CPU" in two["distributed_type"]
    assert one["status"] == two["status"] == "completed"
    steps_one = [h for h in one["history"] if "loss" in h]
    steps_two = [h for h in two["history"] if "loss" in h]
    assert len(steps_one) == len(steps_two) == 4
    worst = 0.0
    for a, b in zip(one["history"], two["history"]):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                worst = max(worst, abs(a[key] - b[key]) / max(1.0, abs(a[key])))
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
    for name, p in one["params"].items():
        q = two["params"][name]
        assert q["sum"] == pytest.approx(p["sum"], rel=1e-4, abs=1e-4), name
        assert q["head"] == pytest.approx(p["head"], rel=1e-4, abs=1e-5), name
    print(f"largest relative difference of the logged values, 1 vs 2 processes: {worst:.3g}")
