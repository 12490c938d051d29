"""What the losses share above the custom ops: the row kernels, the reductions, and the autograd Function over a
logits matrix that both logits losses (``smoothed_ga_loss``, ``token_loss``) are.

A row kernel (:class:`OpRowKernel`) is a frozen dataclass that holds one loss's own scalar options (its
parameters, ignore_index, the resolved backend) and runs that loss's custom op of ``ops`` over a [N, V] matrix.
It is built once per call by the public function and carried as one object: inside a :class:`RowLossConfig`
through :class:`RowLossFunction` for the logits losses, inside ``linear.FusedLinearConfig`` through the chunk
loop for the fused linear losses.

Reduction "mean" divides by D, the number of non-ignored tokens or the caller's normalizer (``docs/design.md``,
section 2.1); D = 0 gives a loss of 0 and zero gradients. The gradient is computed in the forward launch (the
weights are known then); backward only scales it by grad_output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch.autograd.function import once_differentiable

from . import ops
from .checks import accumulation_dtype


class OpRowKernel:
    """Base of the row kernels of this package's losses; subclasses are frozen dataclasses with at least the fields
    ``ignore_index`` and ``backend`` (resolved: "triton" or "torch").

    :meth:`rows` is the general form (any grad_norm, any gradient buffer); calling the kernel is the form the chunk
    loop of ``linear`` uses: ``kernel(logits[R, V], labels[R], weights[R] or None, write_grad) -> row_loss[R]``,
    the gradient written over the logits, with grad_norm = 1 (the loop applies 1 / D afterwards).
    """

    loss_name: ClassVar[str]  # the public function's name, for error messages
    ignore_index: int
    backend: str

    def rows(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: Optional[torch.Tensor],
        grad_norm: torch.Tensor,
        grad_buffer: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Per-token losses L_r (token weight applied, 0 on ignored rows) of logits [N, V] with unit stride along V,
        in the accumulation dtype; writes grad_norm * dL_r/dz_r into grad_buffer ([N, V], may be logits) if given."""
        raise NotImplementedError

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor], write_grad: bool
    ) -> torch.Tensor:
        unit_norm = torch.ones((), dtype=accumulation_dtype(logits.dtype), device=logits.device)
        return self.rows(logits, labels, weights, unit_norm, logits if write_grad else None)


def inverse_divisor(
    labels: torch.Tensor, ignore_index: int, normalizer: Optional[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """1 / D for reduction "mean" (D = non-ignored tokens or the caller's normalizer; D = 0 gives 0), computed on
    the device: no host sync."""
    divisor = (labels != ignore_index).sum().to(dtype) if normalizer is None else normalizer.to(dtype)
    return torch.where(divisor != 0, 1.0 / divisor, torch.zeros_like(divisor))


def reduce_rows(row_loss: torch.Tensor, reduction: str, mean_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The per-token losses as the reduction gives them ("mean": their sum times mean_scale = 1 / D)."""
    if reduction == "none":
        return row_loss
    if reduction == "sum":
        return row_loss.sum()
    return row_loss.sum() * mean_scale


@dataclass(frozen=True)
class RowLossConfig:
    """The options of one logits-loss call, passed through :class:`RowLossFunction` as one object.

    row_kernel: the loss and its own options (an :class:`OpRowKernel`); reduction: "mean", "sum" or "none";
    inplace_backward: the gradient overwrites the logits' storage.
    """

    row_kernel: OpRowKernel
    reduction: str
    inplace_backward: bool = False


class RowLossFunction(torch.autograd.Function):
    """autograd Function over prepared inputs: logits [N, V] with unit stride along V, labels [N], token weights
    [N] in the accumulation dtype or None, the caller's normalizer as a 0-dim float tensor or None, and a
    :class:`RowLossConfig`. ``SmoothedGALossFunction`` and ``TokenLossFunction`` are this Function.
    """

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        labels: torch.Tensor,
        token_weights: Optional[torch.Tensor],
        normalizer: Optional[torch.Tensor],
        config: RowLossConfig,
    ) -> torch.Tensor:
        kernel = config.row_kernel
        acc_dtype = accumulation_dtype(logits.dtype)
        if config.reduction == "mean":
            grad_norm = inverse_divisor(labels, kernel.ignore_index, normalizer, acc_dtype)
        else:
            grad_norm = torch.ones((), dtype=acc_dtype, device=logits.device)
        grad_buffer = None
        if ctx.needs_input_grad[0]:
            grad_buffer = logits if config.inplace_backward else torch.empty_like(logits)
        row_loss = kernel.rows(logits, labels, token_weights, grad_norm, grad_buffer)
        ctx.backend = kernel.backend
        ctx.loss_name = kernel.loss_name
        ctx.backward_done = False
        ctx.save_for_backward(grad_buffer)
        return reduce_rows(row_loss, config.reduction, grad_norm)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.backward_done:
            raise RuntimeError(
                f"{ctx.loss_name}: backward can run only once per forward (the gradient buffer is scaled in place)"
            )
        ctx.backward_done = True
        (grad,) = ctx.saved_tensors
        ops.scale_rows_(grad, grad_output, ctx.backend)
        return grad, None, None, None, None
