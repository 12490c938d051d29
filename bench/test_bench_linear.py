"""linear_smoothed_ga_loss forward+backward against materializing the logits, time and peak extra memory.

    cd bench && python -m pytest test_bench_linear.py --benchmark-only

Implementations, each from hidden [N, D] and head weight [V, D] (both requiring grad) to dH and dW:
- ours: linear_smoothed_ga_loss (chunked; never holds the [N, V] logits);
- materialized_kernel: logits = hidden @ W^T through autograd, then smoothed_ga_loss with inplace_backward=True
  (its gradient overwrites the logits: the cheapest way to use the logits kernel);
- torch_eager / torch_compile: logits = hidden @ W^T, upcast to float32, F.cross_entropy with label smoothing,
  sign applied (eager, and torch.compile of the same);
- liger_fused_linear, cut_cross_entropy: the fused linear losses of Liger-Kernel and Cut Cross-Entropy when
  installed (CUDA only; Cut Cross-Entropy has no label smoothing and runs with eps = 0);

Peak extra memory, minus the gradients dH and dW that every implementation returns (what remains is the
memory beyond inputs, outputs and gradients):
- CUDA: bench/harness.py (torch.cuda.max_memory_allocated minus what was allocated before the call).
- CPU: the RSS high-water mark of a fresh process per case (bench/harness.py).
Run the whole file: the row of `ours` then carries its time and memory ratios against the implementations
measured before it in the same session. Time is wall clock: on a shared machine, check the load first.
"""
from __future__ import annotations


import pytest
import torch

from alternatives import LINEAR_ALTERNATIVES, SMOOTHING, materialized_logits
from harness import environment, peak_extra_bytes, synchronize, write_rows
from sga.kernels import linear_smoothed_ga_loss, smoothed_ga_loss
from sga.kernels.linear import default_chunk_rows

# ours last: its row gets the ratios against the ones measured before it
IMPLEMENTATIONS = (*LINEAR_ALTERNATIVES, "materialized_kernel", "ours")
CPU_SHAPES = {"cpu_N2048_D512_V128256": (2048, 512, 128256, "float32", None)}
CUDA_SHAPES = {
    "llama3_8b_head": (8192, 4096, 128256, "bfloat16", None),
    "gemma2_2b_head": (8192, 2304, 256000, "bfloat16", 30.0),
}
MAX_EXTRA_OVER_LOGITS = 0.10  # issue 3: ours at most 10% of the full logits beyond inputs, outputs, gradients
_RESULTS: dict[tuple[str, str], dict] = {}


def make_case(implementation, num_tokens, hidden_size, vocab_size, dtype_name, softcap, device):
    """Inputs and a fwd+bwd closure for one implementation; returns (run, bytes of the gradients dH and dW)."""
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    hidden = torch.randn(num_tokens, hidden_size, device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(vocab_size, hidden_size, device=device, dtype=dtype) / hidden_size**0.5).requires_grad_(True)
    labels = torch.randint(0, vocab_size, (num_tokens,), device=device)

    def ours():
        return linear_smoothed_ga_loss(hidden, weight, labels, softcap=softcap, smoothing=SMOOTHING, validate=False)

    def materialized_kernel():
        logits = materialized_logits(hidden, weight, softcap)
        return smoothed_ga_loss(logits, labels, smoothing=SMOOTHING, inplace_backward=True, validate=False)

    if implementation in LINEAR_ALTERNATIVES:
        alternative = LINEAR_ALTERNATIVES[implementation](device)
        loss_fn = lambda: alternative(hidden, weight, labels, softcap)  # noqa: E731
    else:
        loss_fn = {"ours": ours, "materialized_kernel": materialized_kernel}[implementation]

    def run():
        hidden.grad = None
        weight.grad = None
        loss_fn().backward()
        synchronize(device)

    grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    return run, grad_bytes


def _measure(benchmark, floors: dict, implementation: str, shape_name: str, shape: tuple, device: str, rounds: int) -> dict:
    if implementation in LINEAR_ALTERNATIVES and LINEAR_ALTERNATIVES[implementation](device) is None:
        pytest.skip(f"{implementation} is not installed or does not run on {device}")
    num_tokens, hidden_size, vocab_size, dtype_name, softcap = shape
    case_args = (implementation, num_tokens, hidden_size, vocab_size, dtype_name, softcap, device)
    run, grad_bytes = make_case(*case_args)
    run()  # warm-up
    benchmark.group = f"fused linear fwd+bwd {shape_name}"
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    del run
    warmup_args = (implementation, 8, 16, 1000, dtype_name, softcap, device)
    extra = peak_extra_bytes(make_case, case_args, warmup_args, device) - grad_bytes
    logits_bytes = num_tokens * vocab_size * torch.empty((), dtype=getattr(torch, dtype_name)).element_size()
    row = {
        "op": "linear_smoothed_ga_loss",
        "implementation": implementation,
        "shape": shape_name,
        "num_tokens": num_tokens,
        "hidden_size": hidden_size,
        "vocab_size": vocab_size,
        "dtype": dtype_name,
        "softcap": softcap,
        "phase": "forward+backward",
        "median_ms": benchmark.stats.stats.median * 1e3,
        "peak_extra_bytes": extra,
        "logits_bytes": logits_bytes,
        "peak_extra_over_logits": extra / logits_bytes,
        "floor_ms": 6 * num_tokens * hidden_size * vocab_size / floors["matmul_flops_per_s"] * 1e3,  # 3 GEMMs
        **environment(device),
    }
    for (other_shape, other), other_row in _RESULTS.items():
        if other_shape == shape_name and other != implementation:
            row[f"time_ratio_vs_{other}"] = row["median_ms"] / other_row["median_ms"]
            row[f"memory_ratio_vs_{other}"] = extra / max(other_row["peak_extra_bytes"], 1)
    _RESULTS[(shape_name, implementation)] = row
    benchmark.extra_info.update(row)
    write_rows("linear", [row])
    return row


@pytest.mark.parametrize("shape_name", list(CPU_SHAPES))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cpu_forward_backward(benchmark, floors, collect_row, implementation, shape_name):
    row = _measure(benchmark, floors, implementation, shape_name, CPU_SHAPES[shape_name], "cpu", rounds=3)
    collect_row(row)
    if implementation == "ours":
        assert row["peak_extra_over_logits"] <= MAX_EXTRA_OVER_LOGITS, row


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape_name", list(CUDA_SHAPES))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cuda_forward_backward(benchmark, floors, collect_row, implementation, shape_name):
    row = _measure(benchmark, floors, implementation, shape_name, CUDA_SHAPES[shape_name], "cuda", rounds=10)
    collect_row(row)
    if implementation == "ours":
        # bf16 head: dW is accumulated in a float32 [V, D] buffer across chunks (DESIGN.md 3), and each chunk's
        # bf16 dW product goes through a temporary of one chunk's size, on top of the chunk buffers
        num_tokens, hidden_size, vocab_size, _, softcap = CUDA_SHAPES[shape_name]
        num_buffers = 1 if softcap is None else 2
        chunk_bytes = default_chunk_rows(num_tokens, num_buffers) * vocab_size * 2
        budget = 4 * vocab_size * hidden_size + (num_buffers + 1) * chunk_bytes + 0.02 * row["logits_bytes"]
        assert row["peak_extra_bytes"] <= budget, row
