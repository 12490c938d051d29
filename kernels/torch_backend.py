"""The smoothed-GA row computation in plain PyTorch, chunked over tokens.

Same contract as the Triton kernel (see ``triton_backend``): per-token signed losses out, the gradient
written into a caller-given buffer. Only ``chunk_rows`` rows are upcast at a time, so the float32
temporaries stay bounded (about ``CHUNK_ELEMENTS`` elements, twice that with a softcap) whatever N is.
"""
from __future__ import annotations

from typing import Optional

import torch

# 512K elements: 2 MB of float32 temporaries per chunk. Measured on a 2-core Xeon (N = 2048, V = 32000 and
# N = 1024, V = 128256): chunks of 256K to 4M elements all run within 10% of each other, 64K ones 20% slower.
CHUNK_ELEMENTS = 1 << 19


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic runs in float32, or float64 for float64 input (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    Ignored rows give a zero loss and a zero gradient row.

    Without softcap, the scale never gets its own pass: max z = a max x, sum z = a sum x, and exp(z - m) is
    exp(a x - m), one fused multiply-add into the float32 workspace. With softcap, t is written into the workspace
    (max z = c max t, sum z = c sum t since tanh is increasing) and exp(c t - m) into a second chunk buffer.
    """
    num_rows, vocab_size = logits.shape
    acc_dtype = compute_dtype_for(logits.dtype)
    device = logits.device
    row_loss = torch.empty(num_rows, dtype=acc_dtype, device=device)
    if num_rows == 0:
        return row_loss
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // vocab_size)
    chunk_rows = min(chunk_rows, num_rows)
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
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        size = stop - start
        rows = logits[start:stop]
        y = labels[start:stop].long()
        valid = y != ignore_index
        safe_y = torch.where(valid, y, torch.zeros_like(y))[:, None]
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
        loss = torch.zeros(size, dtype=acc_dtype, device=device)
        if smoothing != 1.0:  # skipping keeps 0 * (-inf) from turning a zero-weight term into NaN
            loss -= (1.0 - smoothing) * value_scale * values.gather(1, safe_y).squeeze(1)
        if smoothing != 0.0:
            loss -= smoothing_per_class * value_scale * values.sum(dim=-1)
        # a row of -inf only: m = -inf; shifting by 0 instead keeps exp(z - m) at 0, not NaN (lse = -inf)
        safe_max = torch.where(torch.isfinite(max_z), max_z, torch.zeros_like(max_z))
        exp_shifted = torch.add(-safe_max, values, alpha=value_scale, out=exp_out).exp_()  # exp(z - m)
        sum_exp = exp_shifted.sum(dim=-1, keepdim=True)  # S
        lse = (safe_max + sum_exp.log()).squeeze(1)
        weight = torch.ones_like(lse) if weights is None else weights[start:stop].to(acc_dtype)
        coef = sign * weight
        row_loss[start:stop] = torch.where(valid, coef * (lse + loss), torch.zeros_like(loss))
        if grad_buffer is None:
            continue
        grad_coef = (coef * grad_norm.to(acc_dtype) * logit_scale)[:, None]  # a k
        probs_scaled = exp_shifted.mul_(grad_coef / sum_exp)  # a k p
        # the target column in float32: a k p_y - a k eps / V - a k (1 - eps), rounded once
        target = probs_scaled.gather(1, safe_y) + grad_coef * (smoothing - 1.0 - smoothing_per_class)
        grad = probs_scaled.sub_(smoothing_per_class * grad_coef)  # a k (p - eps / V)
        grad.scatter_(1, safe_y, target)
        if softcap is not None:
            # dL/dx = G * (1 - t^2) = G - G t^2, with t^2 squared in place over t
            grad = torch.addcmul(grad, grad, values.square_(), value=-1.0, out=values)
        grad[~valid] = 0.0
        if grad.data_ptr() != grad_buffer[start:stop].data_ptr():
            grad_buffer[start:stop].copy_(grad)  # rounded once into a low-precision buffer
    return row_loss


def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output, a 0-dim scalar or one factor per row."""
    factor = grad_output if grad_output.dim() == 0 else grad_output.reshape(-1, 1)
    grad.mul_(factor)
