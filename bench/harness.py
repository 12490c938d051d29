"""Shared benchmark harness: device description, peak extra memory of one call, and results rows.

Peak memory beyond the inputs:
- CUDA: torch.cuda.max_memory_allocated during the call minus what was allocated before it.
- CPU: torch has no allocator statistics there, so the call runs in a fresh spawned process that builds its
  inputs, reads its resident set size (RSS), runs the call and reads the RSS high-water mark
  (ru_maxrss); the difference is what the call added at its peak.
"""
from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import platform
import resource
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(os.environ.get("SGA_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def environment(device: str) -> dict:
    import triton

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
    }


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_peak_worker(make_case: Callable, case_args: tuple, warmup_args: tuple, queue) -> None:
    torch.set_num_threads(1)
    make_case(*warmup_args)[0]()  # first-call allocations (thread pools, kernels) are not the call's cost
    run, _ = make_case(*case_args)
    before = _current_rss_bytes()
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    queue.put(max(0, peak - before))


def peak_extra_bytes(make_case: Callable, case_args: tuple, warmup_args: tuple, device: str) -> int:
    """Peak bytes allocated by run() beyond its inputs, where make_case(*case_args) -> (run, inputs_bytes).

    make_case must be a module-level function (it is pickled into a spawned process on CPU); it is first
    run once on the small warmup_args.
    """
    if device == "cuda":
        run, _ = make_case(*case_args)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_cpu_peak_worker, args=(make_case, case_args, warmup_args, queue))
    process.start()
    result = queue.get(timeout=600)
    process.join()
    return result


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def write_rows(name: str, rows: list[dict]) -> Path:
    """Append result rows as JSON lines to bench/results/<name>.jsonl, creating the folder."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.jsonl"
    with path.open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path
