"""Rank-aware data: every process draws different forget / normal samples, and together they draw exactly what one
process draws; the run states (and stores) its effective batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine_helpers import tokenizer, unlearning_data
from sga.data.unlearning import BatchSchedule

WORKER = Path(__file__).resolve().parents[1] / "support" / "data_worker.py"


@pytest.mark.parametrize("num_processes", [2, 3])
@pytest.mark.parametrize("batch_size", [3, 7])
def test_process_shares_are_disjoint_and_make_up_one_process_batch(num_processes, batch_size):
    """Over 30 micro-batches (several epochs of 10 samples): the processes' shares are disjoint slices of the sample
    stream, differ in size by at most one, and concatenated in rank order are one process's batch; the normal
    samples paired with them follow."""
    data = unlearning_data(tokenizer(), num_classes=3)
    one = BatchSchedule(len(data), batch_size, seed=4)
    many = BatchSchedule(len(data), batch_size, seed=4, num_processes=num_processes)
    for step in range(30):
        shares = [many.local_batch(step, rank) for rank in range(num_processes)]
        flat = [i for share in shares for i in share]
        assert flat == one.local_batch(step, 0) == one.global_batch(step)
        epochs = {(step * batch_size) // len(data), ((step + 1) * batch_size - 1) // len(data)}
        if len(epochs) == 1:  # a batch across an epoch boundary may hold a sample twice, with one process too
            assert len(set(flat)) == len(flat)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        normal = [[j for i in share for j in data.pairs[i]] for share in shares]
        assert [j for part in normal for j in part] == [j for i in one.global_batch(step) for j in data.pairs[i]]


def test_layout_counts_per_device_accumulation_and_processes():
    layout = BatchSchedule(10, 7, seed=0, num_processes=3).layout(grad_accum=4)
    assert layout == {
        "per_device_batch_min": 2, "per_device_batch_max": 3, "grad_accum": 4, "num_processes": 3, "effective_batch": 28,
    }


def test_two_processes_draw_disjoint_samples_whose_union_is_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "batch per optimizer step: 2-3 per device x 2 accumulation x 2 processes = 10 forget samples" in done.stdout
    draws = json.loads((tmp_path / "draws.json").read_text())["per_process"]
    first, second = draws
    assert len(first) == len(second) == 4  # 2 steps x 2 micro-batches
    data = unlearning_data(tokenizer(), num_classes=3)
    one = BatchSchedule(len(data), 5, seed=0)
    for step, (a, b) in enumerate(zip(first, second)):
        assert not set(a["forget"]) & set(b["forget"])
        assert a["forget"] + b["forget"] == one.global_batch(step)
        assert a["normal"] + b["normal"] == [j for i in one.global_batch(step) for j in data.pairs[i]]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["effective_batch"] == 10 and run["num_processes"] == 2 and run["grad_accum"] == 2
    assert "MULTI_CPU" in run["distributed_type"]
