"""Argument checks of every loss in this package, and the constants they check against, run before any GEMM or
kernel launches.

Every check raises a ValueError / TypeError / IndexError whose message names the offending argument, so that bad
input never reaches a kernel (no out-of-bounds read, no silently wrong number). This module imports nothing of
the package: every other module may use it.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)  # what autocast casts for F.linear
INT64_RANGE = (-(2**63), 2**63 - 1)
INT32_RANGE = (-(2**31), 2**31 - 1)
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
IGNORE_INDEX = -100  # the default label of skipped tokens (PyTorch's cross_entropy and Hugging Face's convention)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the losses compute and accumulate in for inputs of ``dtype``: float32, or float64 for float64
    input (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_bool(name: str, value: bool) -> bool:
    """A flag must be a real bool (not 0 / 1 or a tensor)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_positive_finite(name: str, value: float, meaning: str, expected: str = "a real number") -> float:
    """A finite real number > 0 (as a float); ``meaning`` says what it is in the error message."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be finite and > 0 ({meaning}), got {value}")
    return value


def check_smoothing(smoothing: float) -> float:
    """eps must be a finite real number <= 1 (eps < 0 is negative label smoothing)."""
    if isinstance(smoothing, bool) or not isinstance(smoothing, Real):
        raise TypeError(f"smoothing must be a real number, got {type(smoothing).__name__}")
    smoothing = float(smoothing)
    if not math.isfinite(smoothing):
        raise ValueError(f"smoothing must be finite, got {smoothing}")
    if smoothing > 1.0:
        raise ValueError(f"smoothing must be <= 1 (eps/V on every class), got {smoothing}")
    return smoothing


def check_softcap(softcap: Optional[float]) -> Optional[float]:
    """None (no cap) or a finite c > 0 for softcap(u) = c * tanh(u / c)."""
    if softcap is None:
        return None
    return check_positive_finite("softcap", softcap, "c in c * tanh(u / c)", expected="a real number or None")


def check_logit_scale(logit_scale: float) -> float:
    """a in z = softcap(a * x), x the raw logits (h W^T + b for the fused linear losses): a finite real number > 0
    (an inverse temperature)."""
    return check_positive_finite("logit_scale", logit_scale, "a in z = softcap(a * x)")


def check_reduction(reduction: str, normalizer: object) -> str:
    """A known reduction, and a normalizer only with reduction 'mean'."""
    check_choice("reduction", reduction, REDUCTIONS)
    if normalizer is not None and reduction != "mean":
        raise ValueError(f"normalizer applies to reduction='mean' only, got reduction={reduction!r}")
    return reduction


def check_loss_options(smoothing: float, reduction: str, ascent: bool, normalizer: object) -> float:
    """The options of the smoothed-GA losses: eps (returned as a float), the reduction, the ascent flag, and a
    normalizer only with reduction 'mean'."""
    smoothing = check_smoothing(smoothing)
    check_reduction(reduction, normalizer)
    check_bool("ascent", ascent)
    return smoothing


def check_normalizer(normalizer: Union[None, float, torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """The caller's divisor for reduction='mean': a positive number or a 0-dim tensor (not checked on device).

    A tensor is taken as a constant (detached): D is a count of tokens, and no gradient flows to it even
    when it requires grad."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a number or a 0-dim tensor, got shape {tuple(normalizer.shape)}")
        if normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise TypeError(f"normalizer must be a real number, got dtype {normalizer.dtype}")
        return normalizer.detach().to(device=device, dtype=torch.float32)
    if isinstance(normalizer, bool) or not isinstance(normalizer, Real):
        raise TypeError(f"normalizer must be a number or a 0-dim tensor, got {type(normalizer).__name__}")
    if not math.isfinite(float(normalizer)) or float(normalizer) < 0:
        raise ValueError(f"normalizer must be finite and >= 0, got {normalizer}")
    return torch.tensor(float(normalizer), device=device, dtype=torch.float32)


