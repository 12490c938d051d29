"""The smoothed-GA loss over logits: autograd Function, functional API and nn.Module.

Per token (DESIGN.md 2.1), with z the logits row, y the label, eps the smoothing rate:

    l = lse(z) - (1 - eps) * z_y - (eps / V) * sum_v z_v
    L = s * w * l            (s = -1 for ascent, +1 for descent; w the optional token weight)

The gradient is computed in the forward launch (the weights are known then); backward only scales it by
grad_output.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch.autograd.function import once_differentiable

from . import ops
from ._linear_validation import check_softcap
from .smoothed_ga_torch import compute_dtype_for
from .checks import (
    REDUCTIONS,
    LossConfig,
    check_choice,
    check_inplace_rows,
    check_labels_in_range,
    check_logit_scale,
    check_logits_and_labels,
    check_loss_options,
    check_normalizer,
    check_smoothing,
    labels_for_kernels,
    resolve_backend,
)


class SmoothedGALossFunction(torch.autograd.Function):
    """autograd Function over prepared inputs: logits [N, V] with unit stride along V, labels [N],
    token weights [N] or None, the caller's normalizer as a 0-dim float32 tensor or None, and a LossConfig.

    Use :func:`smoothed_ga_loss` unless you prepare the inputs yourself.
    """

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        labels: torch.Tensor,
        token_weights: Optional[torch.Tensor],
        normalizer: Optional[torch.Tensor],
        config: LossConfig,
    ) -> torch.Tensor:
        if config.reduction == "mean":
            # D = number of non-ignored tokens, or the caller's normalizer; D = 0 gives 0 (no host sync)
            divisor = (labels != config.ignore_index).sum().float() if normalizer is None else normalizer
            grad_norm = torch.where(divisor != 0, 1.0 / divisor, torch.zeros_like(divisor))
        else:
            grad_norm = torch.ones((), dtype=torch.float32, device=logits.device)
        grad_buffer = None
        if ctx.needs_input_grad[0]:
            grad_buffer = logits if config.inplace_backward else torch.empty_like(logits)
        row_loss = ops.smoothed_ga_rows(
            logits,
            labels,
            token_weights,
            grad_norm,
            grad_buffer,
            config.smoothing,
            config.sign,
            config.ignore_index,
            config.backend,
            config.softcap,
            config.logit_scale,
        )
        ctx.backend = config.backend
        ctx.backward_done = False
        ctx.save_for_backward(grad_buffer)
        if config.reduction == "none":
            return row_loss
        if config.reduction == "sum":
            return row_loss.sum()
        return row_loss.sum() * grad_norm.to(row_loss.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.backward_done:
            raise RuntimeError(
                "smoothed_ga_loss: backward can run only once per forward (the gradient buffer is scaled in place)"
            )
        ctx.backward_done = True
        (grad,) = ctx.saved_tensors
        ops.scale_rows_(grad, grad_output, ctx.backend)
        return grad, None, None, None, None


def smoothed_ga_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    smoothing: float = 0.0,
    ascent: bool = True,
    token_weights: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Union[None, float, torch.Tensor] = None,
    inplace_backward: bool = False,
    backend: str = "auto",
    validate: bool = True,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """Smoothed gradient-ascent loss of logits ``[..., V]`` against ``labels [...]``.

    Args:
        logits: float16 / bfloat16 / float32 (float64 for gradcheck) raw logits x, any leading shape; the loss
            sees z = softcap(logit_scale * x).
        labels: int32 / int64 class ids with the logits' leading shape; ``ignore_index`` marks skipped tokens
            (compared in int64: any int64 value works, for int32 labels too).
        smoothing: eps, any finite value <= 1 (PyTorch's convention: eps / V on every class; eps < 0 is
            negative label smoothing).
        ascent: True gives s = -1 (gradient ascent, unlearning); False gives s = +1 (ordinary descent).
        token_weights: optional per-token weights w of any sign (zero allowed); treated as constants.
        ignore_index: label value whose tokens give 0 loss and a zero gradient.
        reduction: "mean" (sum / D), "sum", or "none" (per-token losses, shaped like labels).
        normalizer: D for "mean": a number or 0-dim tensor (e.g. the token count of all micro-batches);
            default the number of non-ignored tokens. D = 0 gives a loss of 0 and zero gradients. A tensor is
            a constant: it is detached, and gets no gradient even when it requires grad.
        inplace_backward: write the gradient into the logits' storage, destroying the logits (saves one
            [N, V] buffer). The default leaves the caller's logits intact. Logits whose rows overlap in
            memory (expanded) are refused.
        backend: "triton", "torch" (chunked PyTorch, no [N, V] float32 temporary) or "auto" (triton on CUDA).
        validate: check that every label is ignore_index or in [0, V) (one host sync on CUDA); set False only
            when the labels are known to be valid.
        softcap: c of a final logit softcap z = c * tanh(u / c) (Gemma 2's ``final_logit_softcapping``), fused
            into the kernel's sweep (tanh and its chain rule); None for no cap. Pass the raw, uncapped logits.
        logit_scale: a > 0 multiplying the logits before the cap (u = a * x; 1 / temperature).

    Returns:
        float32 loss (float64 for float64 logits): a scalar, or per token for reduction "none".

    l = lse(z) - (1 - eps) z_y - (eps / V) sum_v z_v ;  L = s * w * l ;  dL/dz = s w (softmax(z) - (1-eps) 1_y - eps/V) / D
    dL/dx = a * dL/dz * (1 - tanh^2(a x / c))   (without softcap: a * dL/dz)
    """
    check_logits_and_labels(logits, labels, token_weights, ignore_index)
    smoothing = check_loss_options(smoothing, reduction, ascent, normalizer)
    softcap = check_softcap(softcap)
    logit_scale = check_logit_scale(logit_scale)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    resolved_backend = resolve_backend(backend, logits.device)
    normalizer_tensor = check_normalizer(normalizer, logits.device)
    vocab_size = logits.shape[-1]
    kernel_labels = labels_for_kernels(labels, ignore_index)
    if validate:
        check_labels_in_range(kernel_labels, vocab_size, ignore_index)

    logits_2d = logits.reshape(-1, vocab_size)
    if logits_2d.stride(-1) != 1:
        logits_2d = logits_2d.contiguous()
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled():  # the gradient will overwrite them
        check_inplace_rows(logits_2d)
    weights_1d = None
    if token_weights is not None:
        weights_1d = token_weights.detach().reshape(-1).to(compute_dtype_for(logits.dtype)).contiguous()
    config = LossConfig(
        smoothing=smoothing,
        sign=-1.0 if ascent else 1.0,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=resolved_backend,
        inplace_backward=inplace_backward,
        softcap=softcap,
        logit_scale=logit_scale,
    )
    loss = SmoothedGALossFunction.apply(
        logits_2d, kernel_labels.reshape(-1).contiguous(), weights_1d, normalizer_tensor, config
    )
    if reduction == "none":
        return loss.reshape(labels.shape)
    return loss


class SmoothedGALoss(torch.nn.Module):
    """nn.Module form of :func:`smoothed_ga_loss`; the constructor takes the fixed options.

    ``SmoothedGALoss(softcap=30.0)`` on raw logits is a drop-in for Gemma-2-style capped logits."""

    def __init__(
        self,
        *,
        smoothing: float = 0.0,
        ascent: bool = True,
        ignore_index: int = -100,
        reduction: str = "mean",
        inplace_backward: bool = False,
        backend: str = "auto",
        softcap: Optional[float] = None,
        logit_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.smoothing = check_smoothing(smoothing)
        self.softcap = check_softcap(softcap)
        self.logit_scale = check_logit_scale(logit_scale)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.backend = backend
        self.ascent = ascent
        self.ignore_index = ignore_index
        self.inplace_backward = inplace_backward

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        token_weights: Optional[torch.Tensor] = None,
        normalizer: Union[None, float, torch.Tensor] = None,
    ) -> torch.Tensor:
        return smoothed_ga_loss(
            logits,
            labels,
            smoothing=self.smoothing,
            ascent=self.ascent,
            token_weights=token_weights,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            normalizer=normalizer,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
        )

    def extra_repr(self) -> str:
        return (
            f"smoothing={self.smoothing}, ascent={self.ascent}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}, softcap={self.softcap}, "
            f"logit_scale={self.logit_scale}"
        )
