"""What every Triton row kernel of this package shares: whether Triton runs in its CPU interpreter, the launch
configuration and the persistent grid, the launch itself, the rounding of stores to bfloat16, and the kernel that
scales a gradient by grad_output in place (the backward of every loss).

A row kernel (``smoothed_ga_triton``, ``token_loss_triton``) runs on a persistent grid: each program takes rows
p, p + P, p + 2P, ... (P = programs_per_sm x SMs), so only P rows are in flight and the second sweep of a row
finds it in L2. The launch configurations live in ``tuning``.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .checks import accumulation_dtype
from .tuning import KernelConfig, config_for, interpreter_config


@triton.jit
def round_for_store(x, out_dtype: tl.constexpr, EXPLICIT_BF16_RTNE: tl.constexpr):
    """Round x to out_dtype to nearest-even. The GPU's conversion does that natively; Triton's CPU interpreter
    truncates float32 -> bfloat16, so there the rounding is done on the bits: add 0x7FFF plus the lowest kept
    bit, then keep the high 16 bits."""
    if EXPLICIT_BF16_RTNE and out_dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(out_dtype)


@triton.jit
def scale_rows_kernel(
    grad_ptr,
    grad_row_stride,
    grad_output_ptr,
    vocab_size,
    PER_ROW: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    EXPLICIT_BF16_RTNE: tl.constexpr,
):
    """grad[row] *= grad_output (one factor, or one per row), one program per row."""
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
            scaled = round_for_store(grad * factor, grad_ptr.dtype.element_ty, EXPLICIT_BF16_RTNE)
            tl.store(grad_row + offsets, scaled, mask=in_vocab)


# Triton's own setting, read once: the jit decorator made interpreted functions (TRITON_INTERPRET=1 at import)
_INTERPRETED = isinstance(round_for_store, InterpretedFunction)
_TRITON_ACC_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def interpreter_enabled() -> bool:
    """True when Triton runs the kernels in its CPU interpreter (decided when this module was imported)."""
    return _INTERPRETED


def triton_accumulation_dtype(dtype: torch.dtype) -> tl.dtype:
    """The kernels' ACC_DTYPE for inputs of ``dtype`` (``checks.accumulation_dtype`` as a Triton dtype)."""
    return _TRITON_ACC_DTYPES[accumulation_dtype(dtype)]


def architecture(device: torch.device) -> str:
    """'sm90' for an H100 / H200; 'cpu' off CUDA."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def launch_config(vocab_size: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """The tuning table's choice for this case (the interpreter's own on the CPU)."""
    if _INTERPRETED:
        return interpreter_config(vocab_size)
    return config_for(architecture(device), str(dtype).removeprefix("torch."), vocab_size, dtype.itemsize)


def _multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device; the interpreter runs programs one after another, so count the CPU as one."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def persistent_programs(num_rows: int, config: KernelConfig, device: torch.device) -> int:
    """Programs of the persistent grid: config.programs_per_sm per SM (per CPU in the interpreter), at most one
    per row; each program loops over rows p, p + P, p + 2P, ..."""
    return min(num_rows, config.programs_per_sm * _multiprocessors(device))


def _on_device(tensor: torch.Tensor):
    """The CUDA device context of a tensor (kernels launch on the current device), or no context on the CPU."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def launch_rows(
    kernel: triton.JITFunction,
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    grad_norm: torch.Tensor,
    grad_buffer: Optional[torch.Tensor],
    scalars: tuple,
    config: KernelConfig,
    **constexprs,
) -> torch.Tensor:
    """Launch a row kernel over the persistent grid and return its per-row losses (the accumulation dtype).

    Every row kernel takes (logits, logits row stride, labels, weights, grad_norm, grad buffer, its row stride,
    row_loss, num_rows, vocab_size, *scalars) and the constexprs HAS_WEIGHTS, WRITE_GRAD, ACC_DTYPE, BLOCK_V and
    EXPLICIT_BF16_RTNE, set here; ``constexprs`` are the kernel's own. An absent weights or grad buffer is
    passed as a placeholder pointer that the kernel never touches."""
    num_rows, vocab_size = logits.shape
    row_loss = torch.empty(num_rows, dtype=accumulation_dtype(logits.dtype), device=logits.device)
    if num_rows == 0:
        return row_loss
    num_programs = persistent_programs(num_rows, config, logits.device)
    with _on_device(logits):
        kernel[(num_programs,)](
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
            *scalars,
            HAS_WEIGHTS=weights is not None,
            WRITE_GRAD=grad_buffer is not None,
            ACC_DTYPE=triton_accumulation_dtype(logits.dtype),
            BLOCK_V=config.block_v,
            EXPLICIT_BF16_RTNE=_INTERPRETED,
            num_warps=config.num_warps,
            **constexprs,
        )
    return row_loss


def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output (0-dim, or one factor per row), in place; rows with factor 1 are not touched."""
    num_rows, vocab_size = grad.shape
    if num_rows == 0:
        return
    config = launch_config(vocab_size, grad.dtype, grad.device)
    block_v = min(config.block_v, 16384 // grad.element_size()) if not _INTERPRETED else config.block_v
    with _on_device(grad):
        scale_rows_kernel[(num_rows,)](
            grad,
            grad.stride(0),
            grad_output.contiguous(),
            vocab_size,
            PER_ROW=grad_output.dim() != 0,
            ACC_DTYPE=triton_accumulation_dtype(grad.dtype),
            BLOCK_V=block_v,
            EXPLICIT_BF16_RTNE=_INTERPRETED,
            num_warps=min(config.num_warps, 8),
        )