def _positive_int_or_none(name: str, value: Optional[int], what: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a positive int or None, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of {what}, got {value}")
    return int(value)


def check_chunk_options(
    chunk_size: Optional[int], chunk_budget_bytes: Optional[int]
) -> tuple[Optional[int], Optional[int]]:
    """chunk_size: None (the budget rule) or positive token rows per chunk; chunk_budget_bytes: None (the
    default budget) or positive bytes."""
    return (
        _positive_int_or_none("chunk_size", chunk_size, "token rows"),
        _positive_int_or_none("chunk_budget_bytes", chunk_budget_bytes, "bytes"),
    )


def check_vocab_for_rules(vocab_size: int) -> None:
    """Every token rule needs a non-target class (q, z_k): V >= 2."""
    if vocab_size < 2:
        raise ValueError(
            f"token rules need a vocabulary of at least 2 classes (a non-target class), got V = {vocab_size}"
        )


def labels_for_kernels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The labels every comparison with ignore_index is made on (the mean's token count, the range check,
    both backends' kernels). They compare in int64; int32 labels are kept as they are when ignore_index
    fits in int32, and widened to int64 (8 bytes per token) when it does not: no int32 label can equal
    such an ignore_index, but an int32 comparison would wrap it (2**32 would match label 0)."""
    if labels.dtype == torch.int32 and not INT32_RANGE[0] <= ignore_index <= INT32_RANGE[1]:
        return labels.long()
    return labels


def check_tensor(name: str, value: object) -> torch.Tensor:
    """``value`` is a torch.Tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_token_tensors(
    labels: torch.Tensor,
    token_weights: Optional[torch.Tensor],
    ignore_index: int,
    leading_shape: tuple[int, ...],
    device: torch.device,
    source: str,
) -> None:
    """labels [...] (int32 / int64) and token_weights [...] (float) or None, both with the leading shape and
    device of ``source`` (the logits or the hidden states), and an int ignore_index."""
    check_tensor("labels", labels)
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"labels must be int32 or int64, got {labels.dtype}")
    if tuple(labels.shape) != tuple(leading_shape):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the {source}' leading shape {tuple(leading_shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but {source} on {device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not INT64_RANGE[0] <= ignore_index <= INT64_RANGE[1]:
        raise ValueError(f"ignore_index must fit in int64 [-2**63, 2**63 - 1], got {ignore_index}")
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor):
            raise TypeError(f"token_weights must be a torch.Tensor or None, got {type(token_weights).__name__}")
        if not token_weights.is_floating_point():
            raise TypeError(f"token_weights must be a float tensor, got {token_weights.dtype}")
        if tuple(token_weights.shape) != tuple(labels.shape):
            raise ValueError(
                f"token_weights shape {tuple(token_weights.shape)} must equal the labels shape {tuple(labels.shape)}"
            )
        if token_weights.device != device:
            raise ValueError(f"token_weights are on {token_weights.device} but {source} on {device}")


def check_logits_and_labels(
    logits: torch.Tensor,
    labels: torch.Tensor,
    token_weights: Optional[torch.Tensor],
    ignore_index: int,
) -> None:
    """Types, dtypes, shapes and devices of the per-token tensors."""
    check_tensor("logits", logits)
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (the vocabulary)")
    if logits.shape[-1] == 0:
        raise ValueError("logits have an empty vocabulary dimension (V = 0)")
    check_token_tensors(labels, token_weights, ignore_index, tuple(logits.shape[:-1]), logits.device, "logits")


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

    Returns the compute dtype of the GEMMs. hidden, weight and bias share one float dtype and one device; under
    autocast (autocast_dtype given) a float16 / bfloat16 / float32 tensor counts as the autocast dtype, as it
    would for F.linear, so float32 master weights go with bfloat16 autocast.
    """
    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
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
        check_tensor("bias", bias)
        if compute_dtype_of(bias) != compute_dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal the hidden dtype {hidden.dtype}")
        if tuple(bias.shape) != (vocab_size,):
            raise ValueError(f"bias must have shape [V] = ({vocab_size},), got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden on {hidden.device}")
    check_token_tensors(labels, token_weights, ignore_index, tuple(hidden.shape[:-1]), hidden.device, "hidden states")
    return compute_dtype


def check_inplace_rows(logits_2d: torch.Tensor) -> None:
    """inplace_backward=True writes the gradient over the logits: their [N, V] rows must not share memory
    (an expanded or otherwise overlapping tensor would have rows overwritten while others still read them)."""
    num_rows, vocab_size = logits_2d.shape
    if num_rows > 1 and logits_2d.stride(0) < vocab_size:
        raise ValueError(
            f"inplace_backward=True needs logits whose rows do not overlap in memory (row stride {logits_2d.stride(0)} "
            f"< V = {vocab_size}, e.g. an expanded tensor): pass logits.contiguous(), or inplace_backward=False"
        )


def check_labels_in_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Every label is ignore_index or in [0, V). Costs one host sync on CUDA (skip with validate=False)."""
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(out_of_range.any()):
        bad = labels[out_of_range][:5].tolist()
        raise IndexError(f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; found {bad}")


def check_kept_rows(kept_rows: torch.Tensor, num_rows: int, device: torch.device) -> torch.Tensor:
    """A 1-D int32 / int64 index tensor on the hidden states' device with at most num_rows entries; returned as
    int64. Its values are checked by :func:`check_kept_rows_cover_scored_tokens` (a host sync)."""
    check_tensor("kept_rows", kept_rows)
    if kept_rows.dtype not in INDEX_DTYPES:
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
