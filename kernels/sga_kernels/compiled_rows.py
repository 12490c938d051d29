"""The smoothed-GA torch backend's row math for one chunk as ``torch.compile``'d functions (CPU, large inputs).

Eager PyTorch runs the chunk math as about ten separate passes over each [R, V] chunk; inductor fuses the functions
below into a few sweeps per row, with the float32 upcast, the logit scale and the softcap inside the sweeps
(measured: docs/kernel-notes.md, "CPU v3" and "CPU v4"). Two forms:

- **float32, no softcap: two functions, one exp per element** (:func:`exp_sweeps`, then :func:`grad_sweep`). The
  first writes e = exp(z - m) into the gradient buffer (which may be the logits themselves) while it sums e and z
  (after a max sweep); the second turns e into the gradient in place, k (e / S - eps / V - (1 - eps) 1_y), one
  read and one write. Against the single function below this saves an exp per element (the costliest part of the
  sweeps on an AVX2 core) for one more write of a buffer the second function reads right away.
- **softcap, or a 16-bit buffer: one function** (:func:`_chunk_math`): sweep 1 max and sum z, sweep 2 sum exp,
  sweep 3 the gradient with exp (and tanh) recomputed, rounded once into the buffer. A 16-bit buffer cannot hold
  e (the target column, p_y - 1 at p_y ~ 1, must be formed in float32), and with a softcap the chain rule needs t =
  tanh(a x / c), which the first form would have overwritten in place.

Chunks are large (``CHUNK_ELEMENTS``, 16M elements): every compiled call is one OpenMP parallel region with a
barrier per sweep, and on a machine where another process holds a core each barrier waits for the descheduled
thread (milliseconds); 1M-element chunks made the loss 2-3x slower at 2 threads than at 1 there. At 1 thread the
larger chunks were also faster (fewer calls; the sweeps stream well from DRAM).

Compilation costs a few seconds once per process and variant: each function compiled for the input dtype and for
the in-place case (gradient buffer = logits) at most, with dynamic R and V (V > 4096). Before a variant touches real
data it runs once on a small dummy chunk (:func:`warm_up`), so that a compile failure (no C++ compiler, ...) happens
before the first function of the two-function form has overwritten in-place logits. ``smoothed_ga_torch`` uses the
compiled path only at or above ``COMPILE_MIN_ELEMENTS`` and runs its eager loop when compilation fails: the first
failure is reported once as a warning and the eager loop is used from then on.
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
# Elements per compiled call: few calls, so few parallel regions (see the module docstring). Measured at 1 thread,
# N = 2048, V = 32000 float32 (AMD EPYC, Zen 3): 1M-element chunks 0.32 s, 4M 0.28 s, 16M 0.25 s, one 65M chunk
# 0.22 s; at 2 threads with both cores shared, 1M-element chunks 2.4 s, one chunk 0.82 s (docs/kernel-notes.md,
# "CPU v4"). The compiled sweeps hold no [R, V] temporary, so the size bounds nothing but the call count.
CHUNK_ELEMENTS = 1 << 24
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
    # int32 columns: 8 lanes a vector on AVX2 (int64: 4, two compares per 8 elements)
    columns = torch.arange(vocab_size, device=x.device, dtype=torch.int32)
    grad = torch.where(columns == labels.to(torch.int32), grad - grad_coef * (1.0 - smoothing), grad)
    if softcap is not None:
        grad = grad * (1.0 - tanh * tanh)  # chain rule: dz/du = 1 - t^2
    grad_out.copy_(torch.where(valid, grad, 0.0))  # rounded once into the buffer's dtype
    return row_loss.squeeze(1)


def _exp_sweeps(
    x: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor, e_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """First function of the float32 form: e = exp(z - m) into e_out (which may be x), z = a x; returns the
    shift m (0 for a row of -inf only), S = sum e, sum z and z_y, each [R, 1], all read before x is overwritten."""
    z = x * logit_scale
    row_max = z.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp_shifted = torch.exp(z - shift)
    sum_exp = exp_shifted.sum(dim=-1, keepdim=True)
    sum_z = z.sum(dim=-1, keepdim=True)
    target = z.gather(1, labels)
    e_out.copy_(exp_shifted)
    return shift, sum_exp, sum_z, target


def _grad_sweep(
    e: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    coef: torch.Tensor,
    grad_coef: torch.Tensor,
    smoothing: torch.Tensor,
    shift: torch.Tensor,
    sum_exp: torch.Tensor,
    sum_z: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """Second function of the float32 form: the per-token losses from the row statistics, and e turned into the
    gradient in place: a k (e / S - eps / V - (1 - eps) 1_y), zero on ignored rows (see :func:`_chunk_math`)."""
    vocab_size = e.shape[-1]
    smoothing_per_class = smoothing / vocab_size
    loss = shift + torch.log(sum_exp)
    loss = loss - torch.where(smoothing != 1.0, (1.0 - smoothing) * target, torch.zeros_like(target))
    loss = loss - torch.where(smoothing != 0.0, smoothing_per_class * sum_z, 0.0)
    row_loss = torch.where(valid, coef * loss, 0.0)
    grad = e * (grad_coef / sum_exp) - grad_coef * smoothing_per_class
    columns = torch.arange(vocab_size, device=e.device, dtype=torch.int32)
    grad = torch.where(columns == labels.to(torch.int32), grad - grad_coef * (1.0 - smoothing), grad)
    e.copy_(torch.where(valid, grad, 0.0))
    return row_loss.squeeze(1)


def _plain(x, labels, valid, coef, grad_coef, smoothing, logit_scale, grad_out):
    return _chunk_math(x, labels, valid, coef, grad_coef, smoothing, logit_scale, None, grad_out)


def _capped(x, labels, valid, coef, grad_coef, smoothing, logit_scale, softcap, grad_out):
    return _chunk_math(x, labels, valid, coef, grad_coef, smoothing, logit_scale, softcap, grad_out)


# separate code objects, so that each has its own few variants (dtype x in-place) under dynamo's recompile limit
_COMPILED: dict[object, Callable] = {}
_SOURCES = {False: _plain, True: _capped, "exp_sweeps": _exp_sweeps, "grad_sweep": _grad_sweep}


def _compiled(name) -> Callable:
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_SOURCES[name], dynamic=True)
    return _COMPILED[name]


def compiled_chunk_function(capped: bool) -> Callable:
    """The compiled ``_plain`` or ``_capped`` (compiled lazily, once per process)."""
    return _compiled(capped)


def compiled_two_sweeps() -> tuple[Callable, Callable]:
    """The compiled ``_exp_sweeps`` and ``_grad_sweep`` of the float32 form (compiled lazily, once per process)."""
    return _compiled("exp_sweeps"), _compiled("grad_sweep")


def uses_two_sweeps(logits: torch.Tensor, grad_buffer: torch.Tensor, capped: bool) -> bool:
    """The float32 form applies: float32 logits and gradient buffer, no softcap."""
    return not capped and logits.dtype == torch.float32 and grad_buffer.dtype == torch.float32


_WARMED_UP: set[tuple] = set()


def warm_up(dtype: torch.dtype, capped: bool, in_place: bool) -> None:
    """Compile the variant (dtype, softcap or not, in place or not) on a dummy [2, MIN_COMPILED_VOCAB] chunk, once
    per process, before it sees real data. Raises what compilation raises."""
    key = (dtype, capped, in_place)
    if key in _WARMED_UP:
        return
    rows, vocab = 2, MIN_COMPILED_VOCAB
    x = torch.zeros(rows, vocab, dtype=dtype)
    out = x if in_place else torch.empty_like(x)
    labels = torch.zeros(rows, 1, dtype=torch.int64)
    valid = torch.ones(rows, 1, dtype=torch.bool)
    coef, grad_coef = torch.ones(rows, 1), torch.ones(rows, 1)  # two tensors: dynamo guards on aliasing
    scalars = [torch.tensor(value) for value in ((0.1, 1.0, 30.0) if capped else (0.1, 1.0))]
    with torch.no_grad():
        if uses_two_sweeps(x, out, capped):
            exp_sweeps, grad_sweep = compiled_two_sweeps()
            stats = exp_sweeps(x, labels, scalars[1], out)
            grad_sweep(out, labels, valid, coef, grad_coef, scalars[0], *stats)
        else:
            compiled_chunk_function(capped)(x, labels, valid, coef, grad_coef, *scalars, out)
    _WARMED_UP.add(key)


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
    """Near-equal chunks of at least max(2, CHUNK_ELEMENTS // V) rows (never 1 row: no size-1 recompile); the
    rows of a call that has fewer than twice that go as one chunk."""
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
