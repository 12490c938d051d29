"""The smoothed-GA torch backend's row math for one chunk as a ``torch.compile``'d function (CPU, large inputs).

Eager PyTorch runs the chunk math as about ten separate passes over each [R, V] chunk; inductor fuses the
function below into three sweeps per row (max and sum; sum of exp; the gradient, written straight into the
gradient buffer in its dtype), with the float32 upcast, the logit scale and the softcap inside the sweeps
(measured: bench/NOTES.md, "CPU v3").

Compilation costs a few seconds once per process and variant: one function with and one without softcap, each
compiled for the input dtype (float32 / bfloat16 / float16) and for the in-place case (gradient buffer = logits)
at most, with dynamic R and V (V > 4096). ``smoothed_ga_torch`` uses it only at or above ``COMPILE_MIN_ELEMENTS`` and
runs its eager loop when compilation fails (no C++ compiler, ...): the first failure is reported once as a
warning and the eager loop is used from then on.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

from .bounds import near_equal_bounds

# Below this many elements a call runs eager: a few milliseconds at most, not worth a compile in processes that
# only ever see small inputs (the test suite).
COMPILE_MIN_ELEMENTS = 1 << 22
# Elements per compiled call: measured 2M-8M bytes of float32 per chunk within a few percent (bench/NOTES.md);
# fewer, larger chunks keep the per-call overhead (guards, wrapper) small.
CHUNK_ELEMENTS = 1 << 20
# Inductor sums rows of up to 4096 elements differently (no cascade) and guards on it: a vocabulary on each side
# would compile a second graph per variant. Small vocabularies stay eager, so each variant has one graph.
MIN_COMPILED_VOCAB = 4097
COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# SGA_COMPILE_ROWS=0 turns the compiled path off (eager everywhere).
ENABLED_BY_ENVIRONMENT = os.environ.get("SGA_COMPILE_ROWS", "1") != "0"

_failure: Optional[str] = None  # why compilation is off for this process, once it failed


def _chunk_math(
    x: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    coef: torch.Tensor,
    grad_coef: torch.Tensor,
    smoothing: torch.Tensor,
    logit_scale: torch.Tensor,
    softcap: Optional[torch.Tensor],
    grad_out: torch.Tensor,
) -> torch.Tensor:
    """Per-token losses of one chunk of raw logits x [R, V]; dL/dx written into grad_out (which may be x).

    labels [R, 1] (in range), valid [R, 1], coef = s w [R, 1], grad_coef = a s w grad_norm [R, 1], the rest 0-dim.
    z = softcap(a x); l = lse - (1 - eps) z_y - (eps / V) sum z; dL/dx = a k (p - eps/V - (1 - eps) 1_y) (1 - t^2).
    """
    vocab_size = x.shape[-1]
    u = x.to(torch.float32) * logit_scale  # u = a x
    if softcap is None:
        z = u
    else:
        tanh = torch.tanh(u / softcap)  # t
        z = softcap * tanh
    row_max = z.amax(dim=-1, keepdim=True)
    # a row of -inf only: shifting by 0 keeps exp(z - m) at 0 instead of NaN
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    shifted = z - shift  # z - m, exact where it matters (z near m)
    sum_exp = torch.exp(shifted).sum(dim=-1, keepdim=True)  # S
    log_sum_exp = torch.log(sum_exp)
    target = z.gather(1, labels)
    smoothing_per_class = smoothing / vocab_size
    # a term with a zero factor is dropped, never 0 * inf
    loss = shift + log_sum_exp
    loss = loss - torch.where(smoothing != 1.0, (1.0 - smoothing) * target, torch.zeros_like(target))
    loss = loss - torch.where(smoothing != 0.0, smoothing_per_class * z.sum(dim=-1, keepdim=True), 0.0)
    row_loss = torch.where(valid, coef * loss, 0.0)
    # p = exp(z - m - log S): a second exp per element instead of a stored [R, V] exp (the sweep is memory-bound)
    grad = grad_coef * (torch.exp(shifted - log_sum_exp) - smoothing_per_class)
    columns = torch.arange(vocab_size, device=x.device)
    grad = torch.where(columns == labels, grad - grad_coef * (1.0 - smoothing), grad)
    if softcap is not None:
        grad = grad * (1.0 - tanh * tanh)  # chain rule: dz/du = 1 - t^2
    grad_out.copy_(torch.where(valid, grad, 0.0))  # rounded once into the buffer's dtype
    return row_loss.squeeze(1)


def _plain(x, labels, valid, coef, grad_coef, smoothing, logit_scale, grad_out):
    return _chunk_math(x, labels, valid, coef, grad_coef, smoothing, logit_scale, None, grad_out)


def _capped(x, labels, valid, coef, grad_coef, smoothing, logit_scale, softcap, grad_out):
    return _chunk_math(x, labels, valid, coef, grad_coef, smoothing, logit_scale, softcap, grad_out)


# two code objects, so that each has its own few variants (dtype x in-place) under dynamo's recompile limit
_COMPILED: dict[bool, Callable] = {}


def compiled_chunk_function(capped: bool) -> Callable:
    """The compiled ``_plain`` or ``_capped`` (compiled lazily, once per process)."""
    if capped not in _COMPILED:
        _COMPILED[capped] = torch.compile(_capped if capped else _plain, dynamic=True)
    return _COMPILED[capped]


def use_compiled(logits: torch.Tensor, grad_buffer: Optional[torch.Tensor]) -> bool:
    """Whether a call takes the compiled path: CPU, a compiled dtype, a gradient to write, at least
    COMPILE_MIN_ELEMENTS elements, at least 2 rows (dynamo would specialize a size of 1) and MIN_COMPILED_VOCAB
    classes, contiguous rows, and compilation not switched off or failed."""
    return (
        ENABLED_BY_ENVIRONMENT
        and _failure is None
        and grad_buffer is not None
        and logits.device.type == "cpu"
        and logits.dtype in COMPILED_DTYPES
        and logits.numel() >= COMPILE_MIN_ELEMENTS
        and logits.shape[0] >= 2
        and logits.shape[1] >= MIN_COMPILED_VOCAB
        and logits.is_contiguous()
        and grad_buffer.is_contiguous()
    )


def chunk_bounds(num_rows: int, vocab_size: int) -> list[tuple[int, int]]:
    """Near-equal chunks of at least max(2, CHUNK_ELEMENTS // V) rows (never 1 row: no size-1 recompile)."""
    rows_per_chunk = max(2, CHUNK_ELEMENTS // vocab_size)
    return near_equal_bounds(num_rows, max(1, num_rows // rows_per_chunk))


def disable(reason: str) -> None:
    """Switch the compiled path off for this process, with one warning that says why."""
    global _failure
    _failure = reason
    warnings.warn(
        f"sga.kernels: torch.compile of the row kernel failed ({reason}); the torch backend runs eager PyTorch "
        "from now on (correct, slower). Set SGA_COMPILE_ROWS=0 to skip the attempt.",
        RuntimeWarning,
        stacklevel=3,
    )
