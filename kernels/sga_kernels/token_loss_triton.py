"""The Triton kernel of the token-rule losses: one kernel for every rule of ``token_rules``.

One program per token row (the persistent grid of ``triton_launch``). Sweep 1 streams the row once and keeps,
in fp32 registers, the statistics of ``token_rules`` over the non-target classes (the target lane masked to
-inf): the running max z_k and its index k, sum exp(z - z_k) and sum exp(z - z_k) z (rescaled online), and
sum z over the whole row; the target logit is one scalar load. The rule, a ``@triton.jit`` function passed as
the constexpr RULE, maps them to the row loss and the gradient coefficients (A, B, C, E, F); sweep 2 re-reads
the row and writes dL/dz_v = w * grad_norm * (A p_v + B [v == y] + C [v == k] + E q_v + F) in ACC_DTYPE,
rounded once to the buffer's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .token_rules import TokenRule
from .triton_launch import launch_config, launch_rows, round_for_store


@triton.jit
def token_rule_rows_kernel(
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
    param0,
    param1,
    ignore_index,
    RULE: tl.constexpr,
    USES_Q: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    EXPLICIT_BF16_RTNE: tl.constexpr,
):
    grad_norm = tl.load(grad_norm_ptr).to(ACC_DTYPE)
    for row_index in range(tl.program_id(0), num_rows, tl.num_programs(0)):
        row = tl.cast(row_index, tl.int64)  # int64 row offsets: N * V may exceed 2**31
        logits_row = logits_ptr + row * logits_row_stride
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        safe_label = tl.where(valid, label, 0)
        cols = tl.arange(0, BLOCK_V)

        # Sweep 1, over the non-target lanes: z_k = running max, k its index, sum_exp = sum exp(z - z_k),
        # sum_exp_z = sum exp(z - z_k) z; over all lanes: sum_z.
        top = tl.full((), float("-inf"), ACC_DTYPE)
        top_index = tl.where(safe_label == 0, 1, 0).to(tl.int64)  # a non-target index, even if all are -inf
        sum_exp = tl.zeros((), ACC_DTYPE)
        sum_exp_z = tl.zeros((), ACC_DTYPE)
        sum_z = tl.zeros((), ACC_DTYPE)
        for start in range(0, vocab_size, BLOCK_V):
            offsets = start + cols
            in_vocab = offsets < vocab_size
            z = tl.load(logits_row + offsets, mask=in_vocab, other=0.0).to(ACC_DTYPE)
            sum_z += tl.sum(tl.where(in_vocab, z, 0.0), 0)
            z_other = tl.where(in_vocab & (offsets != safe_label), z, float("-inf"))
            block_top = tl.max(z_other, 0)
            block_index = tl.argmax(z_other, 0).to(tl.int64) + start
            top_index = tl.where(block_top > top, block_index, top_index)
            new_top = tl.maximum(top, block_top)
            # a block (or prefix) of only -inf must not give exp(-inf - -inf) = NaN: shift by 0 instead
            shift = tl.where(new_top == float("-inf"), 0.0, new_top).to(ACC_DTYPE)
            rescale = tl.exp(top - shift)
            exp_other = tl.exp(z_other - shift)
            sum_exp = sum_exp * rescale + tl.sum(exp_other, 0)
            sum_exp_z = sum_exp_z * rescale + tl.sum(exp_other * tl.where(z_other == float("-inf"), 0.0, z_other), 0)
            top = new_top
        target_logit = tl.load(logits_row + safe_label).to(ACC_DTYPE)
        top_shift = tl.where(top == float("-inf"), 0.0, top).to(ACC_DTYPE)
        lse_u = top_shift + tl.log(sum_exp)
        pair_max = tl.maximum(lse_u, target_logit)
        pair_shift = tl.where(pair_max == float("-inf"), 0.0, pair_max).to(ACC_DTYPE)
        lse = pair_shift + tl.log(tl.exp(lse_u - pair_shift) + tl.exp(target_logit - pair_shift))
        mean_q_z = tl.where(sum_exp > 0.0, sum_exp_z / tl.maximum(sum_exp, 1e-30), 0.0)

        loss, coef_a, coef_b, coef_c, coef_e, coef_f = RULE(
            target_logit, lse, lse_u, top, mean_q_z, sum_z, vocab_size, param0, param1
        )
        weight = 1.0
        if HAS_WEIGHTS:
            weight = tl.load(weights_ptr + row).to(ACC_DTYPE)
        tl.store(row_loss_ptr + row, tl.where(valid, weight * loss, 0.0))

        if WRITE_GRAD:
            # Sweep 2 (soon after sweep 1 of the same row, so mostly from L2)
            scale = tl.where(valid, weight * grad_norm, 0.0)
            lse_shift = tl.where(lse == float("-inf"), 0.0, lse).to(ACC_DTYPE)
            q_shift = tl.where(lse_u == float("-inf"), 0.0, lse_u).to(ACC_DTYPE)
            grad_row = grad_ptr + row * grad_row_stride
            for start in range(0, vocab_size, BLOCK_V):
                offsets = start + cols
                in_vocab = offsets < vocab_size
                z = tl.load(logits_row + offsets, mask=in_vocab, other=0.0).to(ACC_DTYPE)
                is_target = offsets == safe_label
                grad = coef_a * tl.exp(z - lse_shift) + coef_f
                if USES_Q:
                    grad += tl.where(is_target, 0.0, coef_e * tl.exp(z - q_shift))
                grad = tl.where(is_target, grad + coef_b, grad)
                grad = tl.where(offsets == top_index, grad + coef_c, grad)
                grad = tl.where(valid, grad * scale, 0.0)
                grad = round_for_store(grad, grad_ptr.dtype.element_ty, EXPLICIT_BF16_RTNE)
                tl.store(grad_row + offsets, grad, mask=in_vocab)


def rows_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    grad_norm: torch.Tensor,
    grad_buffer: Optional[torch.Tensor],
    rule: TokenRule,
    param0: float,
    param1: float,
    ignore_index: int,
) -> torch.Tensor:
    """Triton launch with the contract of :func:`sga.kernels.token_loss_torch.rows_forward`.

    logits [N, V] with unit stride along V; grad_buffer [N, V] with unit stride along V (it may be logits).
    """
    # the smoothed-GA kernel's launch configuration; the rule kernel always loops over blocks of block_v
    config = launch_config(logits.shape[1], logits.dtype, logits.device)
    return launch_rows(
        token_rule_rows_kernel,
        logits,
        labels,
        weights,
        grad_norm,
        grad_buffer,
        (float(param0), float(param1), int(ignore_index)),
        config,
        RULE=rule.triton_form,
        USES_Q=rule.uses_q,
    )
