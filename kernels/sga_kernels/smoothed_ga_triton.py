"""The Triton kernel of the smoothed-GA loss over logits (``docs/design.md``, section 2.1), and its launcher.

It runs on the persistent grid of ``triton_launch`` (only a few rows in flight, so that sweep 2 of a row finds it
in L2). Per row:

- ignored rows (label == ignore_index) read no logits; their gradient row is written as zeros (or not at all
  when the caller's buffer is already zero);
- sweep 1 streams the row once (software-pipelined) and keeps, in fp32 registers, the online max m, the sum of
  exponentials over v != y (so that the target's p_y - 1 = -sum_{v != y} p_v has no cancellation when p_y ~ 1)
  and, only with smoothing, the sum of logits; exponentials are exp2 of one FMA, log2(e) folded in;
- sweep 2 re-reads the row (optionally last block first, the one still in L2) and writes
  c * (p_v - eps / V) for every column; the target column is then fixed up by one scalar store, computed in fp32
  from the live max and sum (never a read-modify-write of the rounded value);
- a single-block variant keeps the whole row in registers (V <= 2**15), so each logit is read from HBM once.

Raw logits x become z = softcap(logit_scale * x), softcap(u) = c tanh(u / c), inside the kernel; the gradient
written is dL/dx = logit_scale * dL/dz * (1 - tanh^2). Backward is only a scale by grad_output
(``triton_launch.scale_rows_``). The launch configurations live in ``tuning``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import check_logit_scale, check_softcap
from .triton_launch import interpreter_enabled, launch_config, launch_rows, round_for_store
from .tuning import KernelConfig


@triton.jit
def _exp2(x, FTZ: tl.constexpr):
    """2**x; FTZ: the bare MUFU.EX2 (flush-to-zero, no denormal fix-up instructions)."""
    if FTZ:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.exp2(x)


@triton.jit
def _softcapped(x, softcap, logit_scale, HAS_SOFTCAP: tl.constexpr):
    """(w, dz/du): without softcap w = x (logit_scale is folded into the exp2 factor and the final sums) and
    dz/du = 1; with it w = z = c tanh(u / c), u = logit_scale * x, and dz/du = 1 - tanh^2(u / c).

    tanh(a) = (1 - t) / (1 + t), t = exp(-2|a|), and 1 - tanh^2 = 4t / (1 + t)^2 (no cancellation as |a| grows);
    for |a| < 1/8 the odd Taylor series a - a^3/3 + 2a^5/15 - 17a^7/315 (1 - t would cancel there)."""
    if HAS_SOFTCAP:
        a = x * (logit_scale / softcap)
        magnitude = tl.abs(a)
        t = tl.exp2(magnitude * (-2.0 * 1.4426950408889634))
        a2 = a * a
        small = magnitude * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
        tanh_magnitude = tl.where(magnitude < 0.125, small, (1.0 - t) / (1.0 + t))
        tanh = tl.where(a < 0, -tanh_magnitude, tanh_magnitude)
        dz_du = tl.where(magnitude < 0.125, 1.0 - small * small, 4.0 * t / ((1.0 + t) * (1.0 + t)))
        w = softcap * tanh
    else:
        w = x
        dz_du = tl.full(x.shape, 1.0, x.dtype)
    return w, dz_du


@triton.jit
def _sweep1_block(x, is_target, in_vocab, running_max, sum_exp_others, sum_w, exp2_factor, softcap, logit_scale,
                  HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, MASKED: tl.constexpr, FTZ: tl.constexpr):
    """Online update of (m, sum_{v != y} 2^(K (w_v - m)), sum_v w_v) by one block of raw logits x."""
    w, _ = _softcapped(x, softcap, logit_scale, HAS_SOFTCAP)
    if MASKED:
        w = tl.where(in_vocab, w, float("-inf"))  # after the softcap: a masked lane is -inf, never -softcap
    new_max = tl.maximum(running_max, tl.max(w, 0))
    # a block (or prefix) of only -inf must not give 2^(-inf - -inf) = NaN: shift by 0 instead
    shift = tl.where(new_max == float("-inf"), 0.0, new_max) * exp2_factor
    exps = tl.where(is_target, 0.0, _exp2(w * exp2_factor - shift, FTZ))
    sum_exp_others = sum_exp_others * _exp2(running_max * exp2_factor - shift, FTZ) + tl.sum(exps, 0)
    if HAS_SMOOTHING:
        if MASKED:
            w = tl.where(in_vocab, w, 0.0)
        sum_w += tl.sum(w, 0)
    return new_max, sum_exp_others, sum_w


@triton.jit
def _sweep2_block(logits_row, grad_row, offsets, in_vocab, lse2, exp2_factor, grad_coef, grad_shift, softcap,
                  logit_scale, out_dtype: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr,
                  FTZ: tl.constexpr, EVICT: tl.constexpr, STORE_CACHE: tl.constexpr,
                  EXPLICIT_BF16_RTNE: tl.constexpr):
    """dL/dx_v = c' (p_v - eps / V) [* dz/du] for one block, p_v = 2^(K w_v - lse2); c' = s w grad_norm scale."""
    if MASKED:
        x = tl.load(logits_row + offsets, mask=in_vocab, other=0.0, eviction_policy=EVICT).to(grad_coef.dtype)
    else:
        x = tl.load(logits_row + offsets, eviction_policy=EVICT).to(grad_coef.dtype)
    w, dz_du = _softcapped(x, softcap, logit_scale, HAS_SOFTCAP)
    grad = _exp2(w * exp2_factor - lse2, FTZ) * grad_coef - grad_shift
    if HAS_SOFTCAP:
        grad = grad * dz_du
    grad = round_for_store(grad, out_dtype, EXPLICIT_BF16_RTNE)
    if MASKED:
        tl.store(grad_row + offsets, grad, mask=in_vocab, cache_modifier=STORE_CACHE)
    else:
        tl.store(grad_row + offsets, grad, cache_modifier=STORE_CACHE)


@triton.jit
def smoothed_ga_rows_kernel(
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
    softcap,
    logit_scale,
    HAS_WEIGHTS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ZERO_IGNORED_ROWS: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    REVERSE_SWEEP2: tl.constexpr,
    CACHE_HINTS: tl.constexpr,
    FTZ_EXP2: tl.constexpr,
    EXPLICIT_BF16_RTNE: tl.constexpr,
):
    """Loss (and gradient) of token rows; see the module docstring for the sweeps."""
    EVICT_KEEP: tl.constexpr = "evict_last" if CACHE_HINTS else ""
    EVICT_DROP: tl.constexpr = "evict_first" if CACHE_HINTS else ""
    STORE_CACHE: tl.constexpr = ".cs" if CACHE_HINTS else ""
    out_dtype: tl.constexpr = grad_ptr.dtype.element_ty
    grad_norm = tl.load(grad_norm_ptr).to(ACC_DTYPE)
    # 2^(K w) = e^z: K = log2(e) * logit_scale without softcap (w = x), log2(e) with it (w = z); z = scale_w * w
    if HAS_SOFTCAP:
        exp2_factor = tl.full((), 1.4426950408889634, ACC_DTYPE)
        scale_w = tl.full((), 1.0, ACC_DTYPE)
    else:
        exp2_factor = tl.cast(logit_scale, ACC_DTYPE) * 1.4426950408889634
        scale_w = tl.cast(logit_scale, ACC_DTYPE)
    smoothing_per_class = tl.cast(smoothing, ACC_DTYPE) / vocab_size
    cols = tl.arange(0, BLOCK_V)
    full_end = (vocab_size // BLOCK_V) * BLOCK_V  # blocks before full_end need no mask: the tail is peeled
    for row_index in range(tl.program_id(0), num_rows, tl.num_programs(0)):
        row = tl.cast(row_index, tl.int64)  # int64 row offsets: N * V may exceed 2**31
        logits_row = logits_ptr + row * logits_row_stride
        grad_row = grad_ptr + row * grad_row_stride
        label = tl.load(labels_ptr + row).to(tl.int32)
        loss = tl.zeros((), ACC_DTYPE)
        if label != ignore_index:
            # the target logit is read before any program's barrier below, so an in-place gradient store can
            # never overwrite it before every warp has read it
            target_w, target_dz_du = _softcapped(tl.load(logits_row + label).to(ACC_DTYPE), softcap, logit_scale,
                                                 HAS_SOFTCAP)
            running_max = tl.full((), float("-inf"), ACC_DTYPE)
            sum_exp_others = tl.zeros((), ACC_DTYPE)
            sum_w = tl.zeros((), ACC_DTYPE)
            if SINGLE_BLOCK:
                in_vocab = cols < vocab_size
                x_row = tl.load(logits_row + cols, mask=in_vocab, other=0.0).to(ACC_DTYPE)
                running_max, sum_exp_others, sum_w = _sweep1_block(
                    x_row, cols == label, in_vocab, running_max, sum_exp_others, sum_w, exp2_factor, softcap,
                    logit_scale, HAS_SOFTCAP, HAS_SMOOTHING, True, FTZ_EXP2)
            else:
                for start in tl.range(0, full_end, BLOCK_V, num_stages=NUM_STAGES):
                    x = tl.load(logits_row + start + cols, eviction_policy=EVICT_KEEP).to(ACC_DTYPE)
                    running_max, sum_exp_others, sum_w = _sweep1_block(
                        x, cols == label - start, cols < BLOCK_V, running_max, sum_exp_others, sum_w, exp2_factor,
                        softcap, logit_scale, HAS_SOFTCAP, HAS_SMOOTHING, False, FTZ_EXP2)
                if full_end < vocab_size:
                    in_vocab = full_end + cols < vocab_size
                    x = tl.load(logits_row + full_end + cols, mask=in_vocab, other=0.0,
                                eviction_policy=EVICT_KEEP).to(ACC_DTYPE)
                    running_max, sum_exp_others, sum_w = _sweep1_block(
                        x, cols == label - full_end, in_vocab, running_max, sum_exp_others, sum_w, exp2_factor,
                        softcap, logit_scale, HAS_SOFTCAP, HAS_SMOOTHING, True, FTZ_EXP2)
            # S = sum_{v != y} + the target's own term, an addition of positives (no cancellation)
            shift = tl.where(running_max == float("-inf"), 0.0, running_max) * exp2_factor
            sum_exp = sum_exp_others + _exp2(target_w * exp2_factor - shift, FTZ_EXP2)
            lse2 = shift + tl.log2(sum_exp)  # log2 sum 2^(K w) = lse / ln 2
            # l = lse - (1 - eps) z_y - (eps / V) sum_v z_v; a term with a zero factor is dropped, never 0 * inf
            loss = lse2 * 0.6931471805599453
            loss -= tl.where(smoothing != 1.0, (1.0 - smoothing) * (scale_w * target_w), 0.0)
            if HAS_SMOOTHING:
                loss -= smoothing_per_class * (scale_w * sum_w)
            weight = 1.0
            if HAS_WEIGHTS:
                weight = tl.load(weights_ptr + row).to(ACC_DTYPE)
            coef = sign * weight
            loss = coef * loss
            if WRITE_GRAD:
                # dL/dx_v = c (p_v - eps / V - (1 - eps) [v == y]) * logit_scale [* dz/du], c = s w grad_norm;
                # the target column: p_y - 1 = -sum_{v != y} p_v, so its value is -S_others / S + eps - eps / V
                grad_coef = coef * grad_norm * logit_scale
                grad_shift = grad_coef * smoothing_per_class
                target_grad = (grad_coef * (smoothing - smoothing_per_class - sum_exp_others / sum_exp)
                               * target_dz_du)
                tl.debug_barrier()  # every warp has read its logits (the target's too) before any store
                if SINGLE_BLOCK:
                    w, dz_du = _softcapped(x_row, softcap, logit_scale, HAS_SOFTCAP)
                    grad = _exp2(w * exp2_factor - lse2, FTZ_EXP2) * grad_coef - grad_shift
                    if HAS_SOFTCAP:
                        grad = grad * dz_du
                    grad = tl.where(cols == label, target_grad, grad)
                    tl.store(grad_row + cols, round_for_store(grad, out_dtype, EXPLICIT_BF16_RTNE), mask=in_vocab)
                else:
                    num_full = vocab_size // BLOCK_V
                    if REVERSE_SWEEP2:  # the tail and the last blocks are the most recently read ones
                        if full_end < vocab_size:
                            _sweep2_block(logits_row, grad_row, full_end + cols, full_end + cols < vocab_size, lse2,
                                          exp2_factor, grad_coef, grad_shift, softcap, logit_scale, out_dtype,
                                          HAS_SOFTCAP, True, FTZ_EXP2, EVICT_DROP, STORE_CACHE, EXPLICIT_BF16_RTNE)
                    for block in range(0, num_full):
                        start = block * BLOCK_V
                        if REVERSE_SWEEP2:
                            start = (num_full - 1 - block) * BLOCK_V
                        _sweep2_block(logits_row, grad_row, start + cols, cols < BLOCK_V, lse2, exp2_factor,
                                      grad_coef, grad_shift, softcap, logit_scale, out_dtype, HAS_SOFTCAP, False,
                                      FTZ_EXP2, EVICT_DROP, STORE_CACHE, EXPLICIT_BF16_RTNE)
                    if not REVERSE_SWEEP2:
                        if full_end < vocab_size:
                            _sweep2_block(logits_row, grad_row, full_end + cols, full_end + cols < vocab_size, lse2,
                                          exp2_factor, grad_coef, grad_shift, softcap, logit_scale, out_dtype,
                                          HAS_SOFTCAP, True, FTZ_EXP2, EVICT_DROP, STORE_CACHE, EXPLICIT_BF16_RTNE)
                    tl.debug_barrier()  # the target column's store lands after the block store that covered it
                    tl.store(grad_row + label, round_for_store(target_grad, out_dtype, EXPLICIT_BF16_RTNE))
        elif WRITE_GRAD:
            if ZERO_IGNORED_ROWS:  # no logits read; zeros written (skipped when the caller's buffer is zero)
                zeros = tl.zeros((BLOCK_V,), out_dtype)
                for start in range(0, vocab_size, BLOCK_V):
                    tl.store(grad_row + start + cols, zeros, mask=start + cols < vocab_size)
        tl.store(row_loss_ptr + row, loss)


def rows_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    grad_norm: torch.Tensor,
    grad_buffer: Optional[torch.Tensor],
    smoothing: float,
    sign: float,
    ignore_index: int,
    *,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    grad_buffer_zeroed: bool = False,
    config: Optional[KernelConfig] = None,
) -> torch.Tensor:
    """Triton launch with the contract of :func:`sga.kernels.smoothed_ga_torch.rows_forward`.

    logits [N, V] raw logits x with unit stride along V; the loss is taken on z = softcap(logit_scale * x)
    (softcap(u) = c tanh(u / c), identity when softcap is None) and the gradient written into grad_buffer
    ([N, V], unit stride along V, may be logits) is dL/dx = logit_scale * dL/dz * (1 - tanh^2).
    grad_buffer_zeroed: the caller's buffer already holds zeros, so ignored rows are not written.
    config: a launch configuration from ``tuning`` (default: the tuning table's choice).
    """
    check_softcap(softcap)
    check_logit_scale(logit_scale)
    vocab_size = logits.shape[1]
    if config is None:
        config = launch_config(vocab_size, logits.dtype, logits.device)
    if config.single_block and config.block_v < vocab_size:
        raise ValueError(f"single-block config with block_v={config.block_v} cannot hold a row of V={vocab_size}")
    scalars = (
        float(smoothing),
        float(sign),
        int(ignore_index),
        float(softcap) if softcap is not None else 1.0,
        float(logit_scale),
    )
    return launch_rows(
        smoothed_ga_rows_kernel,
        logits,
        labels,
        weights,
        grad_norm,
        grad_buffer,
        scalars,
        config,
        ZERO_IGNORED_ROWS=not grad_buffer_zeroed,
        HAS_SMOOTHING=smoothing != 0.0,
        HAS_SOFTCAP=softcap is not None,
        SINGLE_BLOCK=config.single_block,
        NUM_STAGES=config.num_stages,
        REVERSE_SWEEP2=config.reverse_sweep2,
        CACHE_HINTS=config.cache_hints,
        FTZ_EXP2=config.ftz_exp2 and not interpreter_enabled() and logits.dtype != torch.float64,
    )
