"""The loss implementations a user could pick instead of ours, each as ``loss(logits, labels)`` (logits kernel)
or ``loss(hidden, weight, labels, softcap)`` (fused linear), with the ascent sign applied outside where the
library has none. A factory returns None when its package is not importable or cannot run on the device.
"""
from __future__ import annotations

from typing import Callable, Optional

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


def liger(device: str) -> Optional[Callable]:
    """Liger-Kernel's cross-entropy (CUDA only; it writes its gradient into the logits in forward)."""
    if device != "cuda":
        return None
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    module = LigerCrossEntropyLoss(label_smoothing=SMOOTHING)
    return lambda logits, labels: -module(logits, labels)


LOGITS_IMPLEMENTATIONS = {
    "ours": ours,
    "ours_inplace": ours_inplace,
    "torch_eager": torch_eager,
    "torch_compile": torch_compile,
    "liger": liger,
}
