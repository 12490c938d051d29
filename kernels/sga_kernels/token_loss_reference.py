"""Float64 references of the token-level rules, written straight from their definitions (not from the
statistics the kernels use), differentiable by autograd: the oracle of the tests, never for training.

    wga:    L = -sg(p_y)^beta * (-log p_y)
    satimp: L = -sg(p_y)^beta1 * sg(1 - p_y)^beta2 * (-log p_y),  1 - p_y = sum_{v != y} p_v
    ce_u:   L = -sum_v sg(q)_v log p_v,  q = softmax(z with z_y = -inf)
    ihl:    L = 1 + p_y - max_{v != y} p_v
    pdu:    L = (max_v z_v - mean_v z_v)^2
(sg = stop-gradient, p = softmax(z))
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .checks import IGNORE_INDEX
from .smoothed_ga_reference import reduce_token_losses
from .token_rules import get_rule


def _rule_losses(z: torch.Tensor, y: torch.Tensor, rule: str, param0: float, param1: float) -> torch.Tensor:
    log_p = F.log_softmax(z, dim=-1)
    log_p_y = log_p.gather(1, y[:, None]).squeeze(1)
    p_y = log_p_y.exp()
    is_target = F.one_hot(y, z.shape[-1]).bool()
    if rule == "wga":
        return -(p_y.detach() ** param0) * (-log_p_y)
    if rule == "satimp":
        not_y = log_p.exp().masked_fill(is_target, 0.0).sum(dim=-1)  # 1 - p_y, exact also when p_y ~ 1
        return -(p_y.detach() ** param0) * (not_y.detach() ** param1) * (-log_p_y)
    if rule == "ce_u":
        target = F.softmax(z.detach().masked_fill(is_target, float("-inf")), dim=-1)
        return -torch.where(target > 0, target * log_p, torch.zeros_like(log_p)).sum(dim=-1)  # 0 log 0 = 0
    if rule == "ihl":
        return 1.0 + p_y - log_p.exp().masked_fill(is_target, float("-inf")).amax(dim=-1)
    if rule == "pdu":
        return (z.amax(dim=-1) - z.mean(dim=-1)) ** 2
    raise ValueError(f"no reference for rule {rule!r}")


def token_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rule: str = "wga",
    *,
    token_weights: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    normalizer: Union[None, float, torch.Tensor] = None,
    **rule_params: float,
) -> torch.Tensor:
    """Float64 token-rule loss; same arguments and meaning as :func:`sga.kernels.token_loss`."""
    param0, param1 = get_rule(rule).resolve(rule_params)
    z = logits.double().reshape(-1, logits.shape[-1])
    y = labels.reshape(-1).long()
    valid = y != ignore_index
    per_token = _rule_losses(z, torch.where(valid, y, torch.zeros_like(y)), rule, param0, param1)
    return reduce_token_losses(1.0, per_token, valid, token_weights, labels.shape, reduction, normalizer)
