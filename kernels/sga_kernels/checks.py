"""Argument checks for the smoothed-GA losses, run before any kernel launches.

Every check raises a ValueError / TypeError / IndexError whose message names the offending argument,
so that bad input never reaches a kernel (no out-of-bounds read, no silently wrong number).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
INT64_RANGE = (-(2**63), 2**63 - 1)
INT32_RANGE = (-(2**31), 2**31 - 1)
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class LossConfig:
    """The scalar parameters of one smoothed-GA loss call, passed through the autograd Function as one object.

    sign is -1.0 for ascent and +1.0 for descent; backend is already resolved ("triton" or "torch"); the loss
    sees z = softcap(logit_scale * x) (no cap when softcap is None).
    """

    smoothing: float
    sign: float
    ignore_index: int
    reduction: str
    backend: str
    inplace_backward: bool
    softcap: Optional[float] = None
    logit_scale: float = 1.0


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


def check_positive_finite(name: str, value: float, meaning: str, expected: str = "a real number") -> float:
    """A finite real number > 0 (as a float); ``meaning`` says what it is in the error message."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be finite and > 0 ({meaning}), got {value}")
    return value


def check_logit_scale(logit_scale: float) -> float:
    """a in z = softcap(a * x): a finite real number > 0 (an inverse temperature)."""
    return check_positive_finite("logit_scale", logit_scale, "z = logit_scale * logits")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' picks the Triton kernel for CUDA tensors and plain PyTorch otherwise.

    'triton' on a CPU tensor is only allowed under TRITON_INTERPRET=1 (the test suite's CPU mode).
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda":
        from .smoothed_ga_triton import interpreter_enabled

        if not interpreter_enabled():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {device}); set TRITON_INTERPRET=1 before "
                "importing sga.kernels to run the kernel on the CPU, or use backend='torch'"
            )
    return backend


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


def labels_for_kernels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The labels every comparison with ignore_index is made on (the mean's token count, the range check,
    both backends' kernels). They compare in int64; int32 labels are kept as they are when ignore_index
    fits in int32, and widened to int64 (8 bytes per token) when it does not: no int32 label can equal
    such an ignore_index, but an int32 comparison would wrap it (2**32 would match label 0)."""
    if labels.dtype == torch.int32 and not INT32_RANGE[0] <= ignore_index <= INT32_RANGE[1]:
        return labels.long()
    return labels


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
        raise IndexError(
            f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; found {bad}"
        )


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
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
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
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (the vocabulary)")
    if logits.shape[-1] == 0:
        raise ValueError("logits have an empty vocabulary dimension (V = 0)")
    check_token_tensors(labels, token_weights, ignore_index, tuple(logits.shape[:-1]), logits.device, "logits")


def check_loss_options(smoothing: float, reduction: str, ascent: bool, normalizer: object) -> float:
    """The options both losses share: eps (returned as a float), the reduction, the ascent flag, and a
    normalizer only with reduction 'mean'."""
    smoothing = check_smoothing(smoothing)
    check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(ascent, bool):
        raise TypeError(f"ascent must be a bool, got {type(ascent).__name__}")
    if normalizer is not None and reduction != "mean":
        raise ValueError(f"normalizer applies to reduction='mean' only, got reduction={reduction!r}")
    return smoothing
