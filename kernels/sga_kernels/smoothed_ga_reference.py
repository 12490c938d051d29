"""A float64 reference of the smoothed-GA loss, written straight from the formula
(docs/design.md, section 2.1).

It materializes everything in float64 and is differentiable by autograd, so it serves as the oracle in
tests: never use it for training.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .checks import IGNORE_INDEX


def smoothed_ga_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    smoothing: float = 0.0,
    ascent: bool = True,
    token_weights: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    normalizer: Union[None, float, torch.Tensor] = None,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """Float64 smoothed-GA loss; same arguments and meaning as :func:`sga.kernels.smoothed_ga_loss`.

    z = softcap(a * x), softcap(u) = c * tanh(u / c) (u when softcap is None) for raw logits x and a = logit_scale;
    l = lse(z) - (1 - eps) * z_y - (eps / V) * sum_v z_v ;  L = s * w * l  (s = -1 for ascent)
    """
    z = logit_scale * logits.double().reshape(-1, logits.shape[-1])
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    y = labels.reshape(-1).long()
    vocab_size = z.shape[-1]
    valid = y != ignore_index
    safe_y = torch.where(valid, y, torch.zeros_like(y))
    lse = torch.logsumexp(z, dim=-1)
    target_logit = z.gather(1, safe_y[:, None]).squeeze(1)
    per_token = lse
    if smoothing != 1.0:
        per_token = per_token - (1.0 - smoothing) * target_logit
    if smoothing != 0.0:
        per_token = per_token - (smoothing / vocab_size) * z.sum(dim=-1)
    return reduce_token_losses(-1.0 if ascent else 1.0, per_token, valid, token_weights, labels.shape, reduction, normalizer)


def reduce_token_losses(
    sign: float,
    per_token: torch.Tensor,
    valid: torch.Tensor,
    token_weights: Optional[torch.Tensor],
    shape: torch.Size,
    reduction: str,
    normalizer: Union[None, float, torch.Tensor],
) -> torch.Tensor:
    """The float64 references' common tail: L_t = s * w_t * l_t on valid tokens (0 elsewhere), then
    "none" (L in ``shape``), "sum" (sum_t L_t) or "mean" (sum_t L_t / D, D = valid tokens or ``normalizer``;
    0 when D = 0)."""
    weights = torch.ones_like(per_token) if token_weights is None else token_weights.double().reshape(-1)
    per_token = torch.where(valid, sign * weights * per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token.reshape(shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    divisor = valid.sum().double() if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float64)
    return torch.where(divisor > 0, total / divisor.clamp_min(1e-300), torch.zeros_like(total))
