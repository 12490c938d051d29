"""The smoothed-GA row computation in plain PyTorch, chunked over tokens: the fallback of the Triton kernel and
the CPU path.

Same contract as the Triton kernel (see ``smoothed_ga_triton``): per-token signed losses out, the gradient
written into a caller-given buffer. Only a chunk of rows is upcast at a time, so the float32 temporaries stay
bounded (about ``CHUNK_ELEMENTS`` elements, twice that with a softcap) whatever N is. Large CPU inputs run the
chunk math compiled (``compiled_rows``); everything else, and every input where compilation is unavailable,
runs the eager chunk loop below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import compiled_rows
from .checks import accumulation_dtype

# 512K elements: 2 MB of float32 temporaries per chunk. Measured on the CPU (N = 2048, V = 32000 and N = 1024,
# V = 128256; docs/kernel-notes.md, "CPU v2"): chunks of 256K to 4M elements all run within 10% of each other, 64K ones
# 20% slower.
CHUNK_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class _RowTerms:
    """Per-row factors shared by every chunk: labels made safe to gather, validity, k = s w, a k grad_norm."""

    safe_labels: torch.Tensor  # [N, 1] int64, 0 on ignored rows
    valid: torch.Tensor  # [N, 1] bool
    coef: torch.Tensor  # [N, 1] s * w
    grad_coef: torch.Tensor  # [N, 1] a * s * w * grad_norm


def _row_terms(labels, weights, grad_norm, sign, ignore_index, logit_scale, acc_dtype) -> _RowTerms:
    y = labels.long()[:, None]
    valid = y != ignore_index
    weight = torch.ones(y.shape, dtype=acc_dtype, device=y.device) if weights is None else weights[:, None]
    coef = sign * weight.to(acc_dtype)
    grad_coef = coef * (grad_norm.to(acc_dtype) * logit_scale)
    return _RowTerms(torch.where(valid, y, torch.zeros_like(y)), valid, coef, grad_coef)


def rows_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    grad_norm: torch.Tensor,
    grad_buffer: Optional[torch.Tensor],
    smoothing: float,
    sign: float,
    ignore_index: int,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Per-token loss s * w * l for a [N, V] matrix of raw logits x; fills grad_buffer (may alias logits) if given.

    z      = softcap(a * x),  softcap(u) = c * tanh(u / c)  (u itself when softcap is None; a = logit_scale > 0)
    l      = lse - (1 - eps) * z_y - (eps / V) * sum_v z_v,   lse = m + log S,  S = sum_v exp(z_v - m),  m = max z
    dL/dz  = k * (softmax(z) - eps / V) - k * (1 - eps) * onehot(y),   k = s * w * grad_norm
    dL/dx  = a * dL/dz                      (no softcap)
           = a * dL/dz * (1 - t^2),  t = tanh(a * x / c)   (softcap: chain rule, same sweep)
    Ignored rows give a zero loss and a zero gradient row. chunk_rows (eager path only) defaults to
    CHUNK_ELEMENTS // V.
    """
    num_rows, vocab_size = logits.shape
    acc_dtype = accumulation_dtype(logits.dtype)
    row_loss = torch.empty(num_rows, dtype=acc_dtype, device=logits.device)
    if num_rows == 0:
        return row_loss
    terms = _row_terms(labels, weights, grad_norm, sign, ignore_index, logit_scale, acc_dtype)
    start = 0
    if compiled_rows.use_compiled(logits, grad_buffer):
        start = _compiled_forward(logits, terms, grad_buffer, row_loss, smoothing, softcap, logit_scale)
    if start < num_rows:
        _eager_forward(logits, terms, grad_buffer, row_loss, smoothing, softcap, logit_scale, start, chunk_rows)
    return row_loss


def _compiled_forward(logits, terms, grad_buffer, row_loss, smoothing, softcap, logit_scale) -> int:
    """The compiled chunk functions over near-equal row chunks; returns the first row not done (N when all are),
    which is where the eager loop takes over if compilation fails."""
    in_place = grad_buffer.data_ptr() == logits.data_ptr()
    # detached views of the same storage: the compiled functions write them in place, and dynamo refuses views of a
    # tensor autograd records (logits = h @ W^T with inplace_backward) that were written in place under no_grad
    logits, grad_buffer = logits.detach(), grad_buffer.detach()
    capped = softcap is not None
    try:
        compiled_rows.warm_up(logits.dtype, capped, in_place)  # compiles on a dummy chunk, before any real data
    except Exception as error:  # no C++ compiler, dynamo unsupported here, ...: eager for everything
        compiled_rows.disable(f"{type(error).__name__}: {error}".splitlines()[0])
        return 0
    two_sweeps = compiled_rows.uses_two_sweeps(logits, grad_buffer, capped)
    if two_sweeps:
        exp_sweeps, grad_sweep = compiled_rows.compiled_two_sweeps()
        scale = torch.tensor(logit_scale, dtype=torch.float32)
        eps = torch.tensor(smoothing, dtype=torch.float32)
    else:
        function = compiled_rows.compiled_chunk_function(capped)
        # 0-dim tensors, not Python floats: no recompile per value
        values = (smoothing, logit_scale) if softcap is None else (smoothing, logit_scale, softcap)
        scalars = [torch.tensor(value, dtype=torch.float32) for value in values]
    # no_grad: one graph whether or not the caller records autograd (dynamo guards on the grad mode)
    with torch.no_grad():
        for start, stop in compiled_rows.chunk_bounds(*logits.shape):
            rows = logits[start:stop]
            out = rows if in_place else grad_buffer[start:stop]  # in place: one tensor passed twice
            labels, valid, coef, grad_coef = (
                t[start:stop] for t in (terms.safe_labels, terms.valid, terms.coef, terms.grad_coef)
            )
            if two_sweeps:
                # no fallback past this point in place: the first function has overwritten the chunk with e
                stats = exp_sweeps(rows, labels, scale, out)
                row_loss[start:stop] = grad_sweep(out, labels, valid, coef, grad_coef, eps, *stats)
                continue
            try:
                row_loss[start:stop] = function(rows, labels, valid, coef, grad_coef, *scalars, out)
            except Exception as error:  # eager from this chunk on (the failed call wrote nothing)
                compiled_rows.disable(f"{type(error).__name__}: {error}".splitlines()[0])
                return start
    return logits.shape[0]


