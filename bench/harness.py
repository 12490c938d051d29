"""Shared benchmark harness: device description, peak extra memory of one call, and results rows.

Peak memory beyond the inputs:
- CUDA: torch.cuda.max_memory_allocated during the call minus what was allocated before it.
- CPU: torch has no allocator statistics there, so the call runs in a fresh spawned process that builds its
  inputs, resets the kernel's RSS high-water mark (writing 5 to /proc/self/clear_refs), reads its resident set
  size, runs the call and reads the high-water mark VmHWM from /proc/self/status; the difference is what the
  call added at its peak, allocator slack included. (getrusage's ru_maxrss is not used: fork and exec carry
  the parent's high-water mark into a spawned child.)
"""
from __future__ import annotations

import datetime
import gc
import json
import multiprocessing
import os
import platform
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(os.environ.get("SGA_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()} x{torch.get_num_threads()} threads"


def cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it, with family / model / stepping and its SIMD flags (numbers from
    different CPU families do not carry over: bench results say which one they came from)."""
    try:
        from sga.kernels.cpu_routes import cpu_description

        return cpu_description()
    except ImportError:
        return f"{platform.processor() or platform.machine()} CPU"


def environment(device: str) -> dict:
    import triton

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
    }


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_worker(make_case: Callable, case_args: tuple, warmup_args: tuple, queue, threads: int = 0) -> None:
    if threads:
        torch.set_num_threads(threads)  # the parent's count: the same code paths (and CPU GEMM route) as its timing
    make_case(*warmup_args)[0]()  # first-call allocations (thread pools, lazy imports) are not the call's cost
    run, _ = make_case(*case_args)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := current RSS
    before = _status_bytes("VmRSS")
    run()
    queue.put(_status_bytes("VmHWM") - before)


def warm_up_cublas() -> None:
    """One tiny GEMM, so that cuBLAS's workspace (~32 MiB, allocated at the first GEMM of a process and kept) is
    not counted in the next call's peak memory."""
    identity = torch.eye(8, device="cuda")
    (identity @ identity).sum().item()
    torch.cuda.synchronize()


def peak_extra_bytes(make_case: Callable, case_args: tuple, warmup_args: tuple, device: str) -> int:
    """Peak bytes allocated by run() beyond its inputs, where make_case(*case_args) -> (run, inputs_bytes).

    make_case must be a module-level function (it is pickled into a spawned process on CPU); it is first
    run once on the small warmup_args.
    """
    if device == "cuda":
        run, _ = make_case(*case_args)
        warm_up_cublas()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    args = (make_case, case_args, warmup_args, queue, torch.get_num_threads())
    process = context.Process(target=_cpu_peak_worker, args=args)
    process.start()
    result = queue.get(timeout=900)
    process.join()
    return result


def time_phase(benchmark, phase: str, forward: Callable, backward: Callable, rounds: int) -> None:
    """Time one phase with pytest-benchmark, after one warm-up round: "forward" times forward() -> loss,
    "backward" times backward(loss) on the loss of a fresh untimed forward(), "forward+backward" both."""
    if phase == "forward":
        benchmark.pedantic(forward, rounds=rounds, iterations=1, warmup_rounds=1)
    elif phase == "backward":
        setup = lambda: ((forward(),), {})  # noqa: E731
        benchmark.pedantic(backward, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(lambda: backward(forward()), rounds=rounds, iterations=1, warmup_rounds=1)


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


def benchmark_order(shapes, phases, implementations, last=("torch_compile",)) -> list[tuple]:
    """(shape, phase, implementation) in the order the benchmark runs them, so that a run cut short by its time
    limit has what matters most: the goal's phase (phases[0]) at every shape before any other phase, the shapes in
    their listed order (the goal's first), and in each phase the implementations in their order except those in
    ``last`` (torch.compile, whose first call compiles for tens of seconds), which follow at every shape once the
    others have run."""
    order = []
    for phase in phases:
        for group in ([i for i in implementations if i not in last], [i for i in implementations if i in last]):
            order += [(shape, phase, implementation) for shape in shapes for implementation in group]
    return order
