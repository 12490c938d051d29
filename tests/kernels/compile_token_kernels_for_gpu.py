"""Compile the token-rule Triton kernel ahead of time for sm_80 and sm_90, without a GPU (run without
TRITON_INTERPRET): every rule (a ``@triton.jit`` function passed as a constexpr) lowered to a cubin.

    python tests/kernels/compile_token_kernels_for_gpu.py
"""
from __future__ import annotations

import itertools

import triton.language as tl
from triton.backends.compiler import GPUTarget

from compile_kernels_for_gpu import POINTER_TYPES, compile_for
from sga.kernels import token_loss_triton
from sga.kernels.token_rules import TOKEN_RULES


def variants():
    for (name, rule), (dtype, write_grad) in itertools.product(
        TOKEN_RULES.items(), (("bfloat16", True), ("float32", False), ("float64", True))
    ):
        acc = "*fp64" if dtype == "float64" else "*fp32"
        signature = {
            "logits_ptr": POINTER_TYPES[dtype], "logits_row_stride": "i64", "labels_ptr": "*i64", "weights_ptr": acc,
            "grad_norm_ptr": acc, "grad_ptr": POINTER_TYPES[dtype], "grad_row_stride": "i64", "row_loss_ptr": acc,
            "num_rows": "i32", "vocab_size": "i32", "param0": "fp32", "param1": "fp32", "ignore_index": "i32",
        }
        constexprs = {
            "RULE": rule.triton_form, "USES_Q": rule.uses_q, "HAS_WEIGHTS": True, "WRITE_GRAD": write_grad,
            "ACC_DTYPE": tl.float64 if dtype == "float64" else tl.float32, "BLOCK_V": 4096, "EXPLICIT_BF16_RTNE": False,
        }
        yield f"{name} {dtype} grad={write_grad}", signature, constexprs


def main() -> None:
    targets = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]
    for label, signature, constexprs in variants():
        for target in targets:
            compiled = compile_for(token_loss_triton.token_rule_rows_kernel, signature, constexprs, target, num_warps=8)
            assert compiled.asm.get("cubin"), f"{label}: no cubin for sm_{target.arch}"
        print(f"ok {label}")


if __name__ == "__main__":
    main()
