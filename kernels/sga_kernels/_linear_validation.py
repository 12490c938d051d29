"""Argument checks for the fused linear smoothed-GA loss, run before any GEMM or kernel.

The scalar checks (smoothing, reduction, backend, normalizer, label range) are the ones of ``checks``;
this module adds the checks on hidden states, the head weight and bias, and the logit softcap. Each raises a
ValueError / TypeError whose message names the offending argument.
"""
from __future__ import annotations

from numbers import Integral
from typing import Optional

import torch

from .checks import FLOAT_DTYPES, check_positive_finite, check_token_tensors


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)  # what autocast casts for F.linear


def check_linear_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    token_weights: Optional[torch.Tensor],
    ignore_index: int,
    autocast_dtype: Optional[torch.dtype] = None,
) -> torch.dtype:
    """hidden [..., D], weight [V, D], bias [V] or None, labels [...] and token_weights [...] or None.

    Returns the compute dtype. hidden, weight and bias share one float dtype and one device; under autocast
    (autocast_dtype given) a float16 / bfloat16 / float32 tensor counts as the autocast dtype, as it would for
    F.linear, so float32 master weights go with bfloat16 autocast.
    """
    _check_tensor("hidden", hidden)
    _check_tensor("weight", weight)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")

    def compute_dtype_of(tensor: torch.Tensor) -> torch.dtype:
        return autocast_dtype if autocast_dtype is not None and tensor.dtype in AUTOCAST_ELIGIBLE else tensor.dtype

    compute_dtype = compute_dtype_of(hidden)
    if compute_dtype_of(weight) != compute_dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal the hidden dtype {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (the hidden size D)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    vocab_size, hidden_size = weight.shape
    if vocab_size == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    if hidden_size == 0:
        raise ValueError("weight has an empty hidden dimension (D = 0)")
    if hidden.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden size mismatch: hidden has D = {hidden.shape[-1]} but weight is [V, D] = {tuple(weight.shape)}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden on {hidden.device}")
    if bias is not None:
        _check_tensor("bias", bias)
        if compute_dtype_of(bias) != compute_dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal the hidden dtype {hidden.dtype}")
        if tuple(bias.shape) != (vocab_size,):
            raise ValueError(f"bias must have shape [V] = ({vocab_size},), got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden on {hidden.device}")
    check_token_tensors(labels, token_weights, ignore_index, tuple(hidden.shape[:-1]), hidden.device, "hidden states")
    return compute_dtype


def check_softcap(softcap: Optional[float]) -> Optional[float]:
    """None (no cap) or a finite c > 0 for softcap(x) = c * tanh(x / c)."""
    if softcap is None:
        return None
    return check_positive_finite("softcap", softcap, "c in c * tanh(x / c)", expected="a real number or None")


def check_logit_scale(logit_scale: float) -> float:
    """a of z = softcap(a * (h W^T + b)): a finite real number > 0."""
    return check_positive_finite("logit_scale", logit_scale, "a in softcap(a * (h W^T + b))")


def _positive_int_or_none(name: str, value: Optional[int], what: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a positive int or None, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of {what}, got {value}")
    return int(value)


def check_chunk_options(chunk_size: Optional[int], chunk_budget_bytes: Optional[int]) -> tuple[Optional[int], Optional[int]]:
    """chunk_size: None (the budget rule) or positive token rows per chunk; chunk_budget_bytes: None (the
    default budget) or positive bytes."""
    return (
        _positive_int_or_none("chunk_size", chunk_size, "token rows"),
        _positive_int_or_none("chunk_budget_bytes", chunk_budget_bytes, "bytes"),
    )


def check_kept_rows(kept_rows: torch.Tensor, num_rows: int, device: torch.device) -> torch.Tensor:
    """A 1-D int32 / int64 index tensor on the hidden states' device with at most num_rows entries; returned as
    int64. Its values are checked by :func:`check_kept_rows_cover_scored_tokens` (a host sync)."""
    _check_tensor("kept_rows", kept_rows)
    if kept_rows.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"kept_rows must be an int32 or int64 index tensor, got {kept_rows.dtype}")
    if kept_rows.dim() != 1:
        raise ValueError(f"kept_rows must be 1-D (indices into the flattened tokens), got shape {tuple(kept_rows.shape)}")
    if kept_rows.shape[0] > num_rows:
        raise ValueError(f"kept_rows has {kept_rows.shape[0]} indices for {num_rows} tokens; give each kept row once")
    if kept_rows.device != device:
        raise ValueError(f"kept_rows are on {kept_rows.device} but hidden on {device}")
    return kept_rows.long()


def check_kept_rows_cover_scored_tokens(kept_rows: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    """kept_rows lies in [0, N), holds each index once and every token whose label is not ignore_index
    (labels flattened [N]). One host sync."""
    if kept_rows.numel():
        low, high = int(kept_rows.min()), int(kept_rows.max())
        if low < 0 or high >= labels.shape[0]:
            raise IndexError(f"kept_rows must lie in [0, {labels.shape[0]}), found {low if low < 0 else high}")
        if bool((kept_rows.sort().values.diff() == 0).any()):
            raise ValueError("kept_rows holds an index twice; give each kept token row once")
    scored = labels != ignore_index
    if int(scored.sum()) != int(scored[kept_rows].sum()):
        raise ValueError(
            "kept_rows misses a token whose label is not ignore_index; include every scored token "
            "(or pass kept_rows=None to have them computed)"
        )
