"""Running a test worker under torchrun (CPU processes over gloo) and reading the result its process 0 writes."""
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional


def run_worker(worker: str, nproc: int, out_dir: Path, *args: str, env: Optional[dict] = None, timeout: int = 480) -> dict:
    """``torchrun --standalone --nproc_per_node NPROC tests/WORKER OUT_DIR ARGS...`` with one thread per process;
    fails the test with the workers' stderr if they fail, else returns OUT_DIR/result.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(Path(__file__).with_name(worker)), str(out_dir), *args,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out_dir / "result.json").read_text())
