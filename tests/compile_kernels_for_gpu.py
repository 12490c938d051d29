"""Compile the Triton kernels ahead of time for NVIDIA targets, without a GPU (run without TRITON_INTERPRET).

Catches what the CPU interpreter lets through (type errors in loop-carried values, unsupported ops) by
lowering every kernel variant all the way to a cubin for sm_80 and sm_90.

    python tests/compile_kernels_for_gpu.py
"""
from __future__ import annotations

import itertools

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sga.kernels import triton_backend

POINTER_TYPES = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "float64": "*fp64"}


def compile_for(kernel, signature: dict, constexprs: dict, target: GPUTarget, num_warps: int):
    full_signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=kernel, signature=full_signature, constexprs=constexprs)
    return triton.compile(source, target=target, options={"num_warps": num_warps})


def rows_kernel_variants():
    for dtype, has_weights, write_grad in itertools.product(POINTER_TYPES, (False, True), (False, True)):
        signature = {
            "logits_ptr": POINTER_TYPES[dtype], "logits_row_stride": "i64", "labels_ptr": "*i32",
            "weights_ptr": "*fp64" if dtype == "float64" else "*fp32", "grad_norm_ptr": "*fp32",
            "grad_ptr": POINTER_TYPES[dtype], "grad_row_stride": "i64", "row_loss_ptr": "*fp32",
            "num_rows": "i32", "vocab_size": "i32", "smoothing": "fp32", "sign": "fp32", "ignore_index": "i32",
        }
        constexprs = {
            "HAS_WEIGHTS": has_weights, "WRITE_GRAD": write_grad,
            "ACC_DTYPE": tl.float64 if dtype == "float64" else tl.float32,
            "BLOCK_V": 16384 // (8 if dtype == "float64" else 2 if dtype in ("bfloat16", "float16") else 4),
            "EXPLICIT_BF16_RTNE": False,
        }
        yield f"rows {dtype} weights={has_weights} grad={write_grad}", triton_backend._smoothed_ga_rows_kernel, signature, constexprs


def scale_kernel_variants():
    for dtype, per_row in itertools.product(POINTER_TYPES, (False, True)):
        signature = {"grad_ptr": POINTER_TYPES[dtype], "grad_row_stride": "i64", "grad_output_ptr": "*fp32",
                     "vocab_size": "i32"}
        constexprs = {"PER_ROW": per_row, "ACC_DTYPE": tl.float64 if dtype == "float64" else tl.float32,
                      "BLOCK_V": 4096, "EXPLICIT_BF16_RTNE": False}
        yield f"scale {dtype} per_row={per_row}", triton_backend._scale_rows_kernel, signature, constexprs


def main() -> None:
    targets = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]
    for name, kernel, signature, constexprs in itertools.chain(rows_kernel_variants(), scale_kernel_variants()):
        for target in targets:
            compiled = compile_for(kernel, signature, constexprs, target, num_warps=8)
            assert compiled.asm.get("cubin"), f"{name}: no cubin for sm_{target.arch}"
        print(f"ok {name}")


if __name__ == "__main__":
    main()
