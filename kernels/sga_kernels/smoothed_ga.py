"""The smoothed-GA loss: its autograd Function, its row kernel, the functional API over logits and over hidden
states (:func:`linear_smoothed_ga_loss`), and the nn.Module.

Per token (docs/design.md, section 2.1), with z the logits row, y the label, eps the smoothing rate:

    l = lse(z) - (1 - eps) * z_y - (eps / V) * sum_v z_v
    L = s * w * l            (s = -1 for ascent, +1 for descent; w the optional token weight)

The gradient is computed in the forward launch (the weights are known then); backward only scales it by
grad_output.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch

from . import ops
from .checks import (
    IGNORE_INDEX,
    REDUCTIONS,
    accumulation_dtype,
    check_bool,
    check_choice,
    check_inplace_rows,
    check_labels_in_range,
    check_logit_scale,
    check_logits_and_labels,
    check_loss_options,
    check_normalizer,
    check_smoothing,
    check_softcap,
    labels_for_kernels,
)
from .linear import fused_linear_rows
from .row_loss import OpRowKernel, RowLossConfig, RowLossFunction


@dataclass(frozen=True)
class SmoothedGARowKernel(OpRowKernel):
    """The smoothed-GA row kernel (``sga::smoothed_ga_rows``) with one call's options: L = s * w * l on
    z = softcap(logit_scale * x). backend is resolved ("triton" or "torch")."""

    loss_name: ClassVar[str] = "smoothed_ga_loss"
    smoothing: float
    sign: float
    ignore_index: int
    backend: str
    softcap: Optional[float] = None
    logit_scale: float = 1.0

    def with_softcap(self, softcap: float) -> "SmoothedGARowKernel":
        """The same kernel on capped logits c * tanh(x / c), fused into its sweep (tanh, the loss on the capped
        values and the chain rule 1 - tanh^2 in one pass): the chunk loop then keeps one [R, V] buffer."""
        return dataclasses.replace(self, softcap=softcap)

    def rows(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: Optional[torch.Tensor],
        grad_norm: torch.Tensor,
        grad_buffer: Optional[torch.Tensor],
    ) -> torch.Tensor:
        return ops.smoothed_ga_rows(
            logits,
            labels,
            weights,
            grad_norm,
            grad_buffer,
            self.smoothing,
            self.sign,
            self.ignore_index,
            self.backend,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
        )


class SmoothedGALossFunction(RowLossFunction):
    """autograd Function over prepared inputs: logits [N, V] with unit stride along V, labels [N], token weights
    [N] in the accumulation dtype or None, the caller's normalizer as a 0-dim float tensor or None, and a
    :class:`~sga.kernels.row_loss.RowLossConfig` holding a :class:`SmoothedGARowKernel`.

    Use :func:`smoothed_ga_loss` unless you prepare the inputs yourself.
    """


def smoothed_ga_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    smoothing: float = 0.0,
    ascent: bool = True,
    token_weights: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
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
    check_bool("inplace_backward", inplace_backward)
    resolved_backend = ops.resolve_backend(backend, logits.device)
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
        weights_1d = token_weights.detach().reshape(-1).to(accumulation_dtype(logits.dtype)).contiguous()
    row_kernel = SmoothedGARowKernel(
        smoothing=smoothing,
        sign=-1.0 if ascent else 1.0,
        ignore_index=ignore_index,
        backend=resolved_backend,
        softcap=softcap,
        logit_scale=logit_scale,
    )
    config = RowLossConfig(row_kernel, reduction, inplace_backward)
    loss = SmoothedGALossFunction.apply(
        logits_2d, kernel_labels.reshape(-1).contiguous(), weights_1d, normalizer_tensor, config
    )
    if reduction == "none":
        return loss.reshape(labels.shape)
    return loss


def linear_smoothed_ga_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    smoothing: float = 0.0,
    ascent: bool = True,
    token_weights: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    normalizer: Union[None, float, torch.Tensor] = None,
    backend: str = "auto",
    kept_rows: Optional[torch.Tensor] = None,
    skip_ignored: bool = True,
    chunk_size: Optional[int] = None,
    chunk_budget_bytes: Optional[int] = None,
    accumulate_in_float32: bool = True,
    validate: bool = True,
    return_token_losses: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Smoothed gradient-ascent loss of the logits ``softcap(logit_scale * (hidden @ weight.T + bias))``, without
    materializing them.

    Args:
        hidden: hidden states ``[..., D]`` (float16 / bfloat16 / float32; float64 for gradcheck).
        weight: LM-head weight ``[V, D]`` in the hidden dtype (a tied embedding matrix works as is).
        labels: int32 / int64 class ids with the hidden states' leading shape; ``ignore_index`` marks skipped tokens.
        bias: optional head bias ``[V]`` in the hidden dtype.
        softcap: c of the final logit softcap ``c * tanh(x / c)`` (Gemma 2's ``final_logit_softcapping``), or None.
        logit_scale: a in ``softcap(a * (h W^T + b))`` (Cohere's ``logit_scale``, 1 / Granite's
            ``logits_scaling``); finite and > 0.
        smoothing, ascent, token_weights, ignore_index, reduction, normalizer, validate: as in
            :func:`sga.kernels.smoothed_ga_loss`.
        backend: the row kernel run on each chunk of logits: "triton", "torch" or "auto" (triton on CUDA).
            The GEMMs are PyTorch's in every case.
        kept_rows: int64 indices into the flattened tokens that include every token whose label is not
            ignore_index, each once: only these rows go through the GEMMs (dH is zero elsewhere). The engine
            builds them on the host with each batch. None: computed here by one ``nonzero`` over the labels
            (a host sync on CUDA), or not at all with ``skip_ignored=False`` (every row goes through).
        skip_ignored: see kept_rows.
        chunk_size: token rows per chunk (R). Default: as many as ``chunk_budget_bytes`` allows.
        chunk_budget_bytes: bytes the [R, V] chunk buffers (one, two with softcap) may take; R is rounded down
            to a multiple of 128 and capped at 1024 (where the per-chunk dW update becomes compute bound on a
            GPU). Default: 1/16 of the kept rows' logits, at least 128 rows (256 for bf16 / fp16 on the CPU).
        accumulate_in_float32: for a bfloat16 / float16 weight, accumulate dW across chunks in a float32
            [V, D] buffer (default; 4 V D bytes, as large as the bf16 logits of N = 2 D tokens). False sums
            the chunks' products straight into a bfloat16 gradient: no such buffer, at the cost of one
            rounding per chunk (about sqrt(chunks) / 2 units in the last place); refused for float16 weights
            (the unnormalized sum can overflow float16). No effect for float32 or float64 weights, which always
            accumulate in their own dtype.
        return_token_losses: also return the per-token signed losses s * w * l of the same pass (detached,
            shaped like labels, 0 on ignored tokens): ``(loss, token_losses)``. No extra pass.

    Gradients flow to hidden, weight and bias, each only when it requires grad (a frozen head costs no dW GEMM).
    Host syncs: the label-range check (validate=True) and the kept-row count when kept_rows is None and
    skip_ignored is True; none otherwise. Under ``torch.autocast`` the GEMMs run in the autocast dtype, as
    ``F.linear``'s would; hidden, weight and bias may then have any of float16 / bfloat16 / float32 (float32
    master weights get their float32 gradient accumulated directly, with no extra buffer).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or per token (shaped like labels) for reduction
        "none"; with return_token_losses, ``(loss, token_losses)``.
    """
    smoothing = check_loss_options(smoothing, reduction, ascent, normalizer)
    device = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    row_kernel = SmoothedGARowKernel(
        smoothing=smoothing,
        sign=-1.0 if ascent else 1.0,
        ignore_index=ignore_index,
        backend=ops.resolve_backend(backend, device),
    )
    return fused_linear_rows(
        hidden,
        weight,
        labels,
        row_kernel=row_kernel,
        bias=bias,
        softcap=softcap,
        logit_scale=logit_scale,
        token_weights=token_weights,
        ignore_index=ignore_index,
        reduction=reduction,
        normalizer=normalizer,
        kept_rows=kept_rows,
        skip_ignored=skip_ignored,
        chunk_size=chunk_size,
        chunk_budget_bytes=chunk_budget_bytes,
        accumulate_in_float32=accumulate_in_float32,
        backend=backend,
        validate=validate,
        return_token_losses=return_token_losses,
    )


class SmoothedGALoss(torch.nn.Module):
    """nn.Module form of :func:`smoothed_ga_loss`; the constructor takes the fixed options.

    ``SmoothedGALoss(softcap=30.0)`` on raw logits is a drop-in for Gemma-2-style capped logits."""

    def __init__(
        self,
        *,
        smoothing: float = 0.0,
        ascent: bool = True,
        ignore_index: int = IGNORE_INDEX,
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
        """:func:`smoothed_ga_loss` of logits ``[..., V]`` against labels ``[...]`` with this module's options."""
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
