"""The token-rule row computation in plain PyTorch, chunked over tokens (the fallback and the CPU path).

Same contract as the Triton kernel (``token_loss_triton``): per-token weighted losses out, the gradient
dL/dz = w * grad_norm * (A p + B [v == y] + C [v == k] + E q + F) written into a caller-given buffer
(``token_rules`` defines the statistics and the rules). Only ``chunk_rows`` rows are processed at a time, so
the float32 temporaries (the upcast chunk, the target-masked chunk and its exponentials) stay bounded
whatever N is.
"""
from __future__ import annotations

from typing import Optional

import torch

from .token_rules import TokenRule
from .torch_backend import CHUNK_ELEMENTS, compute_dtype_for


def _row_statistics(rows: torch.Tensor, safe_y: torch.Tensor):
    """Sweep 1 over a float32 chunk: (z_y, lse, lse_u, z_k, k, mean_q_z, sum_z) and the non-target
    exponentials e_v = exp(z_v - z_k) (e_y = 0), kept for q = e / sum(e)."""
    z_y = rows.gather(1, safe_y).squeeze(1)
    masked = rows.scatter(1, safe_y, float("-inf"))  # the target removed: every non-target statistic exact
    z_k, k = masked.max(dim=1)
    # a row with no finite non-target logit: shift by 0 so that exp(-inf - shift) stays 0, not NaN
    shift = torch.where(torch.isfinite(z_k), z_k, torch.zeros_like(z_k))
    exp_masked = (masked - shift[:, None]).exp_()
    sum_exp = exp_masked.sum(dim=1)
    lse_u = shift + sum_exp.log()
    lse = torch.logaddexp(lse_u, z_y)
    # sum_{v != y} q_v z_v: masked -inf entries have e_v = 0 and count as z_v = 0 (no 0 * inf)
    weighted = torch.einsum("rv,rv->r", exp_masked, masked.masked_fill_(masked == float("-inf"), 0.0))
    mean_q_z = torch.where(sum_exp > 0, weighted / sum_exp.clamp_min(torch.finfo(sum_exp.dtype).tiny), torch.zeros_like(sum_exp))
    return z_y, lse, lse_u, z_k, k, mean_q_z, rows.sum(dim=1), exp_masked, sum_exp, masked


def rows_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    grad_norm: torch.Tensor,
    grad_buffer: Optional[torch.Tensor],
    rule: TokenRule,
    param0: float,
    param1: float,
    ignore_index: int,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Per-token losses w * L [N] (float32; float64 for float64 logits) of logits [N, V]; writes
    w * grad_norm * dL/dz into grad_buffer [N, V] (which may alias the logits) when it is given."""
    num_rows, vocab_size = logits.shape
    acc_dtype = compute_dtype_for(logits.dtype)
    row_loss = torch.empty(num_rows, dtype=acc_dtype, device=logits.device)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // vocab_size)
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        rows = logits[start:stop].to(acc_dtype)  # no copy for float32 input
        y = labels[start:stop].long()
        valid = y != ignore_index
        safe_y = torch.where(valid, y, torch.zeros_like(y))[:, None]
        z_y, lse, lse_u, z_k, k, mean_q_z, sum_z, exp_masked, sum_exp, workspace = _row_statistics(rows, safe_y)
        loss, a, b, c, e, f = rule.torch_form(z_y, lse, lse_u, z_k, mean_q_z, sum_z, vocab_size, param0, param1)
        weight = torch.ones_like(lse) if weights is None else weights[start:stop].to(acc_dtype)
        row_loss[start:stop] = torch.where(valid, weight * loss, torch.zeros_like(loss))
        if grad_buffer is None:
            continue
        # Sweep 2: g = A p + E q + F, then + B at y and + C at k, all in float32, rounded once into the buffer
        if a is None:
            grad = workspace.zero_()
        else:
            lse_shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
            grad = torch.sub(rows, lse_shift[:, None], out=workspace).exp_().mul_(a[:, None])  # A p
        if e is not None:
            grad.addcmul_(exp_masked, (e / sum_exp.clamp_min(torch.finfo(sum_exp.dtype).tiny))[:, None])  # + E q
        if f is not None:
            grad.add_(f[:, None])
        if b is not None:
            grad.scatter_add_(1, safe_y, b[:, None])
        if c is not None:
            grad.scatter_add_(1, k[:, None], c[:, None])
        coef = torch.where(valid, weight * grad_norm.to(acc_dtype), torch.zeros_like(weight))
        grad_buffer[start:stop].copy_(grad.mul_(coef[:, None]))
    return row_loss
