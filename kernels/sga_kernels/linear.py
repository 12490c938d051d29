"""The chunk loop of the fused linear losses: token-level losses straight from hidden states and an LM head,
never holding the [N, V] logits.

    z = softcap(logit_scale * (h @ W^T + b)),  softcap(x) = c * tanh(x / c)    (no cap when softcap is None)
    L_r = row_kernel(z_r, y_r, w_r)                   e.g. s * w * l (docs/design.md, section 2.1)

:func:`fused_linear_rows` runs the loop with any row kernel (a :data:`RowKernel`); the public losses
``linear_smoothed_ga_loss`` (module ``smoothed_ga``) and ``linear_token_loss`` (module ``token_loss``) are this
function with their row kernel. Its options reach :class:`FusedLinearFunction` and the loop as one
:class:`FusedLinearConfig`.

Chunked algorithm (every backend): the M kept token rows (labels != ignore_index, see "Ignored rows") go
through in chunks of R rows. Per chunk
    Z    = a * (H_c @ W^T + b)         one GEMM into the [R, V] workspace (a = logit_scale), reused by every chunk
    t    = tanh(Z / c), Zc = c * t      (softcap only: t stays in the first buffer, Zc goes to a second one)
    G    = dL/dZc                       the row kernel, in place over Zc (unnormalized, token weight applied)
    G   *= 1 - t^2                      (softcap only) chain rule: dL/dZ = dL/dZc * (1 - tanh^2(Z / c))
A row kernel with ``with_softcap`` (the smoothed-GA one) does the middle three lines in its own sweep over Z:
one [R, V] buffer and no extra passes.
    dH_c = G @ W                        rows of dH, each written once (scattered to the kept rows' places)
    dW  += G^T @ H_c,  db += sum_r G    one GEMM accumulating straight into float32 (float64 for float64 input)
dH, dW and db are multiplied once, after the loop, by a / D (D the "mean" divisor, 1 for "sum"); with "sum" and
a = 1 that multiplication is skipped (it would be a full pass over dW).

Ignored rows never reach the GEMMs: only the rows in ``kept_rows`` (an index tensor) are gathered, chunk by
chunk; dH is zero elsewhere. The row count M decides the GEMM shapes and so must be known on the host: pass
``kept_rows`` (the engine builds it with each batch, on the host), or let the loss compute it with one
``nonzero`` (a host sync on CUDA), or opt out with ``skip_ignored=False`` (all N rows go through; no sync).

Chunk rows R (:func:`default_chunk_rows`). The dW update of a chunk reads and writes the float32 [V, D]
accumulator (8 V D bytes) for 2 R V D flops: R / 4 flop per byte, so it is memory bound unless R is about
4x the device's flop-per-byte ridge (~260 on an H100: R ~ 1024). R is therefore as large as the memory budget
of the [R, V] chunk buffers allows (``chunk_budget_bytes``, default 1/16 of the M-row logits, at least 128
rows; 256 for bf16 / fp16 on the CPU, where 16-bit GEMMs need more rows per call), rounded down to a
multiple of 128 and capped at 1024 rows; ``chunk_size`` sets R directly.

Precision. The GEMMs and the chunk buffers use the compute dtype: the inputs' dtype, or the autocast dtype
under ``torch.autocast`` (then hidden, W and b keep their own dtype as inputs and are cast inside, chunk by
chunk for hidden, and dH, dW, db come back in their dtypes). dW is accumulated in float32 (float64 for
float64 input):
- float32 weight (float32 master weights under bf16 autocast, the usual mixed-precision training): the
  accumulator is the returned gradient itself;
- bfloat16 / float16 weight: a float32 [V, D] accumulator (4 V D bytes), cast once at the end (docs/design.md,
  section 3), or, with ``accumulate_in_float32=False``, the returned gradient in the weight's dtype with one
  rounding per chunk (no [V, D] buffer; what memory-lean fused losses do).
A float32 accumulator of low-precision GEMMs is updated by one GEMM with float32 output
(``torch.addmm(..., out_dtype=torch.float32)``, CUDA, where the torch version has it; detected once per
device), else by GEMMs over vocabulary blocks whose rounded products are added (at most 8 MiB and a chunk
buffer each; the CPU path: its torch has no float32-output bf16 GEMM). The GEMMs themselves are
``linear_gemms``'s: on the CPU in float32 they run on oneDNN, which is about 2x MKL's sgemm on the CPU
measured in docs/kernel-notes.md ("v4").

Like the logits kernel, the gradient is computed in the forward pass when the loss is reduced to a scalar
and backward only scales it by grad_output, in place (skipped on CPU tensors when grad_output is exactly 1).
Reduction "none" has a per-token grad_output, which dW = sum_r g_r G_r^T h_r cannot absorb afterwards, so
there backward runs the chunked pass again with token weights w * grad_output (4 GEMMs per token instead of
3); a second backward through a retained graph recomputes the same way.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch.autograd.function import once_differentiable

from . import cpu_routes, linear_gemms, ops
from .checks import (
    IGNORE_INDEX,
    accumulation_dtype,
    check_bool,
    check_chunk_options,
    check_kept_rows,
    check_kept_rows_cover_scored_tokens,
    check_labels_in_range,
    check_linear_inputs,
    check_logit_scale,
    check_normalizer,
    check_reduction,
    check_softcap,
    labels_for_kernels,
)
from .row_loss import inverse_divisor, reduce_rows

# Default memory budget of the chunk buffers: 1 / CHUNK_FRACTION of the kept rows' full logits, but at least
# MIN_CHUNK_ROWS rows; R is a multiple of ROW_MULTIPLE (GEMM tiles) and at most MAX_CHUNK_ROWS (where the
# per-chunk dW update, R / 4 flop per byte, is compute bound on an H100-class GPU; larger only costs memory).
CHUNK_FRACTION = 16
MIN_CHUNK_ROWS = 128
# 16-bit GEMMs on the CPU: at least twice that. Each GEMM call's fixed work (packing W, the dW blocks' float32
# adds) is amortized over R rows, and a bf16 GEMM's flops run ~2.4x faster than float32 ones there; measured
# (bf16, V = 64128, D = 2048, 1 thread): the three GEMMs take 1.2x longer per row at R = 128 than at R = 256
# (docs/kernel-notes.md, fused linear "v4"). Not applied on GPUs (not measured there).
MIN_CHUNK_ROWS_CPU_16BIT = 2 * MIN_CHUNK_ROWS
ROW_MULTIPLE = 128
MAX_CHUNK_ROWS = 1024
# Row blocks of the final scaled cast of a wide dW accumulator on the CPU (:func:`_scaled_cast`): few blocks
# (each is a parallel region), each one's float32 temporary still L3-sized.
CAST_BLOCK_BYTES = 16 << 20

Grads = tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]  # (dH, dW, db)

RowKernel = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], bool], torch.Tensor]
"""``row_kernel(logits[R, V], labels[R], weights[R] or None, write_grad) -> row_loss[R]``.

