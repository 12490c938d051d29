"""The smoothed-GA row computation in plain PyTorch, chunked over tokens.

Same contract as the Triton kernel (see ``triton_backend``): per-token signed losses out, the gradient
written into a caller-given buffer. Only ``chunk_rows`` rows are upcast at a time, so the float32
temporaries stay bounded (about ``CHUNK_ELEMENTS`` elements) whatever N is.
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
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Per-token loss s * w * l for a [N, V] logits matrix; fills grad_buffer (may alias logits) if given.

    l      = lse - (1 - eps) * z_y - (eps / V) * sum_v z_v,   lse = m + log S,  S = sum_v exp(z_v - m),  m = max z
    dL/dz  = c * (softmax(z) - eps / V) - c * (1 - eps) * onehot(y),   c = s * w * grad_norm
    Ignored rows give a zero loss and a zero gradient row.

    Each chunk makes five streaming passes over [R, V] (max, sum, z - m into the float32 workspace, exp in place,
    sum of exp) and two more for the gradient (times c / S, minus c eps / V), plus, for low-precision logits,
    the upcast into the workspace and the copy of the gradient back into the buffer.
    """
    num_rows, vocab_size = logits.shape
    acc_dtype = compute_dtype_for(logits.dtype)
    row_loss = torch.empty(num_rows, dtype=acc_dtype, device=logits.device)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // vocab_size)
    smoothing_per_class = smoothing / vocab_size
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        rows = logits[start:stop]
        y = labels[start:stop].long()
        valid = y != ignore_index
        safe_y = torch.where(valid, y, torch.zeros_like(y))[:, None]
        # the float32 workspace: the upcast chunk for low-precision logits (the passes below then read float32,
        # which is faster than mixed-dtype arithmetic), else the gradient buffer when it is float32, else a
        # temporary; everything read from the logits is read before the workspace (which may alias them) is written
        if rows.dtype != acc_dtype:
            rows = rows.to(acc_dtype)
            workspace = rows
        elif grad_buffer is not None and grad_buffer.dtype == acc_dtype:
            workspace = grad_buffer[start:stop]
        else:
            workspace = torch.empty_like(rows)
        max_logit = rows.amax(dim=-1, keepdim=True)
        loss = torch.zeros(stop - start, dtype=acc_dtype, device=logits.device)
        if smoothing != 1.0:  # skipping keeps 0 * (-inf) from turning a zero-weight term into NaN
            loss -= (1.0 - smoothing) * rows.gather(1, safe_y).squeeze(1)
        if smoothing != 0.0:
            loss -= smoothing_per_class * rows.sum(dim=-1)
        # a row of -inf only: m = -inf; shifting by 0 instead keeps exp(z - m) at 0, not NaN (lse = -inf)
        safe_max = torch.where(torch.isfinite(max_logit), max_logit, torch.zeros_like(max_logit))
        exp_shifted = torch.sub(rows, safe_max, out=workspace).exp_()  # exp(z - m)
        sum_exp = exp_shifted.sum(dim=-1, keepdim=True)  # S
        lse = (safe_max + sum_exp.log()).squeeze(1)
        weight = torch.ones_like(lse) if weights is None else weights[start:stop].to(acc_dtype)
        coef = sign * weight
        row_loss[start:stop] = torch.where(valid, coef * (lse + loss), torch.zeros_like(loss))
        if grad_buffer is None:
            continue
        grad_coef = (coef * grad_norm.to(acc_dtype))[:, None]
        probs_scaled = exp_shifted.mul_(grad_coef / sum_exp)  # c * p
        # the target column in float32: c * p_y - c * eps / V - c * (1 - eps), rounded once
        target = probs_scaled.gather(1, safe_y) + grad_coef * (smoothing - 1.0 - smoothing_per_class)
        grad = probs_scaled.sub_(smoothing_per_class * grad_coef)  # c * (p - eps / V)
        grad.scatter_(1, safe_y, target)
        grad[~valid] = 0.0
        if grad.data_ptr() != grad_buffer[start:stop].data_ptr():
            grad_buffer[start:stop].copy_(grad)  # rounded once into a low-precision buffer
    return row_loss


def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output, a 0-dim scalar or one factor per row."""
    factor = grad_output if grad_output.dim() == 0 else grad_output.reshape(-1, 1)
    grad.mul_(factor)
