"""Token-level loss rules: a new token-level loss is a rule here, not a new kernel.

The kernels of ``token_loss_triton`` / ``token_loss_torch`` make one sweep over a row z in R^V (label y) and
keep its statistics, with every statistic over the non-target classes v != y computed with the target
masked out (so p_y ~ 1 loses nothing to cancellation):

    z_y                                   the target logit
    z_k = max_{v != y} z_v, k its index   the largest non-target logit (first index on ties)
    lse_u = log sum_{v != y} exp z_v      log of the non-target mass
    lse = logaddexp(lse_u, z_y)           log sum_v exp z_v
    mean_q_z = sum_{v != y} q_v z_v       q = softmax over v != y (q_y = 0), the target-removed softmax
    sum_z = sum_v z_v ;  V                the vocabulary size

so p_y = exp(z_y - lse), 1 - p_y = exp(lse_u - lse), p_k = max_{v != y} p_v = exp(z_k - lse).

A rule maps the statistics (and up to two scalar parameters) to the row loss L and to five per-row scalars
that define its gradient, written by the second sweep:

    dL/dz_v = A p_v + B [v == y] + C [v == k] + E q_v + F

This form covers every rule below exactly (derivations beside each rule). Coefficients that are always zero
are returned as None by the torch form (the backend skips their passes); the Triton form returns 0.0. A rule
declares the statistics beyond z_y, lse and lse_u that it reads: ``uses_q`` (mean_q_z and an E q_v term),
``needs_top`` (z_k and k), ``needs_sum_z``; the torch backend computes only those (the others reach the torch
form as None), the Triton kernel keeps all of them in registers anyway and skips only the q_v term. Token weights w and the 1 / D of reduction "mean"
multiply L and the gradient outside the rule.

To add a rule: write its torch form and its ``@triton.jit`` form (same arguments, same outputs), its float64
reference in ``token_loss_reference``, and register a :class:`TokenRule`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

Coefficient = Optional[torch.Tensor]


def _torch_power(log_x: torch.Tensor, exponent: float) -> torch.Tensor:
    """x^a from log x, with x^0 = 1 even where x = 0 (log x = -inf)."""
    if exponent == 0.0:
        return torch.ones_like(log_x)
    return torch.exp(exponent * log_x)


@triton.jit
def _triton_power(log_x, exponent):
    """x^a from log x, with x^0 = 1 even where x = 0 (log x = -inf)."""
    return tl.where(exponent == 0.0, 1.0, tl.exp(exponent * log_x))


# ----------------------------------------------------------------------------------------------- wga
# WGA (weighted gradient ascent; open-unlearning's WGA): L = -w * (lse - z_y), w = p_y^beta detached.
# dL/dz_v = -w (p_v - [v == y])  =>  A = -w, B = w.


def _wga_torch(z_y, lse, lse_u, z_k, mean_q_z, sum_z, vocab_size, beta, unused):
    weight = _torch_power(z_y - lse, beta)
    return -weight * (lse - z_y), -weight, weight, None, None, None


@triton.jit
def _wga_triton(z_y, lse, lse_u, z_k, mean_q_z, sum_z, vocab_size, beta, unused):
    weight = _triton_power(z_y - lse, beta)
    return -weight * (lse - z_y), -weight, weight, 0.0, 0.0, 0.0


# ----------------------------------------------------------------------------------------------- satimp
# SatImp: L = -w * (lse - z_y), w = p_y^beta1 (1 - p_y)^beta2 detached, 1 - p_y = exp(lse_u - lse).
# dL/dz_v = -w (p_v - [v == y])  =>  A = -w, B = w.


def _satimp_torch(z_y, lse, lse_u, z_k, mean_q_z, sum_z, vocab_size, beta1, beta2):
    weight = _torch_power(z_y - lse, beta1) * _torch_power(lse_u - lse, beta2)
    return -weight * (lse - z_y), -weight, weight, None, None, None


@triton.jit
def _satimp_triton(z_y, lse, lse_u, z_k, mean_q_z, sum_z, vocab_size, beta1, beta2):
    weight = _triton_power(z_y - lse, beta1) * _triton_power(lse_u - lse, beta2)
    return -weight * (lse - z_y), -weight, weight, 0.0, 0.0, 0.0


# ----------------------------------------------------------------------------------------------- ce_u
# CE-U: cross-entropy to the target-removed softmax q (detached): L = -sum_{v != y} q_v log p_v = lse - mean_q_z.
# dL/dz_v = p_v - q_v  =>  A = 1, E = -1.


def _ce_u_torch(z_y, lse, lse_u, z_k, mean_q_z, sum_z, vocab_size, unused0, unused1):
    return lse - mean_q_z, torch.ones_like(lse), None, None, -torch.ones_like(lse), None


@triton.jit
def _ce_u_triton(z_y, lse, lse_u, z_k, mean_q_z, sum_z, vocab_size, unused0, unused1):
    return lse - mean_q_z, 1.0, 0.0, 0.0, -1.0, 0.0


# ----------------------------------------------------------------------------------------------- ihl
# IHL (inverted hinge loss): L = 1 + p_y - p_k, p_k = max_{v != y} p_v.
# dp_y/dz_v = p_y ([v == y] - p_v), dp_k/dz_v = p_k ([v == k] - p_v)
# => dL/dz_v = (p_k - p_y) p_v + p_y [v == y] - p_k [v == k]: A = p_k - p_y, B = p_y, C = -p_k.


def _ihl_torch(z_y, lse, lse_u, z_k, mean_q_z, sum_z, vocab_size, unused0, unused1):
    p_y, p_k = torch.exp(z_y - lse), torch.exp(z_k - lse)
    return 1.0 + p_y - p_k, p_k - p_y, p_y, -p_k, None, None


@triton.jit
def _ihl_triton(z_y, lse, lse_u, z_k, mean_q_z, sum_z, vocab_size, unused0, unused1):
    p_y = tl.exp(z_y - lse)
    p_k = tl.exp(z_k - lse)
    return 1.0 + p_y - p_k, p_k - p_y, p_y, -p_k, 0.0, 0.0


# ----------------------------------------------------------------------------------------------- pdu
# PDU's forget term (open-unlearning's PDU): L = (max_v z_v - mean_v z_v)^2 = d^2, max_v z_v = max(z_y, z_k).
# dL/dz_v = 2 d ([v == argmax] - 1 / V)  =>  B = 2d if z_y >= z_k else 0, C = 2d if z_k > z_y else 0, F = -2d / V.


def _pdu_torch(z_y, lse, lse_u, z_k, mean_q_z, sum_z, vocab_size, unused0, unused1):
    gap = torch.maximum(z_y, z_k) - sum_z / vocab_size
    target_is_max = z_y >= z_k
    twice = 2.0 * gap
    zero = torch.zeros_like(gap)
    return gap * gap, None, torch.where(target_is_max, twice, zero), torch.where(target_is_max, zero, twice), None, -twice / vocab_size


@triton.jit
def _pdu_triton(z_y, lse, lse_u, z_k, mean_q_z, sum_z, vocab_size, unused0, unused1):
    gap = tl.maximum(z_y, z_k) - sum_z / vocab_size
    target_is_max = z_y >= z_k
    twice = 2.0 * gap
    return gap * gap, 0.0, tl.where(target_is_max, twice, 0.0), tl.where(target_is_max, 0.0, twice), 0.0, -twice / vocab_size


# ----------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TokenRule:
    """One token-level loss: its parameters (name, default, lower bound), its torch and Triton forms, and the
    optional statistics it reads (see the module docstring)."""

    name: str
    formula: str
    params: tuple[tuple[str, float, float], ...]
    torch_form: Callable
    triton_form: triton.JITFunction
    uses_q: bool = False
    needs_top: bool = False
    needs_sum_z: bool = False

    def resolve(self, values: dict) -> tuple[float, float]:
        """The rule's two scalar parameters (unused ones 0.0), defaults filled in, each checked."""
        names = [name for name, _, _ in self.params]
        unknown = sorted(set(values) - set(names))
        if unknown:
            accepted = ", ".join(names) if names else "none"
            raise TypeError(f"rule {self.name!r} got unknown parameter(s) {unknown}; it accepts: {accepted}")
        resolved = []
        for name, default, minimum in self.params:
            value = values.get(name, default)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"rule {self.name!r}: {name} must be a real number, got {type(value).__name__}")
            value = float(value)
            if not math.isfinite(value) or value < minimum:
                raise ValueError(f"rule {self.name!r}: {name} must be finite and >= {minimum}, got {value}")
            resolved.append(value)
        resolved += [0.0] * (2 - len(resolved))
        return resolved[0], resolved[1]