def _eager_forward(logits, terms, grad_buffer, row_loss, smoothing, softcap, logit_scale, first_row, chunk_rows):
    """Rows first_row.. in chunks of eager in-place passes over a float32 workspace.

    Without softcap, the scale never gets its own pass: max z = a max x, sum z = a sum x, and exp(z - m) is
    exp(a x - m), one fused multiply-add into the workspace. With softcap, t is written into the workspace
    (max z = c max t, sum z = c sum t since tanh is increasing) and exp(c t - m) into a second chunk buffer.
    """
    num_rows, vocab_size = logits.shape
    acc_dtype = row_loss.dtype
    device = logits.device
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // vocab_size)
    chunk_rows = min(chunk_rows, num_rows - first_row)
    smoothing_per_class = smoothing / vocab_size
    # float32 chunk buffers, allocated once per call and reused by every chunk (no page faults per chunk):
    # the workspace upcasts low-precision logits (float32 passes beat mixed-dtype ones on the CPU: 2.1 ms vs
    # 1.2 ms per 4M-element subtract) and holds t, then the gradient; with float32 logits the float32 gradient
    # buffer itself serves as workspace
    upcast = logits.dtype != acc_dtype
    buffer_is_workspace = not upcast and grad_buffer is not None and grad_buffer.dtype == acc_dtype
    chunk_shape = (chunk_rows, vocab_size)
    workspace = None if buffer_is_workspace else torch.empty(chunk_shape, dtype=acc_dtype, device=device)
    exp_buffer = None if softcap is None else torch.empty(chunk_shape, dtype=acc_dtype, device=device)
    for start in range(first_row, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        size = stop - start
        rows = logits[start:stop]
        safe_y, valid = terms.safe_labels[start:stop], terms.valid[start:stop]
        # everything read from the logits is read before the workspace (which may alias them) is written
        work = grad_buffer[start:stop] if buffer_is_workspace else workspace[:size]
        if upcast:
            rows = work.copy_(rows)
        if softcap is None:
            values, exp_out, value_scale = rows, work, logit_scale  # z = a x
        else:
            # t = tanh(a x / c) in float32; z = c t
            values = torch.mul(rows, logit_scale / softcap, out=work).tanh_()
            exp_out, value_scale = exp_buffer[:size], softcap
        # z = value_scale * values, value_scale > 0, so max z = value_scale * max values
        max_z = values.amax(dim=-1, keepdim=True) * value_scale
        loss = torch.zeros((size, 1), dtype=acc_dtype, device=device)
        if smoothing != 1.0:  # skipping keeps 0 * (-inf) from turning a zero-weight term into NaN
            loss -= (1.0 - smoothing) * value_scale * values.gather(1, safe_y)
        if smoothing != 0.0:
            loss -= smoothing_per_class * value_scale * values.sum(dim=-1, keepdim=True)
        # a row of -inf only: m = -inf; shifting by 0 instead keeps exp(z - m) at 0, not NaN (lse = -inf)
        safe_max = torch.where(torch.isfinite(max_z), max_z, torch.zeros_like(max_z))
        exp_shifted = torch.add(-safe_max, values, alpha=value_scale, out=exp_out).exp_()  # exp(z - m)
        sum_exp = exp_shifted.sum(dim=-1, keepdim=True)  # S
        lse = safe_max + sum_exp.log()
        row_loss[start:stop] = torch.where(valid, terms.coef[start:stop] * (lse + loss), 0.0).squeeze(1)
        if grad_buffer is None:
            continue
        grad_coef = terms.grad_coef[start:stop]  # a k
        prob_coef = grad_coef / sum_exp  # a k / S
        # the target column in float32: a k p_y - a k eps / V - a k (1 - eps), rounded once
        target = exp_shifted.gather(1, safe_y) * prob_coef + grad_coef * (smoothing - 1.0 - smoothing_per_class)
        # a k (p - eps / V) in one pass: -a k eps / V + exp(z - m) * (a k / S)
        grad = torch.addcmul(-smoothing_per_class * grad_coef, exp_shifted, prob_coef, out=exp_shifted)
        grad.scatter_(1, safe_y, target)
        if softcap is not None:
            # dL/dx = G * (1 - t^2) = G - G t^2, with t^2 squared in place over t
            grad = torch.addcmul(grad, grad, values.square_(), value=-1.0, out=values)
        grad.masked_fill_(~valid, 0.0)
        if grad.data_ptr() != grad_buffer[start:stop].data_ptr():
            grad_buffer[start:stop].copy_(grad)  # rounded once into a low-precision buffer


def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output, a 0-dim scalar or one factor per row; a CPU factor of 1 (``loss.backward()``) touches
    no memory (reading a CPU scalar costs no device synchronization)."""
    if grad_output.device.type == "cpu" and grad_output.dim() == 0 and grad_output.item() == 1.0:
        return
    factor = grad_output if grad_output.dim() == 0 else grad_output.reshape(-1, 1)
    grad.mul_(factor)
