"""Argument checks for the fused linear smoothed-GA loss, run before any GEMM or kernel.

The scalar checks (smoothing, reduction, backend, normalizer, label range) are the ones of ``_validation``;
this module adds the checks on hidden states, the head weight and bias, and the logit softcap. Each raises a
ValueError / TypeError whose message names the offending argument.
"""
from __future__ import annotations

from numbers import Integral
from typing import Optional

import torch

from ._validation import FLOAT_DTYPES, check_positive_finite, check_token_tensors


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


def check_chunk_size(chunk_size: Optional[int]) -> Optional[int]:
    """None (the default rule) or a positive number of token rows per chunk."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, Integral):
        raise TypeError(f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of token rows, got {chunk_size}")
    return int(chunk_size)
