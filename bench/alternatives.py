"""The loss implementations a user could pick instead of ours, each as ``loss(logits, labels)`` (logits kernel)
or ``loss(hidden, weight, labels, softcap)`` (fused linear), with the ascent sign applied outside where the
library has none. A factory returns None when its package is not importable or cannot run on the device.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from sga.kernels import smoothed_ga_loss

SMOOTHING = 0.1


def eager_logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What users write by hand: float32 logits, label-smoothed cross-entropy, the ascent sign."""
    return -F.cross_entropy(logits.float(), labels, label_smoothing=SMOOTHING)


_compiled_eager_logits_loss = torch.compile(eager_logits_loss, dynamic=True)  # one compile for all shapes


def ours(device: str) -> Callable:
    return lambda logits, labels: smoothed_ga_loss(logits, labels, smoothing=SMOOTHING, validate=False)


def ours_inplace(device: str) -> Callable:
    return lambda logits, labels: smoothed_ga_loss(
        logits, labels, smoothing=SMOOTHING, validate=False, inplace_backward=True
    )


def torch_eager(device: str) -> Callable:
    return eager_logits_loss


def torch_compile(device: str) -> Callable:
    return _compiled_eager_logits_loss


def _cuda_only(device: str, module: str, name: str) -> Optional[Any]:
    """module.name on CUDA when the package is importable, else None (the other libraries' kernels are CUDA only)."""
    if device != "cuda":
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None


def liger(device: str) -> Optional[Callable]:
    """Liger-Kernel's cross-entropy (CUDA only; it writes its gradient into the logits in forward)."""
    loss_class = _cuda_only(device, "liger_kernel.transformers", "LigerCrossEntropyLoss")
    if loss_class is None:
        return None
    module = loss_class(label_smoothing=SMOOTHING)
    return lambda logits, labels: -module(logits, labels)


LOGITS_IMPLEMENTATIONS = {
    "ours": ours,
    "ours_inplace": ours_inplace,
    "torch_eager": torch_eager,
    "torch_compile": torch_compile,
    "liger": liger,
}


def materialized_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    logits = hidden @ weight.t()
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def eager_linear_loss(hidden, weight, labels, softcap):
    """Materialized logits, upcast to float32, label-smoothed cross-entropy, the ascent sign."""
    return -F.cross_entropy(materialized_logits(hidden, weight, softcap).float(), labels, label_smoothing=SMOOTHING)


_compiled_eager_linear_loss = torch.compile(eager_linear_loss, dynamic=True)


def liger_fused_linear(device: str) -> Optional[Callable]:
    """Liger-Kernel's fused linear cross-entropy (CUDA only), ascent sign applied outside."""
    loss_class = _cuda_only(device, "liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
    if loss_class is None:
        return None

    def loss(hidden, weight, labels, softcap):
        module = loss_class(label_smoothing=SMOOTHING, softcap=softcap)
        return -module(weight, hidden, labels)

    return loss


def cut_cross_entropy(device: str) -> Optional[Callable]:
    """Cut Cross-Entropy's linear_cross_entropy (CUDA only). It has no label smoothing: it runs with eps = 0,
    so it does less work than the others."""
    linear_cross_entropy = _cuda_only(device, "cut_cross_entropy", "linear_cross_entropy")
    if linear_cross_entropy is None:
        return None
    return lambda hidden, weight, labels, softcap: -linear_cross_entropy(hidden, weight, labels, softcap=softcap)


def torch_linear_cross_entropy(device: str) -> Optional[Callable]:
    """PyTorch's own ``torch.nn.functional.linear_cross_entropy`` (chunked, label smoothing; torch >= 2.13), ascent
    sign applied outside; None where this torch has none. It has no softcap: the loss refuses one."""
    linear_cross_entropy = getattr(F, "linear_cross_entropy", None)
    if linear_cross_entropy is None:
        return None

    def loss(hidden, weight, labels, softcap):
        if softcap is not None:
            raise NotImplementedError("torch.nn.functional.linear_cross_entropy has no logit softcap")
        return -linear_cross_entropy(hidden, weight, labels, label_smoothing=SMOOTHING, ignore_index=-100)

    return loss


LINEAR_ALTERNATIVES = {
    "torch_eager": lambda device: eager_linear_loss,
    "torch_compile": lambda device: _compiled_eager_linear_loss,
    "torch_linear_cross_entropy": torch_linear_cross_entropy,
    "liger_fused_linear": liger_fused_linear,
    "cut_cross_entropy": cut_cross_entropy,
}
