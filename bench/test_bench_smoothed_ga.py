"""smoothed_ga_loss forward+backward against what users would write instead, time and peak extra memory.

    pytest bench/test_bench_smoothed_ga.py --benchmark-only

Alternatives: torch eager (upcast the logits to float32, F.cross_entropy with label smoothing, sign
applied) and torch.compile of the same. On CPU ours is the chunked torch backend (the Triton kernel runs
there only in the interpreter); on CUDA it is the Triton kernel.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness import environment, peak_extra_bytes, synchronize, write_rows
from sga.kernels import smoothed_ga_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {"cpu": [(2048, 32000, "float32")], "cuda": [(16384, 128256, "bfloat16"), (16384, 128256, "float32")]}
SMOOTHING = 0.1
IMPLEMENTATIONS = ("ours", "torch_eager", "torch_compile")


def eager_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The usual way: float32 logits, label-smoothed cross-entropy, the ascent sign applied."""
    return -F.cross_entropy(logits.float(), labels, label_smoothing=SMOOTHING)


_compiled_eager = torch.compile(eager_loss)


def make_case(implementation: str, num_tokens: int, vocab_size: int, dtype_name: str, device: str):
    """Inputs and a fwd+bwd closure for one implementation; returns (run, input bytes)."""
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    logits = torch.randn(num_tokens, vocab_size, device=device, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, vocab_size, (num_tokens,), device=device)
    loss_fn = {
        "ours": lambda z, y: smoothed_ga_loss(z, y, smoothing=SMOOTHING, validate=False),
        "torch_eager": eager_loss,
        "torch_compile": _compiled_eager,
    }[implementation]

    def run():
        logits.grad = None
        loss_fn(logits, labels).backward()
        synchronize(device)

    return run, logits.numel() * logits.element_size()


CASES = [(impl, *shape) for shape in SHAPES[DEVICE] for impl in IMPLEMENTATIONS]


@pytest.mark.parametrize("implementation, num_tokens, vocab_size, dtype_name", CASES)
def test_forward_backward(benchmark, implementation, num_tokens, vocab_size, dtype_name):
    run, input_bytes = make_case(implementation, num_tokens, vocab_size, dtype_name, DEVICE)
    run()  # warm-up (compilation)
    benchmark.group = f"smoothed_ga fwd+bwd N={num_tokens} V={vocab_size} {dtype_name}"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    case_args = (implementation, num_tokens, vocab_size, dtype_name, DEVICE)
    extra = peak_extra_bytes(make_case, case_args, (implementation, 8, 1000, dtype_name, DEVICE), DEVICE)
    row = {
        "op": "smoothed_ga_loss",
        "implementation": implementation,
        "num_tokens": num_tokens,
        "vocab_size": vocab_size,
        "dtype": dtype_name,
        "median_ms": benchmark.stats.stats.median * 1e3,
        "peak_extra_bytes": extra,
        "peak_extra_over_logits": extra / input_bytes,
        **environment(DEVICE),
    }
    benchmark.extra_info.update(row)
    write_rows("smoothed_ga", [row])
