"""The Triton kernels of the smoothed-GA loss over logits, and their launchers.

One program per token row. Sweep 1 streams the row once and keeps, in fp32 registers, the online max m,
the rescaled sum of exponentials s and the sum of logits; the target logit is one scalar load. Sweep 2
re-reads the row (from L2 when rows are scheduled well) and writes the gradient, because the per-token
weights are known at forward time. Backward is only a scale by grad_output, skipped on the device when
grad_output == 1 (no host sync).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _round_for_store(x, out_dtype: tl.constexpr, EXPLICIT_BF16_RTNE: tl.constexpr):
    """Round x to out_dtype to nearest-even. The GPU's conversion does that natively; Triton's CPU interpreter
    truncates float32 -> bfloat16, so there the rounding is done on the bits: add 0x7FFF plus the lowest kept
    bit, then keep the high 16 bits."""
    if EXPLICIT_BF16_RTNE and out_dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(out_dtype)


@triton.jit
def _smoothed_ga_rows_kernel(
    logits_ptr,
    logits_row_stride,
    labels_ptr,
    weights_ptr,
    grad_norm_ptr,
    grad_ptr,
    grad_row_stride,
    row_loss_ptr,
    num_rows,
    vocab_size,
    smoothing,
    sign,
    ignore_index,
    HAS_WEIGHTS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    EXPLICIT_BF16_RTNE: tl.constexpr,
):
    """Loss and gradient of token rows. Persistent grid: program p takes rows p, p + P, p + 2P, ... so that only
    P rows are in flight and the second sweep of each row finds it in L2."""
    grad_norm = tl.load(grad_norm_ptr).to(ACC_DTYPE)
    for row_index in range(tl.program_id(0), num_rows, tl.num_programs(0)):
        row = tl.cast(row_index, tl.int64)  # int64 row offsets: N * V may exceed 2**31
        logits_row = logits_ptr + row * logits_row_stride
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        safe_label = tl.where(valid, label, 0)
        cols = tl.arange(0, BLOCK_V)

        # Sweep 1: m = running max, sum_exp = sum exp(z - m), sum_z = sum z, all in ACC_DTYPE.
        running_max = tl.full((), float("-inf"), ACC_DTYPE)
        sum_exp = tl.zeros((), ACC_DTYPE)
        sum_z = tl.zeros((), ACC_DTYPE)
        for start in range(0, vocab_size, BLOCK_V):
            offsets = start + cols
            in_vocab = offsets < vocab_size
            z = tl.load(logits_row + offsets, mask=in_vocab, other=float("-inf")).to(ACC_DTYPE)
            new_max = tl.maximum(running_max, tl.max(z, 0))
            # a block (or prefix) of only -inf must not give exp(-inf - -inf) = NaN: shift by 0 instead
            shift = tl.where(new_max == float("-inf"), 0.0, new_max).to(ACC_DTYPE)
            sum_exp = sum_exp * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift), 0)
            sum_z += tl.sum(tl.where(in_vocab, z, 0.0), 0)
            running_max = new_max
        lse = running_max + tl.log(sum_exp)

        # l = lse - (1 - eps) z_y - (eps / V) sum_v z_v; a term with a zero factor is dropped, never 0 * inf.
        target_logit = tl.load(logits_row + safe_label).to(ACC_DTYPE)
        smoothing_per_class = smoothing / vocab_size
        loss = lse
        loss -= tl.where(smoothing != 1.0, (1.0 - smoothing) * target_logit, 0.0)
        loss -= tl.where(smoothing != 0.0, smoothing_per_class * sum_z, 0.0)
        weight = 1.0
        if HAS_WEIGHTS:
            weight = tl.load(weights_ptr + row).to(ACC_DTYPE)
        coef = sign * weight
        tl.store(row_loss_ptr + row, tl.where(valid, coef * loss, 0.0))

        if WRITE_GRAD:
            # Sweep 2 (soon after sweep 1 of the same row, so mostly from L2): dL/dz_v =
            # s * w * grad_norm * (p_v - (1 - eps) [v == y] - eps / V), computed in ACC_DTYPE (the target column
            # too) and rounded once to the buffer's dtype.
            grad_coef = tl.where(valid, coef * grad_norm, 0.0)
            grad_row = grad_ptr + row * grad_row_stride
            for start in range(0, vocab_size, BLOCK_V):
                offsets = start + cols
                in_vocab = offsets < vocab_size
                z = tl.load(logits_row + offsets, mask=in_vocab, other=0.0).to(ACC_DTYPE)
                grad = tl.exp(z - lse) - smoothing_per_class
                grad = tl.where(offsets == safe_label, grad - (1.0 - smoothing), grad)
                grad = tl.where(valid, grad * grad_coef, 0.0)
                grad = _round_for_store(grad, grad_ptr.dtype.element_ty, EXPLICIT_BF16_RTNE)
                tl.store(grad_row + offsets, grad, mask=in_vocab)


@triton.jit
def _scale_rows_kernel(
    grad_ptr,
    grad_row_stride,
    grad_output_ptr,
    vocab_size,
    PER_ROW: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    EXPLICIT_BF16_RTNE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if PER_ROW:
        factor = tl.load(grad_output_ptr + row).to(ACC_DTYPE)
    else:
        factor = tl.load(grad_output_ptr).to(ACC_DTYPE)
    if factor != 1.0:  # decided on the device: loss.backward() (factor 1) touches no memory
        grad_row = grad_ptr + row * grad_row_stride
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, vocab_size, BLOCK_V):
            offsets = start + cols
            in_vocab = offsets < vocab_size
            grad = tl.load(grad_row + offsets, mask=in_vocab, other=0.0).to(ACC_DTYPE)
            scaled = _round_for_store(grad * factor, grad_ptr.dtype.element_ty, EXPLICIT_BF16_RTNE)
            tl.store(grad_row + offsets, scaled, mask=in_vocab)


_ACC_DTYPES = {torch.float64: tl.float64}


PROGRAMS_PER_SM = 2  # rows in flight per SM in the persistent grid (bench/NOTES.md: to be tuned on a GPU)


def _launch_config(vocab_size: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 16 KB of logits per block on a GPU; in the interpreter, bigger blocks mean fewer
    Python-level iterations, so take the whole row up to 2**15 elements."""
    if interpreter_enabled():
        return min(triton.next_power_of_2(vocab_size), 1 << 15), 1
    block = min(triton.next_power_of_2(vocab_size), 16384 // element_size)
    return block, 8 if block >= 4096 else 4


def _persistent_programs(num_rows: int, device: torch.device) -> int:
    """How many programs the persistent grid launches: a few per SM on a GPU; every row its own program in
    the interpreter, where nothing runs concurrently anyway."""
    if device.type != "cuda":
        return num_rows
    return min(num_rows, torch.cuda.get_device_properties(device).multi_processor_count * PROGRAMS_PER_SM)


def rows_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    grad_norm: torch.Tensor,
    grad_buffer: Optional[torch.Tensor],
    smoothing: float,
    sign: float,
    ignore_index: int,
) -> torch.Tensor:
    """Triton launch with the contract of :func:`sga.kernels.torch_backend.rows_forward`.

    logits [N, V] with unit stride along V; grad_buffer [N, V] with unit stride along V (it may be logits).
    """
    num_rows, vocab_size = logits.shape
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    row_loss = torch.empty(num_rows, dtype=acc_dtype, device=logits.device)
    if num_rows == 0:
        return row_loss
    block_v, num_warps = _launch_config(vocab_size, logits.element_size())
    _smoothed_ga_rows_kernel[(_persistent_programs(num_rows, logits.device),)](
        logits,
        logits.stride(0),
        labels,
        weights if weights is not None else row_loss,  # never read when HAS_WEIGHTS is False
        grad_norm,
        grad_buffer if grad_buffer is not None else logits,  # never written when WRITE_GRAD is False
        grad_buffer.stride(0) if grad_buffer is not None else 0,
        row_loss,
        num_rows,
        vocab_size,
        float(smoothing),
        float(sign),
        int(ignore_index),
        HAS_WEIGHTS=weights is not None,
        WRITE_GRAD=grad_buffer is not None,
        ACC_DTYPE=_ACC_DTYPES.get(logits.dtype, tl.float32),
        BLOCK_V=block_v,
        EXPLICIT_BF16_RTNE=interpreter_enabled(),
        num_warps=num_warps,
    )
    return row_loss


def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output (0-dim, or one factor per row), in place; rows with factor 1 are not touched."""
    num_rows, vocab_size = grad.shape
    if num_rows == 0:
        return
    block_v, num_warps = _launch_config(vocab_size, grad.element_size())
    _scale_rows_kernel[(num_rows,)](
        grad,
        grad.stride(0),
        grad_output.contiguous(),
        vocab_size,
        PER_ROW=grad_output.dim() != 0,
        ACC_DTYPE=_ACC_DTYPES.get(grad.dtype, tl.float32),
        BLOCK_V=block_v,
        EXPLICIT_BF16_RTNE=interpreter_enabled(),
        num_warps=num_warps,
    )
