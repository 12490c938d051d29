"""The logits kernel against what users would use instead: forward, backward and forward+backward time, and
peak memory beyond the inputs.

    cd bench && python -m pytest test_bench_smoothed_ga.py --benchmark-only

On CPU "ours" is the chunked torch backend (the Triton kernel runs there only in the interpreter); on CUDA it
is the Triton kernel. The floor is one read of the logits and one write of the gradient at the copy
bandwidth measured in the same run.
"""
from __future__ import annotations

import pytest
import torch

from alternatives import LOGITS_IMPLEMENTATIONS, unavailable_reason
from conftest import DEVICE, SHAPE_SET
from harness import benchmark_order, environment, peak_extra_bytes, synchronize, time_phase, write_rows

SHAPES = {
    "cpu": [(2048, 32000, "float32"), (1024, 128256, "float32"), (2048, 32000, "bfloat16")],
    "smoke": [(32, 3000, "bfloat16")],
    # the goal's shape first: a device run cut short by its time limit still has it
    "cuda": [(16384, v, dtype) for dtype in ("bfloat16", "float32") for v in (128256, 32000, 151936, 262144)],
}
PHASES = ("forward+backward", "forward", "backward")
ROUNDS = 3 if DEVICE == "cuda" else 2


def make_case(implementation: str, num_tokens: int, vocab_size: int, dtype_name: str, device: str):
    """Fresh inputs and a forward+backward closure; returns (run, input bytes). Module level for pickling."""
    loss_fn = LOGITS_IMPLEMENTATIONS[implementation](device)
    torch.manual_seed(0)
    logits = torch.randn(num_tokens, vocab_size, device=device, dtype=getattr(torch, dtype_name))
    logits.requires_grad_(True)
    labels = torch.randint(0, vocab_size, (num_tokens,), device=device)

    def run():
        logits.grad = None
        loss_fn(logits, labels).backward()
        synchronize(device)

    return run, logits.numel() * logits.element_size()


def timed_phase(benchmark, phase: str, loss_fn, logits, labels) -> None:
    def forward():
        logits.grad = None
        loss = loss_fn(logits, labels)
        synchronize(DEVICE)
        return loss

    def backward(loss):
        loss.backward()
        synchronize(DEVICE)

    time_phase(benchmark, phase, forward, backward, ROUNDS)


# forward+backward at every shape first (the goal's shape first), torch.compile after the others (harness)
CASES = [(impl, *shape, phase) for shape, phase, impl in benchmark_order(SHAPES[SHAPE_SET], PHASES, LOGITS_IMPLEMENTATIONS)]


@pytest.mark.parametrize("implementation, num_tokens, vocab_size, dtype_name, phase", CASES)
def test_logits_loss(benchmark, floors, collect_row, implementation, num_tokens, vocab_size, dtype_name, phase):
    loss_fn = LOGITS_IMPLEMENTATIONS[implementation](DEVICE)
    if loss_fn is None:
        pytest.skip(unavailable_reason(implementation, DEVICE))
    dtype = getattr(torch, dtype_name)
    benchmark.group = f"logits {phase} N={num_tokens} V={vocab_size} {dtype_name}"
    try:
        logits = torch.randn(num_tokens, vocab_size, device=DEVICE, dtype=dtype).requires_grad_(True)
        labels = torch.randint(0, vocab_size, (num_tokens,), device=DEVICE)
        timed_phase(benchmark, phase, loss_fn, logits, labels)
    except torch.OutOfMemoryError:
        pytest.skip(f"{implementation} ran out of memory at N={num_tokens} V={vocab_size} {dtype_name}")
    finally:
        logits = labels = None
    median_s = benchmark.stats.stats.median
    traffic = num_tokens * vocab_size * 2 * dtype.itemsize  # read the logits once, write the gradient once
    row = {
        "op": "logits",
        "implementation": implementation,
        "phase": phase,
        "num_tokens": num_tokens,
        "vocab_size": vocab_size,
        "dtype": dtype_name,
        "median_ms": median_s * 1e3,
        "floor_ms": traffic / floors["copy_bytes_per_s"] * 1e3,
        "copy_GBps": floors["copy_bytes_per_s"] / 1e9,
        **environment(DEVICE),
    }
    if phase == "forward+backward":
        case = (implementation, num_tokens, vocab_size, dtype_name, DEVICE)
        extra = peak_extra_bytes(make_case, case, (implementation, 8, 1000, dtype_name, DEVICE), DEVICE)
        row["peak_extra_bytes"] = extra
        row["peak_extra_over_logits"] = extra / (num_tokens * vocab_size * dtype.itemsize)
    benchmark.extra_info.update(row)
    collect_row(row)
    write_rows("logits", [row])
