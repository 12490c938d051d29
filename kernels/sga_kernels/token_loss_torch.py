"""The token-rule row computation in plain PyTorch, chunked over tokens (the fallback and the CPU path).

Same contract as the Triton kernel (``token_loss_triton``): per-token weighted losses out, the gradient
dL/dz = w * grad_norm * (A p + B [v == y] + C [v == k] + E q + F) written into a caller-given buffer
(``token_rules`` defines the statistics and the rules). Only ``chunk_rows`` rows are processed at a time, so
the float32 temporaries stay bounded whatever N is, and only the statistics the rule declares are computed.

Per chunk, with s the shift: z_k for rules that read q or the top non-target logit (q_v = e_v / sum e then
stays exact however confident the target), else the row max (the non-target mass then underflows only where
the target leads by more than ~87 nats in float32, where 1 - p_y < 1e-38 anyway):
    e_v = exp(z_v - s) for v != y, e_y = 0        one pass (two with z_k), into the gradient buffer when it can
    lse_u = s + log sum e,  lse = logaddexp(lse_u, z_y),  mean_q_z = (e . z) / sum e   (ce_u only)
and the gradient reuses e: for v != y, p_v = e_v exp(s - lse) and q_v = e_v / sum e, so
    g_v = e_v * c (A exp(s - lse) + E / sum e) + c F (+ c C at k),   g_y = c (A p_y + B + F)
(c = w * grad_norm): one more pass, no second exponential.
"""
from __future__ import annotations

from typing import Optional

import torch

from .checks import accumulation_dtype
from .smoothed_ga_torch import CHUNK_ELEMENTS
from .token_rules import TokenRule


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """x where finite, else 0: a shift that keeps exp(-inf - shift) at 0 instead of NaN."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _exp_buffer(rows, chunk_logits, grad_chunk, rule: TokenRule) -> torch.Tensor:
    """Where e goes: over the float32 rows when nothing reads them afterwards (they are our upcast copy, or the
    logits that the gradient overwrites anyway), else the float32 gradient buffer, else a temporary."""
    aliased = grad_chunk is not None and grad_chunk.data_ptr() == chunk_logits.data_ptr()
    private = rows.data_ptr() != chunk_logits.data_ptr()
    if not rule.uses_q and (private or (aliased and grad_chunk.dtype == rows.dtype)):
        return rows
    if grad_chunk is not None and grad_chunk.dtype == rows.dtype and not aliased:
        return grad_chunk
    return torch.empty_like(rows)


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
    acc_dtype = accumulation_dtype(logits.dtype)
    row_loss = torch.empty(num_rows, dtype=acc_dtype, device=logits.device)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // vocab_size)
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        chunk_logits = logits[start:stop]
        grad_chunk = None if grad_buffer is None else grad_buffer[start:stop]
        rows = chunk_logits.to(acc_dtype)  # no copy for float32 input
        y = labels[start:stop].long()
        valid = y != ignore_index
        safe_y = torch.where(valid, y, torch.zeros_like(y))[:, None]

        # Sweep 1: the statistics the rule reads
        z_y = rows.gather(1, safe_y).squeeze(1)
        top = top_index = sum_z = mean_q_z = None
        if rule.needs_sum_z:
            sum_z = rows.sum(dim=1)
        buffer = _exp_buffer(rows, chunk_logits, grad_chunk, rule)
        if rule.needs_top or rule.uses_q:
            masked = (buffer if buffer is rows else buffer.copy_(rows)).scatter_(1, safe_y, float("-inf"))
            if rule.needs_top:
                top, top_index = masked.max(dim=1)
            shift = _finite_or_zero(top if top is not None else masked.amax(dim=1))
            exp_other = masked.sub_(shift[:, None]).exp_()  # e_y = exp(-inf) = 0
        else:
            shift = _finite_or_zero(rows.amax(dim=1))
            exp_other = torch.sub(rows, shift[:, None], out=buffer).exp_().scatter_(1, safe_y, 0.0)
        sum_exp = exp_other.sum(dim=1)
        lse_u = shift + sum_exp.log()
        lse = torch.logaddexp(lse_u, z_y)
        safe_sum = sum_exp.clamp_min(torch.finfo(acc_dtype).tiny)
        if rule.uses_q:  # sum_{v != y} q_v z_v (-inf logits have e_v = 0 and count as 0)
            mean_q_z = torch.einsum("rv,rv->r", exp_other, rows.nan_to_num(neginf=0.0)) / safe_sum
        loss, a, b, c, e, f = rule.torch_form(z_y, lse, lse_u, top, mean_q_z, sum_z, vocab_size, param0, param1)
        weight = torch.ones_like(lse) if weights is None else weights[start:stop].to(acc_dtype)
        row_loss[start:stop] = torch.where(valid, weight * loss, torch.zeros_like(loss))
        if grad_chunk is None:
            continue

        # Sweep 2, over e: g_v = e_v * coef (A exp(s - lse) + E / sum e) + coef F, then the target and k columns
        coef = torch.where(valid, weight * grad_norm.to(acc_dtype), torch.zeros_like(weight))
        zero = torch.zeros_like(lse)
        scale_p = torch.where(torch.isfinite(lse), torch.exp(shift - lse), zero)  # p_v = e_v * scale_p
        factor = (zero if a is None else a * scale_p) + (zero if e is None else e / safe_sum)
        grad = exp_other.mul_((coef * factor)[:, None])
        if f is not None:
            grad.add_((coef * f)[:, None])
        p_y = torch.exp(z_y - _finite_or_zero(lse))
        target = (zero if a is None else a * p_y) + (zero if b is None else b) + (zero if f is None else f)
        grad.scatter_(1, safe_y, (coef * target)[:, None])  # in float32, rounded once
        if c is not None:
            grad.scatter_add_(1, top_index[:, None], (coef * c)[:, None])
        if grad.data_ptr() != grad_chunk.data_ptr() or grad.dtype != grad_chunk.dtype:
            grad_chunk.copy_(grad)
    return row_loss
