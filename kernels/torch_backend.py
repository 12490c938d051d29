"""The smoothed-GA row computation in plain PyTorch, chunked over tokens.

Same contract as the Triton kernel (see ``triton_backend``): per-token signed losses out, the gradient
written into a caller-given buffer. Only ``chunk_rows`` rows are upcast at a time, so the float32
temporaries stay bounded (about ``CHUNK_ELEMENTS`` elements) whatever N is.
"""
from __future__ import annotations

from typing import Optional

import torch

CHUNK_ELEMENTS = 1 << 22  # 4M elements: 16 MB of float32 temporaries per chunk


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

    l      = lse - (1 - eps) * z_y - (eps / V) * sum_v z_v
    dL/dz  = s * w * grad_norm * (softmax(z) - (1 - eps) * onehot(y) - eps / V)
    Ignored rows give a zero loss and a zero gradient row.
    """
    num_rows, vocab_size = logits.shape
    acc_dtype = compute_dtype_for(logits.dtype)
    row_loss = torch.empty(num_rows, dtype=acc_dtype, device=logits.device)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // vocab_size)
    smoothing_per_class = smoothing / vocab_size
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        # the chunk is upcast into its own workspace, where the gradient is then built in place: the
        # gradient buffer itself when it has the compute dtype (no extra copy), else a chunk-sized temporary
        if grad_buffer is not None and grad_buffer.dtype == acc_dtype:
            z = grad_buffer[start:stop]
            if z.data_ptr() != logits[start:stop].data_ptr():
                z.copy_(logits[start:stop])
        else:  # a copy only when the gradient will be built in it
            z = logits[start:stop].to(acc_dtype, copy=grad_buffer is not None)
        y = labels[start:stop].long()
        valid = y != ignore_index
        safe_y = torch.where(valid, y, torch.zeros_like(y))[:, None]
        lse = torch.logsumexp(z, dim=-1)
        loss = lse.clone()
        if smoothing != 1.0:  # skipping keeps 0 * (-inf) from turning a zero-weight term into NaN
            loss -= (1.0 - smoothing) * z.gather(1, safe_y).squeeze(1)
        if smoothing != 0.0:
            loss -= smoothing_per_class * z.sum(dim=-1)
        weight = torch.ones_like(lse) if weights is None else weights[start:stop].to(acc_dtype)
        coef = sign * weight
        row_loss[start:stop] = torch.where(valid, coef * loss, torch.zeros_like(loss))
        if grad_buffer is None:
            continue
        # (softmax(z) - eps/V) * c, then the target column gets -(1 - eps) * c; c = s * w * grad_norm
        grad_coef = (coef * grad_norm.to(acc_dtype))[:, None]
        grad = z.sub_(lse[:, None]).exp_()
        grad.sub_(smoothing_per_class).mul_(grad_coef)
        grad.scatter_add_(1, safe_y, (smoothing - 1.0) * grad_coef)
        grad[~valid] = 0.0
        if grad.data_ptr() != grad_buffer[start:stop].data_ptr():
            grad_buffer[start:stop].copy_(grad)
    return row_loss


def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output, a 0-dim scalar or one factor per row."""
    factor = grad_output if grad_output.dim() == 0 else grad_output.reshape(-1, 1)
    grad.mul_(factor)
