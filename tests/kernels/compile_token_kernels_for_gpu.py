"""Compile the token-rule Triton kernel ahead of time for sm_80 and sm_90, without a GPU (run without
TRITON_INTERPRET): every rule (a ``@triton.jit`` function passed as a constexpr) lowered to a cubin, through the
real launcher ``token_loss_triton.rows_forward`` on meta tensors and Triton's own JIT specialization of its
arguments (compile_kernels_for_gpu.compile_launches).

    python tests/kernels/compile_token_kernels_for_gpu.py
"""
from __future__ import annotations

import itertools

import torch

from compile_kernels_for_gpu import DTYPES, NUM_ROWS, SM80, SM90, compile_launches, meta
from sga.kernels import token_loss_triton
from sga.kernels.token_rules import TOKEN_RULES

VOCAB_SIZE = 128256


def variants():
    for (name, rule), (dtype_name, write_grad) in itertools.product(
        TOKEN_RULES.items(), (("bfloat16", True), ("float32", False), ("float64", True))
    ):
        dtype = DTYPES[dtype_name]
        accumulation = torch.float64 if dtype == torch.float64 else torch.float32

        def launch(rule=rule, dtype=dtype, accumulation=accumulation, write_grad=write_grad):
            return token_loss_triton.rows_forward(
                meta(NUM_ROWS, VOCAB_SIZE, dtype=dtype), meta(NUM_ROWS, dtype=torch.int64),
                meta(NUM_ROWS, dtype=accumulation), meta(dtype=accumulation),
                meta(NUM_ROWS, VOCAB_SIZE, dtype=dtype) if write_grad else None, rule, 0.5, 1.0, -100,
            )  # fmt: skip

        yield f"{name} {dtype_name} grad={write_grad}", launch


def main() -> None:
    for label, launch in variants():
        for target in (SM90, SM80):
            for compiled in compile_launches(launch, target):
                assert compiled.asm.get("cubin"), f"{label}: no cubin for sm_{target.arch}"
        print(f"ok {label}", flush=True)


if __name__ == "__main__":
    main()
