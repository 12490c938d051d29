"""The smoothed-GA loss straight from hidden states and an LM head, never holding the [N, V] logits.

    z = softcap(h @ W^T + b),  softcap(x) = c * tanh(x / c)      (Gemma 2; no cap when softcap is None)
    l = lse(z) - (1 - eps) z_y - (eps / V) sum_v z_v ;  L = s * w * l          (DESIGN.md 2.1)

Chunked algorithm (the only one; every backend): the N token rows go through in chunks of R rows. Per chunk
    Z    = H_c @ W^T + b               one GEMM into an [R, V] buffer (one chunk's at a time)
    t    = tanh(Z / c), Zc = c * t      (softcap only: t stays in the first buffer, Zc goes to a second one)
    G    = dL/dZc                       the row kernel ``sga::smoothed_ga_rows``, in place over Zc
    G   *= 1 - t^2                      (softcap only) chain rule: dL/dZ = dL/dZc * (1 - tanh^2(Z / c))
    dH_c = G @ W                        rows of dH, each written once
    dW  += G^T @ H_c,  db += sum_r G    accumulated in float32 (float64 for float64 input) across chunks
The row kernel runs with grad_norm = 1, so G = s w (softmax(z) - (1 - eps) 1_y - eps / V) is not divided by D
(no underflow of p / D in a float16 buffer); dH, dW and db are multiplied by 1 / D once, after the loop.

Precision. The GEMMs and the chunk buffers use the compute dtype: the inputs' dtype, or the autocast dtype
under ``torch.autocast`` (then hidden, W and b keep their own dtype as inputs and are cast inside, once per
pass, and dH, dW, db come back in their dtypes). dW is accumulated in float32 (float64 for float64 input):
- float32 weight (float32 master weights under bf16 autocast, the usual mixed-precision training): the
  accumulator is the returned gradient itself;
- bfloat16 / float16 weight: a float32 [V, D] accumulator (4 V D bytes), cast once at the end
  (DESIGN.md 3), or, with ``accumulate_in_float32=False``, the returned gradient in the weight's dtype with one
  rounding per chunk (no [V, D] buffer; what memory-lean fused losses do).

Memory beyond inputs and gradients: one [R, V] buffer in the compute dtype (two with softcap), the row kernel's
bounded float32 temporaries, the rounded dW product of one vocabulary block when dW is accumulated in a wider
dtype than the GEMMs' (no larger than one chunk buffer), the float32 dW accumulator of a low-precision weight
(unless accumulate_in_float32=False), and under autocast the cast copies of hidden and W for the pass.

Like the logits kernel, the gradient is computed in the forward pass when the loss is reduced to a scalar
(D is known there) and backward only scales it by grad_output, in place. Reduction "none" has a per-token
grad_output, which dW = sum_r g_r G_r^T h_r cannot absorb afterwards, so there backward runs the chunked pass
again with token weights w * grad_output; a second backward through a retained graph recomputes the same way.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch.autograd.function import once_differentiable

from . import ops
from ._linear_validation import check_chunk_size, check_linear_inputs, check_softcap
from ._validation import (
    check_labels_in_range,
    check_loss_options,
    check_normalizer,
    labels_for_kernels,
    resolve_backend,
)
from .torch_backend import compute_dtype_for

# The chunk buffers together hold about 1 / CHUNK_FRACTION of the full [N, V] logits, but at least
# MIN_CHUNK_ROWS token rows: each chunk streams all of W through three GEMMs (and dW through a read-modify-write),
# so chunks that are too small turn the GEMMs memory-bound (at 512 rows, N = 8192 on CUDA, they are not).
CHUNK_FRACTION = 16
MIN_CHUNK_ROWS = 128

Grads = tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]  # (dH, dW, db)


def default_chunk_rows(num_rows: int, num_buffers: int) -> int:
    """Token rows per chunk: ceil(N / (16 * buffers)) clamped to [128, N]; 1 buffer, or 2 with softcap."""
    rows = -(-num_rows // (CHUNK_FRACTION * num_buffers))
    return max(1, min(num_rows, max(rows, MIN_CHUNK_ROWS)))


@dataclass(frozen=True)
class LinearLossConfig:
    """The scalar parameters of one fused linear loss call, passed through the autograd Function as one object.

    sign is -1.0 for ascent and +1.0 for descent; backend is resolved ("triton" or "torch") and selects the row
    kernel that runs on each chunk; softcap is c or None; chunk_rows is R; compute_dtype is the dtype of the
    GEMMs and chunk buffers (hidden, W, b are cast to it inside); accumulate_in_float32 selects the dW
    accumulator of a low-precision weight (float32 buffer, or the gradient itself in the weight's dtype).
    """

    smoothing: float
    sign: float
    ignore_index: int
    reduction: str
    backend: str
    softcap: Optional[float]
    chunk_rows: int
    compute_dtype: torch.dtype
    accumulate_in_float32: bool = True


def _accumulate_weight_grad(dw: torch.Tensor, grad: torch.Tensor, hidden_chunk: torch.Tensor, block: int) -> None:
    """dW += G^T @ H_c into the accumulator dw.

    Same dtype as the GEMMs: one GEMM straight into dw (for a low-precision dw that is one rounding per chunk).
    A wider dw (float32 accumulator of low-precision GEMMs): GEMMs in the compute precision over blocks of
    `block` vocabulary rows, each rounded product added into dw, so the temporary stays no larger than the
    chunk buffer.
    """
    if dw.dtype == grad.dtype:
        dw.addmm_(grad.t(), hidden_chunk)
        return
    vocab_size = grad.shape[1]
    for start in range(0, vocab_size, block):
        stop = min(start + block, vocab_size)
        dw[start:stop].add_(torch.mm(grad[:, start:stop].t(), hidden_chunk))


def _row_kernel(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_weights: Optional[torch.Tensor],
    unit_norm: torch.Tensor,
    write_grad: bool,
    config: LinearLossConfig,
) -> torch.Tensor:
    """Per-token losses of one chunk of logits; the gradient overwrites the chunk when write_grad.

    One launch of the row kernel for the whole chunk (the torch backend bounds its own float32 temporaries).
    """
    return ops.smoothed_ga_rows(
        logits,
        labels,
        row_weights,
        unit_norm,
        logits if write_grad else None,
        config.smoothing,
        config.sign,
        config.ignore_index,
        config.backend,
    )


def _chunked_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    row_weights: Optional[torch.Tensor],
    config: LinearLossConfig,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, Grads]:
    """One sweep over the token chunks: per-token signed losses [N] and the unnormalized gradients.

    need = (dH, dW, db) flags; a gradient not needed is neither computed nor allocated (None). dH has the hidden
    dtype; dW is the accumulator of sum_r G_r^T h_r (float32 / float64, or the weight's dtype when it is not
    accumulated in float32), db the float32 (float64) accumulator of sum_r G_r.
    """
    num_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    compute_dtype = config.compute_dtype
    acc_dtype = compute_dtype_for(compute_dtype)
    need_hidden, need_weight, need_bias = need
    need_any = need_hidden or need_weight or need_bias
    device = hidden.device

    row_loss = torch.empty(num_rows, dtype=acc_dtype, device=device)
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
    dw_dtype = acc_dtype if config.accumulate_in_float32 else weight.dtype
    dw = torch.zeros(weight.shape, dtype=dw_dtype, device=device) if need_weight else None
    db = torch.zeros(vocab_size, dtype=acc_dtype, device=device) if need_bias else None
    unit_norm = torch.ones((), dtype=acc_dtype, device=device)  # 1 / D is applied to dH, dW, db afterwards

    hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)  # no copy without autocast
    bias_c = None if bias is None else bias.to(compute_dtype)
    dw_block = max(1, min(config.chunk_rows, num_rows) * vocab_size // hidden_size)
    weight_t = weight_c.t()
    for start in range(0, num_rows, config.chunk_rows):
        stop = min(start + config.chunk_rows, num_rows)
        hidden_chunk = hidden_c[start:stop]
        logits = tanh = grad = None  # drop the previous chunk's [R, V] buffers before the next product
        # a fresh [R, V] product per chunk: the allocator hands back the previous chunk's block (CUDA's caching
        # allocator, glibc's heap), and the CPU GEMM writes it directly where out= would go through a temporary
        if bias_c is None:
            logits = torch.mm(hidden_chunk, weight_t)  # Z = H_c W^T
        else:
            logits = torch.addmm(bias_c, hidden_chunk, weight_t)  # Z = H_c W^T + b
        tanh = None
        if config.softcap is not None:
            tanh = logits.div_(config.softcap).tanh_()  # t = tanh(Z / c), kept for the chain rule
            logits = tanh * config.softcap  # Zc = c t
        chunk_weights = None if row_weights is None else row_weights[start:stop]
        # G = dL/dZc overwrites Zc (in place) when a gradient is needed
        row_loss[start:stop] = _row_kernel(logits, labels[start:stop], chunk_weights, unit_norm, need_any, config)
        if not need_any:
            continue
        grad = logits
        if tanh is not None:
            grad.mul_(tanh.square_().neg_().add_(1.0))  # dL/dZ = dL/dZc * (1 - t^2)
        if dh is not None:
            if dh.dtype == compute_dtype:
                torch.mm(grad, weight_c, out=dh[start:stop])  # dH_c = G W
            else:
                dh[start:stop] = torch.mm(grad, weight_c)  # dH_c = G W, cast back to the hidden dtype
        if dw is not None:
            _accumulate_weight_grad(dw, grad, hidden_chunk, dw_block)  # dW += G^T H_c
        if db is not None:
            db.add_(grad.sum(dim=0, dtype=acc_dtype))  # db += sum_r G_r
    return row_loss, (dh, dw, db)


def _normalized(grads: Grads, grad_norm: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Grads:
    """Multiply the accumulated gradients by grad_norm (1 / D, or 1) and cast dW, db to the parameter dtypes."""
    dh, dw, db = grads
    if dh is not None:
        dh.mul_(grad_norm)
    if dw is not None:
        dw = dw.mul_(grad_norm).to(weight.dtype)
    if db is not None:
        db = db.mul_(grad_norm).to(bias.dtype)
    return dh, dw, db


def _grad_norm(
    labels: torch.Tensor, normalizer: Optional[torch.Tensor], config: LinearLossConfig, dtype: torch.dtype
) -> torch.Tensor:
    """1 / D for reduction "mean" (D = non-ignored tokens or the caller's normalizer; D = 0 gives 0), else 1.

    Computed on the device: no host sync.
    """
    if config.reduction != "mean":
        return torch.ones((), dtype=dtype, device=labels.device)
    divisor = (labels != config.ignore_index).sum().to(dtype) if normalizer is None else normalizer.to(dtype)
    return torch.where(divisor != 0, 1.0 / divisor, torch.zeros_like(divisor))


def _reduce(row_loss: torch.Tensor, grad_norm: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return row_loss
    if reduction == "sum":
        return row_loss.sum()
    return row_loss.sum() * grad_norm


class LinearSmoothedGALossFunction(torch.autograd.Function):
    """autograd Function over prepared inputs: hidden [N, D], weight [V, D], bias [V] or None, labels [N]
    (contiguous), token weights [N] in the accumulation dtype or None, the normalizer as a 0-dim tensor or None,
    and a LinearLossConfig.

    Use :func:`linear_smoothed_ga_loss` unless you prepare the inputs yourself.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        labels: torch.Tensor,
        token_weights: Optional[torch.Tensor],
        normalizer: Optional[torch.Tensor],
        config: LinearLossConfig,
    ) -> torch.Tensor:
        grad_norm = _grad_norm(labels, normalizer, config, compute_dtype_for(config.compute_dtype))
        eager = config.reduction != "none"  # a scalar loss: its gradient is known up to grad_output now
        need = tuple(ctx.needs_input_grad[:3]) if eager else (False, False, False)
        row_loss, grads = _chunked_pass(hidden, weight, bias, labels, token_weights, config, need)
        ctx.config = config
        # the gradients are ours (not inputs or outputs): kept as a plain attribute, handed over in backward
        ctx.grads = _normalized(grads, grad_norm, weight, bias) if eager else None
        ctx.save_for_backward(hidden, weight, bias, labels, token_weights, grad_norm)
        return _reduce(row_loss, grad_norm, config.reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        config = ctx.config
        if ctx.grads is not None:
            # scaled in place and handed over once; dropping our reference lets autograd adopt them as .grad
            grads, ctx.grads = ctx.grads, None
            for grad in grads:
                if grad is not None:
                    ops.scale_rows_(grad.view(-1, grad.shape[-1]), grad_output, config.backend)
            return (*grads, None, None, None, None)
        hidden, weight, bias, labels, token_weights, grad_norm = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        if config.reduction == "none":
            # L_r scaled by g_r is the loss of token weight w_r * g_r: dW = sum_r g_r G_r^T h_r in one pass
            factor = grad_output.reshape(-1).to(grad_norm.dtype)
            row_weights = factor if token_weights is None else token_weights * factor
            _, grads = _chunked_pass(hidden, weight, bias, labels, row_weights.contiguous(), config, need)
            return (*_normalized(grads, grad_norm, weight, bias), None, None, None, None)
        # second backward through a retained graph: the same pass and the same scaling as the first one
        _, grads = _chunked_pass(hidden, weight, bias, labels, token_weights, config, need)
        grads = _normalized(grads, grad_norm, weight, bias)
        for grad in grads:
            if grad is not None:
                ops.scale_rows_(grad.view(-1, grad.shape[-1]), grad_output, config.backend)
        return (*grads, None, None, None, None)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for this device type, else None."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def linear_smoothed_ga_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    smoothing: float = 0.0,
    ascent: bool = True,
    token_weights: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Union[None, float, torch.Tensor] = None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    accumulate_in_float32: bool = True,
    validate: bool = True,
) -> torch.Tensor:
    """Smoothed gradient-ascent loss of the logits ``softcap(hidden @ weight.T + bias)``, without materializing them.

    Args:
        hidden: hidden states ``[..., D]`` (float16 / bfloat16 / float32; float64 for gradcheck).
        weight: LM-head weight ``[V, D]`` in the hidden dtype (a tied embedding matrix works as is).
        labels: int32 / int64 class ids with the hidden states' leading shape; ``ignore_index`` marks skipped tokens.
        bias: optional head bias ``[V]`` in the hidden dtype.
        softcap: c of the final logit softcap ``c * tanh(x / c)`` (Gemma 2's ``final_logit_softcapping``), or None.
        smoothing, ascent, token_weights, ignore_index, reduction, normalizer, validate: as in
            :func:`sga.kernels.smoothed_ga_loss`.
        backend: the row kernel run on each chunk of logits: "triton", "torch" or "auto" (triton on CUDA).
            The GEMMs are PyTorch's in every case.
        chunk_size: token rows per chunk (R). Default ceil(N / 16), or ceil(N / 32) with softcap (two chunk
            buffers), clamped to [128, N]: the chunk buffers hold about 1/16 of the full logits (more when
            N < 2048, where the logits are small). Larger chunks stream W through the GEMMs fewer times
            (faster) and cost more memory.
        accumulate_in_float32: for a bfloat16 / float16 weight, accumulate dW across chunks in a float32
            [V, D] buffer (default; 4 V D bytes, as large as the bf16 logits of N = 2 D tokens). False sums
            the chunks' products straight into a bfloat16 gradient: no such buffer, at the cost of one
            rounding per chunk (about sqrt(chunks) / 2 units in the last place); refused for float16 weights
            (the unnormalized sum can overflow float16). No effect for float32 or float64 weights, which always
            accumulate in their own dtype.

    Gradients flow to hidden, weight and bias, each only when it requires grad (a frozen head costs no dW GEMM).
    No host sync happens except the optional label-range check. Under ``torch.autocast`` the GEMMs run in the
    autocast dtype, as ``F.linear``'s would; hidden, weight and bias may then have any of float16 / bfloat16 /
    float32 (float32 master weights get their float32 gradient accumulated directly, with no extra buffer).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or per token (shaped like labels) for reduction "none".
    """
    autocast_dtype = _autocast_dtype(hidden.device.type) if isinstance(hidden, torch.Tensor) else None
    compute_dtype = check_linear_inputs(hidden, weight, bias, labels, token_weights, ignore_index, autocast_dtype)
    softcap = check_softcap(softcap)
    smoothing = check_loss_options(smoothing, reduction, ascent, normalizer)
    chunk_size = check_chunk_size(chunk_size)
    if not isinstance(accumulate_in_float32, bool):
        raise TypeError(f"accumulate_in_float32 must be a bool, got {type(accumulate_in_float32).__name__}")
    if not accumulate_in_float32 and weight.dtype == torch.float16:
        # the chunks' dW products are summed before the 1 / D scaling: float16 (max 65504) can overflow there
        raise ValueError("accumulate_in_float32=False needs a bfloat16 (or float32) weight, not float16")
    resolved_backend = resolve_backend(backend, hidden.device)
    normalizer_tensor = check_normalizer(normalizer, hidden.device)
    vocab_size, hidden_size = weight.shape
    labels = labels_for_kernels(labels, ignore_index)  # int64 when ignore_index does not fit int32 labels
    if validate:
        check_labels_in_range(labels, vocab_size, ignore_index)

    hidden_2d = hidden.reshape(-1, hidden_size)
    num_rows = hidden_2d.shape[0]
    acc_dtype = compute_dtype_for(compute_dtype)
    weights_1d = None
    if token_weights is not None:
        weights_1d = token_weights.detach().reshape(-1).to(acc_dtype).contiguous()
    config = LinearLossConfig(
        smoothing=smoothing,
        sign=-1.0 if ascent else 1.0,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=resolved_backend,
        softcap=softcap,
        chunk_rows=chunk_size or default_chunk_rows(num_rows, 1 if softcap is None else 2),
        compute_dtype=compute_dtype,
        accumulate_in_float32=accumulate_in_float32,
    )
    labels_1d = labels.reshape(-1).contiguous()
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    no_autocast = (
        torch.autocast(hidden.device.type, enabled=False) if autocast_dtype is not None else contextlib.nullcontext()
    )
    with no_autocast:
        if differentiable:
            loss = LinearSmoothedGALossFunction.apply(
                hidden_2d, weight, bias, labels_1d, weights_1d, normalizer_tensor, config
            )
        else:
            row_loss, _ = _chunked_pass(hidden_2d, weight, bias, labels_1d, weights_1d, config, (False, False, False))
            loss = _reduce(row_loss, _grad_norm(labels_1d, normalizer_tensor, config, acc_dtype), reduction)
    if reduction == "none":
        return loss.reshape(labels.shape)
    return loss