TOKEN_RULES: dict[str, TokenRule] = {
    rule.name: rule
    for rule in (
        TokenRule("wga", "L = -p_y^beta (lse - z_y), weight detached", (("beta", 1.0, 0.0),), _wga_torch, _wga_triton),
        TokenRule(
            "satimp",
            "L = -p_y^beta1 (1 - p_y)^beta2 (lse - z_y), weight detached",
            (("beta1", 5.0, 0.0), ("beta2", 1.0, 0.0)),
            _satimp_torch,
            _satimp_triton,
        ),
        TokenRule("ce_u", "L = -sum_{v != y} q_v log p_v, q = softmax without the target, detached", (), _ce_u_torch, _ce_u_triton, uses_q=True),
        TokenRule("ihl", "L = 1 + p_y - max_{v != y} p_v", (), _ihl_torch, _ihl_triton, needs_top=True),
        TokenRule("pdu", "L = (max_v z_v - mean_v z_v)^2", (), _pdu_torch, _pdu_triton, needs_top=True, needs_sum_z=True),
    )
}


def get_rule(name: str) -> TokenRule:
    """The registered rule called ``name``; a ValueError naming the registered ones otherwise."""
    if not isinstance(name, str) or name not in TOKEN_RULES:
        raise ValueError(f"unknown token rule {name!r}; expected one of {', '.join(map(repr, TOKEN_RULES))}")
    return TOKEN_RULES[name]