logits is one chunk in the compute dtype (unit stride along V); labels the chunk's labels; weights its token
weights in the accumulation dtype (float32, float64 for float64 input) or None. Returns the per-token losses
L_r in the accumulation dtype, token weight applied, 0 for rows whose label is ignore_index. When write_grad
is True it overwrites logits with dL_r/dz_r (token weight applied, NOT divided by any normalizer: the loop
applies 1 / D afterwards; zero rows for ignored labels). It must not keep references to logits.

A row kernel that can cap the logits itself has ``with_softcap(c) -> RowKernel`` (its copy that treats logits
as raw values x, scores z = c tanh(x / c) and writes dL/dx); the loop then leaves the softcap to it."""


def min_chunk_rows(compute_dtype: torch.dtype, device: torch.device) -> int:
    """The default budget's floor in rows: MIN_CHUNK_ROWS, or MIN_CHUNK_ROWS_CPU_16BIT for 16-bit GEMMs on
    the CPU."""
    if device.type == "cpu" and compute_dtype in (torch.bfloat16, torch.float16):
        return MIN_CHUNK_ROWS_CPU_16BIT
    return MIN_CHUNK_ROWS


def default_chunk_rows(
    num_rows: int,
    num_buffers: int,
    row_bytes: int = 1,
    budget_bytes: Optional[int] = None,
    min_rows: int = MIN_CHUNK_ROWS,
) -> int:
    """Token rows per chunk R for num_rows kept rows and num_buffers [R, V] buffers of row_bytes per row.

    The budget (bytes of all chunk buffers) defaults to 1/16 of the num_rows-row logits, at least min_rows
    rows' worth (:func:`min_chunk_rows`). R = the budget's rows rounded down to a multiple of 128 (if at least
    128), at most 1024, at most num_rows, at least 1.
    """
    per_row = row_bytes * num_buffers
    if budget_bytes is None:
        rows = max(-(-num_rows // (CHUNK_FRACTION * num_buffers)), min_rows)
    else:
        rows = budget_bytes // per_row
    if rows >= ROW_MULTIPLE:
        rows = min(rows - rows % ROW_MULTIPLE, MAX_CHUNK_ROWS)
    return max(1, min(num_rows, rows))


def cpu_route(
    compute_dtype: torch.dtype, device: torch.device, hidden_size: int, vocab_size: int, chunk_rows: int
) -> linear_gemms.GemmRoute:
    """The GEMM route of a call's chunks (R = chunk_rows, the rows of its workspace): on the CPU the measured one
    (``cpu_routes.route_for``: the cache, or a probe the first time this machine meets the shape class); torch.mm
    elsewhere (other devices never look at it)."""
    if device.type != "cpu" or chunk_rows < 1:
        return linear_gemms.MM_ROUTE
    return cpu_routes.route_for(compute_dtype, hidden_size, vocab_size, chunk_rows)


def warm_up_cpu_route(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    skip_ignored: bool = True,
    chunk_size: Optional[int] = None,
    chunk_budget_bytes: Optional[int] = None,
    num_buffers: int = 1,
) -> linear_gemms.GemmRoute:
    """Settle the CPU GEMM route that a fused linear call with these arguments will use (probing now if this
    machine has not measured its shape class yet), so that no probe runs inside a timed call: benchmarks call
    it before they time. num_buffers: the [R, V] chunk buffers of the call (1; 2 for a softcap with a row kernel
    that cannot cap the logits itself, which the smoothed-GA one can). No autocast; the route is torch.mm off the
    CPU and for dtypes other than float32."""
    vocab_size, hidden_size = weight.shape
    num_rows = math.prod(labels.shape)
    num_kept = int((labels != ignore_index).sum()) if skip_ignored else num_rows
    row_bytes = vocab_size * weight.element_size()
    rows = chunk_size or default_chunk_rows(
        num_kept, num_buffers, row_bytes, chunk_budget_bytes, min_chunk_rows(weight.dtype, hidden.device)
    )
    return cpu_route(weight.dtype, hidden.device, hidden_size, vocab_size, min(rows, num_kept))


@dataclass(frozen=True)
class FusedLinearConfig:
    """The options of one fused linear call, built once by :func:`fused_linear_rows` and carried as one object
    through :class:`FusedLinearFunction` into the chunk loop.

    row_kernel is the :data:`RowKernel` (it carries the loss's own options); backend ("triton" / "torch") runs the
    in-place gradient scaling; softcap is c, or None when the row kernel caps the logits itself; logit_scale is
    a; chunk_rows is R; compute_dtype is the dtype of the GEMMs and chunk buffers; accumulate_in_float32 selects
    the dW accumulator of a low-precision weight.
    """

    row_kernel: RowKernel
    ignore_index: int
    reduction: str
    backend: str
    softcap: Optional[float]
    logit_scale: float
    chunk_rows: int
    compute_dtype: torch.dtype
    accumulate_in_float32: bool = True


def _chunked_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    row_weights: Optional[torch.Tensor],
    kept_rows: Optional[torch.Tensor],
    config: FusedLinearConfig,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, Grads]:
    """One sweep over the chunks of kept rows (all rows when kept_rows is None): per-token losses [N] (0 on
    rows not kept) and the unnormalized gradients.

    need = (dH, dW, db) flags; a gradient not needed is neither computed nor allocated (None). dH has the hidden
    dtype (zero on rows not kept); dW is the accumulator of sum_r G_r^T h_r (float32 / float64, or the weight's
    dtype when it is not accumulated in float32), db the float32 (float64) accumulator of sum_r G_r.
    """
    num_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    compute_dtype = config.compute_dtype
    acc_dtype = accumulation_dtype(compute_dtype)
    need_hidden, need_weight, need_bias = need
    need_any = need_hidden or need_weight or need_bias
    device = hidden.device
    num_kept = num_rows if kept_rows is None else kept_rows.shape[0]
    allocate = torch.empty if kept_rows is None else torch.zeros  # rows not kept: loss 0, dH 0

    row_loss = allocate(num_rows, dtype=acc_dtype, device=device)
    dh = allocate(hidden.shape, dtype=hidden.dtype, device=device) if need_hidden else None
    dw_dtype = acc_dtype if config.accumulate_in_float32 else weight.dtype
    dw = torch.zeros(weight.shape, dtype=dw_dtype, device=device) if need_weight else None
    db = torch.zeros(vocab_size, dtype=acc_dtype, device=device) if need_bias else None

    weight_c = weight.to(compute_dtype)  # no copy without autocast
    bias_c = None if bias is None else bias.to(compute_dtype)
    # the [R, V] chunk buffers, allocated once per call and reused by every chunk (out=): a fresh buffer per chunk
    # pays its first-touch page faults every time on the CPU (a 63 MiB one is mmapped and unmapped by glibc:
    # ~60 ms a chunk, docs/kernel-notes.md "v4"); CUDA's caching allocator would hand back the same block anyway
    chunk_shape = (min(config.chunk_rows, num_kept), vocab_size)
    route = cpu_route(compute_dtype, device, hidden_size, vocab_size, chunk_shape[0])
    workspace = torch.empty(chunk_shape, dtype=compute_dtype, device=device)
    capped = None if config.softcap is None else torch.empty(chunk_shape, dtype=compute_dtype, device=device)
    for start in range(0, num_kept, config.chunk_rows):
        stop = min(start + config.chunk_rows, num_kept)
        if kept_rows is None:
            index = None
            hidden_chunk = hidden[start:stop].to(compute_dtype)
            labels_chunk = labels[start:stop]
            weights_chunk = None if row_weights is None else row_weights[start:stop]
        else:
            index = kept_rows[start:stop]
            hidden_chunk = hidden.index_select(0, index).to(compute_dtype)
            labels_chunk = labels.index_select(0, index)
            weights_chunk = None if row_weights is None else row_weights.index_select(0, index)
        logits = workspace[: stop - start]
        linear_gemms.logits_into(logits, hidden_chunk, weight_c, bias_c, config.logit_scale, route)  # Z = a (H_c W^T + b)
        tanh = None
        if capped is not None:
            tanh = logits.div_(config.softcap).tanh_()  # t = tanh(Z / c), kept for the chain rule
            logits = torch.mul(tanh, config.softcap, out=capped[: stop - start])  # Zc = c t
        # G = dL/dZc overwrites Zc (in place) when a gradient is needed
        chunk_loss = config.row_kernel(logits, labels_chunk, weights_chunk, need_any)
        if index is None:
            row_loss[start:stop] = chunk_loss
        else:
            row_loss.index_copy_(0, index, chunk_loss)
        if not need_any:
            continue
        grad = logits
        if tanh is not None:
            grad.mul_(tanh.square_().neg_().add_(1.0))  # dL/dZ = dL/dZc * (1 - t^2); the factor a comes later
        if dh is not None:
            hidden_grad = linear_gemms.hidden_grad(grad, weight_c, route)  # dH_c = G W
            if index is not None:
                dh.index_copy_(0, index, hidden_grad.to(dh.dtype))  # scattered to the kept rows' places
            else:
                dh[start:stop] = hidden_grad  # cast back to the hidden dtype
        if dw is not None:
            linear_gemms.accumulate_weight_grad(dw, grad, hidden_chunk, route)  # dW += G^T H_c
        if db is not None:
            db.add_(grad.sum(dim=0, dtype=acc_dtype))  # db += sum_r G_r
    return row_loss, (dh, dw, db)


def _finished(
    grads: Grads, factor: Union[None, float, torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Grads:
    """Multiply the accumulated gradients by factor (a / D; None: nothing to multiply, no pass over dW) and
    cast dW, db to the parameter dtypes: an accumulator wider than its parameter is multiplied and cast in one
    pass (the float32 [V, D] accumulator of a bf16 head is read once, not read, written and read again)."""

    def finish(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if factor is None:
            return grad.to(dtype)
        if grad.dtype == dtype:
            return grad.mul_(factor)
        return _scaled_cast(grad, factor, dtype)

    dh, dw, db = grads
    return (
        None if dh is None else finish(dh, dh.dtype),
        None if dw is None else finish(dw, weight.dtype),
        None if db is None else finish(db, bias.dtype),
    )


def _scaled_cast(grad: torch.Tensor, factor: Union[float, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """factor * grad in dtype, one pass. On the CPU in row blocks of about CAST_BLOCK_BYTES: a mixed-dtype out=
    there computes into a temporary of the whole input's dtype and size first (a second float32 [V, D] buffer)."""
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    step = grad.shape[0]
    if grad.device.type == "cpu" and grad.dim() > 1:
        step = max(1, CAST_BLOCK_BYTES // (grad[0].numel() * grad.element_size()))
    for start in range(0, grad.shape[0], step):
        torch.mul(grad[start : start + step], factor, out=out[start : start + step])
    return out


def _mean_inverse_divisor(
    labels: torch.Tensor, normalizer: Optional[torch.Tensor], config: FusedLinearConfig
) -> Optional[torch.Tensor]:
    """1 / D in the accumulation dtype for reduction "mean" (on the device, no host sync), else None."""
    if config.reduction != "mean":
        return None
    return inverse_divisor(labels, config.ignore_index, normalizer, accumulation_dtype(config.compute_dtype))


def _grad_factor(inverse_d: Optional[torch.Tensor], logit_scale: float) -> Union[None, float, torch.Tensor]:
    """What the unnormalized gradients are multiplied by: a / D, a alone, or None when that is 1."""
    if inverse_d is not None:
        return inverse_d * logit_scale if logit_scale != 1.0 else inverse_d
    return None if logit_scale == 1.0 else logit_scale


def is_cpu_unit(grad_output: torch.Tensor) -> bool:
    """grad_output is a CPU scalar equal to 1. Reading a CPU tensor is no host sync; on CUDA it would be one, so
    there this is False without looking."""
    return grad_output.device.type == "cpu" and grad_output.dim() == 0 and grad_output.item() == 1.0


def _scale_by_grad_output(grads: Grads, grad_output: torch.Tensor, backend: str) -> None:
    """grads *= grad_output in place; nothing when grad_output is a CPU scalar equal to 1."""
    if is_cpu_unit(grad_output):
        return
    for grad in grads:
        if grad is not None:
            ops.scale_rows_(grad.view(-1, grad.shape[-1]), grad_output, backend)


class FusedLinearFunction(torch.autograd.Function):
    """autograd Function over prepared inputs: hidden [N, D], weight [V, D], bias [V] or None, labels [N]
    (contiguous), token weights [N] in the accumulation dtype or None, the normalizer as a 0-dim tensor or
    None, kept_rows (int64 [M], unique, covering every row whose label is not ignore_index) or None for all
    rows, and a :class:`FusedLinearConfig`.

    Returns (loss, per-token losses [N]): the loss as the reduction gives it, and, for the scalar reductions,
    the per-token losses L_r of the same pass (not differentiable; None for reduction "none", whose loss is
    them). Use :func:`fused_linear_rows` unless you prepare the inputs yourself.
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
        kept_rows: Optional[torch.Tensor],
        config: FusedLinearConfig,
    ):
        ctx.set_materialize_grads(False)
        inverse_d = _mean_inverse_divisor(labels, normalizer, config)
        eager = config.reduction != "none"  # a scalar loss: its gradient is known up to grad_output now
        need = tuple(ctx.needs_input_grad[:3]) if eager else (False, False, False)
        row_loss, grads = _chunked_pass(hidden, weight, bias, labels, token_weights, kept_rows, config, need)
        ctx.config = config
        factor = _grad_factor(inverse_d, config.logit_scale)
        # the gradients are ours (not inputs or outputs): kept as a plain attribute, handed over in backward
        ctx.grads = _finished(grads, factor, weight, bias) if eager else None
        ctx.factor = factor
        ctx.save_for_backward(hidden, weight, bias, labels, token_weights, kept_rows)
        if not eager:
            return row_loss, None
        ctx.mark_non_differentiable(row_loss)
        return reduce_rows(row_loss, config.reduction, inverse_d), row_loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Optional[torch.Tensor], _grad_row_loss: Optional[torch.Tensor]):
        config = ctx.config
        no_input_grads = (None,) * 5
        if grad_output is None:
            return (None, None, None, *no_input_grads)
        if ctx.grads is not None:
            # scaled in place and handed over once; dropping our reference lets autograd adopt them as .grad
            grads, ctx.grads = ctx.grads, None
            _scale_by_grad_output(grads, grad_output, config.backend)
            return (*grads, *no_input_grads)
        hidden, weight, bias, labels, token_weights, kept_rows = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        if config.reduction == "none":
            # L_r scaled by g_r is the loss of token weight w_r * g_r: dW = sum_r g_r G_r^T h_r in one pass
            factor = grad_output.reshape(-1).to(accumulation_dtype(config.compute_dtype))
            row_weights = factor if token_weights is None else token_weights * factor
            _, grads = _chunked_pass(hidden, weight, bias, labels, row_weights.contiguous(), kept_rows, config, need)
            return (*_finished(grads, ctx.factor, weight, bias), *no_input_grads)
        # second backward through a retained graph: the same pass and the same scaling as the first one
        _, grads = _chunked_pass(hidden, weight, bias, labels, token_weights, kept_rows, config, need)
        grads = _finished(grads, ctx.factor, weight, bias)
        _scale_by_grad_output(grads, grad_output, config.backend)
        return (*grads, *no_input_grads)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for this device type, else None."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def fused_linear_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    row_kernel: RowKernel,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    token_weights: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    normalizer: Union[None, float, torch.Tensor] = None,
    kept_rows: Optional[torch.Tensor] = None,
    skip_ignored: bool = True,
    chunk_size: Optional[int] = None,
    chunk_budget_bytes: Optional[int] = None,
    accumulate_in_float32: bool = True,
    backend: str = "auto",
    validate: bool = True,
    return_token_losses: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """A token-level loss of the logits ``softcap(logit_scale * (hidden @ weight.T + bias))`` through the chunk
    loop of this module, with any row kernel, never materializing the logits.

    The entry for any token-level loss: ``row_kernel`` is a :data:`RowKernel` (``linear_smoothed_ga_loss`` is
    this function with ``smoothed_ga.SmoothedGARowKernel``, ``linear_token_loss`` with
    ``token_loss.TokenRuleRowKernel``). Token weights reach the row kernel per chunk (it applies them); the loop
    applies the reduction's 1 / D and logit_scale to the gradients once, after the loop. The options are checked
    here and go on as one :class:`FusedLinearConfig`.

    Args:
        hidden, weight, labels, bias, softcap, token_weights, ignore_index, reduction, normalizer, chunk_size,
            accumulate_in_float32, validate: as in :func:`sga.kernels.linear_smoothed_ga_loss`.
        row_kernel: the per-chunk loss and its in-place gradient (see :data:`RowKernel`).
        logit_scale: a in z = softcap(a * (h W^T + b)) (Cohere's ``logit_scale``, 1 / Granite's
            ``logits_scaling``); finite and > 0.
        kept_rows: int64 indices into the flattened tokens of every row whose label is not ignore_index (each
            once; others may be included and are then scored as ignored). Only these rows reach the GEMMs.
            None: computed here with one ``nonzero`` (a host sync on CUDA) unless ``skip_ignored=False``.
            With validate=True they are checked (one host sync).
        skip_ignored: False runs every row through the GEMMs (no nonzero, no host sync) when kept_rows is None.
        chunk_budget_bytes: memory budget of the [R, V] chunk buffers in bytes (R = the rows that fit, rounded
            down to a multiple of 128, at most 1024); default 1/16 of the kept rows' logits, at least 128
            rows (256 for bf16 / fp16 on the CPU). Ignored when chunk_size is given.
        backend: runs the in-place gradient scaling ("triton", "torch" or "auto").
        return_token_losses: also return the per-token losses L_r of the same pass (detached, shaped like
            labels, 0 on ignored tokens): ``(loss, token_losses)``.

    Returns:
        The loss (float32; float64 for float64 inputs): a scalar, or per token (shaped like labels) for
        reduction "none"; with return_token_losses, ``(loss, token_losses)``.
    """
    autocast_dtype = _autocast_dtype(hidden.device.type) if isinstance(hidden, torch.Tensor) else None
    compute_dtype = check_linear_inputs(hidden, weight, bias, labels, token_weights, ignore_index, autocast_dtype)
    softcap = check_softcap(softcap)
    logit_scale = check_logit_scale(logit_scale)
    check_reduction(reduction, normalizer)
    chunk_size, chunk_budget_bytes = check_chunk_options(chunk_size, chunk_budget_bytes)
    for name, flag in (("accumulate_in_float32", accumulate_in_float32), ("skip_ignored", skip_ignored),
                       ("validate", validate), ("return_token_losses", return_token_losses)):
        check_bool(name, flag)
    if not callable(row_kernel):
        raise TypeError(f"row_kernel must be callable, got {type(row_kernel).__name__}")
    if not accumulate_in_float32 and weight.dtype == torch.float16:
        # the chunks' dW products are summed before the 1 / D scaling: float16 (max 65504) can overflow there
        raise ValueError("accumulate_in_float32=False needs a bfloat16 (or float32) weight, not float16")
    resolved_backend = ops.resolve_backend(backend, hidden.device)
    normalizer_tensor = check_normalizer(normalizer, hidden.device)
    vocab_size, hidden_size = weight.shape
    num_rows = math.prod(labels.shape)
    labels = labels_for_kernels(labels, ignore_index)  # int64 when ignore_index does not fit int32 labels
    if kept_rows is not None:
        kept_rows = check_kept_rows(kept_rows, num_rows, hidden.device)
    if validate:
        check_labels_in_range(labels, vocab_size, ignore_index)
        if kept_rows is not None:
            check_kept_rows_cover_scored_tokens(kept_rows, labels.reshape(-1), ignore_index)

    hidden_2d = hidden.reshape(-1, hidden_size)
    labels_1d = labels.reshape(-1).contiguous()
    if kept_rows is None and skip_ignored:
        kept_rows = (labels_1d != ignore_index).nonzero().squeeze(1)  # the documented host sync on CUDA
    if kept_rows is not None and kept_rows.shape[0] == num_rows:
        kept_rows = None  # every row is kept (the indices are unique): the contiguous path, no gathers
    num_kept = num_rows if kept_rows is None else kept_rows.shape[0]
    acc_dtype = accumulation_dtype(compute_dtype)
    weights_1d = None
    if token_weights is not None:
        weights_1d = token_weights.detach().reshape(-1).to(acc_dtype).contiguous()
    if softcap is not None and hasattr(row_kernel, "with_softcap"):
        # the row kernel caps the logits itself, in its own sweep: no tanh buffer, no extra [R, V] passes here
        row_kernel, softcap = row_kernel.with_softcap(softcap), None
    num_buffers = 1 if softcap is None else 2
    row_bytes = vocab_size * torch.empty((), dtype=compute_dtype).element_size()
    config = FusedLinearConfig(
        row_kernel=row_kernel,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=resolved_backend,
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_rows=chunk_size
        or default_chunk_rows(
            num_kept, num_buffers, row_bytes, chunk_budget_bytes, min_chunk_rows(compute_dtype, hidden.device)
        ),
        compute_dtype=compute_dtype,
        accumulate_in_float32=accumulate_in_float32,
    )
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    no_autocast = (
        torch.autocast(hidden.device.type, enabled=False) if autocast_dtype is not None else contextlib.nullcontext()
    )
    inputs = (hidden_2d, weight, bias, labels_1d, weights_1d, normalizer_tensor, kept_rows)
    with no_autocast:
        if differentiable:
            loss, row_loss = FusedLinearFunction.apply(*inputs, config)
        else:
            row_loss, _ = _chunked_pass(*inputs[:5], kept_rows, config, (False, False, False))
            loss = reduce_rows(row_loss, reduction, _mean_inverse_divisor(labels_1d, normalizer_tensor, config))
    if reduction == "none":
        loss = loss.reshape(labels.shape)
        row_loss = loss
    if return_token_losses:
        return loss, row_loss.detach().reshape(labels.shape)
    return loss
