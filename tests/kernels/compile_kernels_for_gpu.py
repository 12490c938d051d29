"""Compile the Triton kernels ahead of time for NVIDIA targets, without a GPU (run without TRITON_INTERPRET).

Catches what the CPU interpreter lets through (type errors in loop-carried values, unsupported ops, inline PTX,
pipelining of sweep 1) by lowering kernel variants all the way to a cubin: every dtype and option flag at the
default config for sm_80 and sm_90, and every variant that bench/gpu_sweep.py times for sm_90. Prints one
"ok <name>" line per kernel and, with --report, the registers and spills of each sm_90 variant.

    python tests/kernels/compile_kernels_for_gpu.py [--quick] [--report]
"""
from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sga.kernels import smoothed_ga_triton, triton_launch, tuning

POINTER_TYPES = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "float64": "*fp64"}
ELEMENT_SIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}
SM90, SM80 = GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)


def compile_for(kernel, signature: dict, constexprs: dict, target: GPUTarget, num_warps: int):
    full_signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=kernel, signature=full_signature, constexprs=constexprs)
    return triton.compile(source, target=target, options={"num_warps": num_warps})


def rows_signature(dtype: str) -> dict:
    return {
        "logits_ptr": POINTER_TYPES[dtype], "logits_row_stride": "i64", "labels_ptr": "*i64",
        "weights_ptr": "*fp64" if dtype == "float64" else "*fp32", "grad_norm_ptr": "*fp32",
        "grad_ptr": POINTER_TYPES[dtype], "grad_row_stride": "i64", "row_loss_ptr": "*fp32",
        "num_rows": "i32", "vocab_size": "i32", "smoothing": "fp32", "sign": "fp32", "ignore_index": "i32",
        "softcap": "fp32", "logit_scale": "fp32",
    }  # fmt: skip


def rows_constexprs(dtype: str, config: tuning.KernelConfig, **flags) -> dict:
    constexprs = {
        "HAS_WEIGHTS": True, "WRITE_GRAD": True, "ZERO_IGNORED_ROWS": True, "HAS_SMOOTHING": True,
        "HAS_SOFTCAP": False, "ACC_DTYPE": tl.float64 if dtype == "float64" else tl.float32,
        "BLOCK_V": config.block_v, "SINGLE_BLOCK": config.single_block, "NUM_STAGES": config.num_stages,
        "REVERSE_SWEEP2": config.reverse_sweep2, "CACHE_HINTS": config.cache_hints,
        "FTZ_EXP2": config.ftz_exp2 and dtype != "float64", "EXPLICIT_BF16_RTNE": False,
    }  # fmt: skip
    constexprs.update(flags)
    return constexprs


def flag_variants():
    """Every dtype x option flag at the default multi-block and single-block configs, sm_80 and sm_90."""
    flags = ("HAS_WEIGHTS", "WRITE_GRAD", "HAS_SMOOTHING", "HAS_SOFTCAP", "ZERO_IGNORED_ROWS")
    for dtype, vocab_size in itertools.product(POINTER_TYPES, (128256, 32000)):
        config = tuning.default_config(vocab_size, ELEMENT_SIZE[dtype])
        for values in ((True,) * 5, (False,) * 5, (True, True, False, True, False), (False, True, True, False, True)):
            name = f"rows {dtype} {config.name()} " + " ".join(f"{f}={v}" for f, v in zip(flags, values))
            constexprs = rows_constexprs(dtype, config, **dict(zip(flags, values)))
            yield name, (SM90, SM80), smoothed_ga_triton.smoothed_ga_rows_kernel, rows_signature(dtype), constexprs, config.num_warps


def sweep_variants():
    """Every variant bench/gpu_sweep.py times, bf16 and fp32, sm_90 (the sweep's shapes); the softcap path too for
    the first of each kind (it is independent of the block, warp and cache switches)."""
    for dtype, vocab_size in itertools.product(("bfloat16", "float32"), (128256, 32000)):
        configs = list(tuning.sweep_variants(vocab_size, ELEMENT_SIZE[dtype]))
        with_softcap = {configs[0], next((c for c in configs if c.single_block), configs[0])}
        for config in configs:
            for softcap in (False, True) if config in with_softcap else (False,):
                constexprs = rows_constexprs(dtype, config, HAS_SOFTCAP=softcap)
                name = f"sweep {dtype} V={vocab_size} {config.name()} softcap={softcap}"
                yield name, (SM90,), smoothed_ga_triton.smoothed_ga_rows_kernel, rows_signature(dtype), constexprs, config.num_warps


def scale_kernel_variants():
    for dtype, per_row in itertools.product(POINTER_TYPES, (False, True)):
        signature = {"grad_ptr": POINTER_TYPES[dtype], "grad_row_stride": "i64", "grad_output_ptr": "*fp32",
                     "vocab_size": "i32"}
        constexprs = {"PER_ROW": per_row, "ACC_DTYPE": tl.float64 if dtype == "float64" else tl.float32,
                      "BLOCK_V": 4096, "EXPLICIT_BF16_RTNE": False}
        yield f"scale {dtype} per_row={per_row}", (SM90, SM80), triton_launch.scale_rows_kernel, signature, constexprs, 8


def resource_usage(cubin: bytes) -> str:
    """Registers and stack (spill) bytes of a cubin, from the cuobjdump that Triton's package carries."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run([str(tool), "--dump-resource-usage", handle.name], capture_output=True, text=True)
    usage = re.search(r"REG:(\d+) STACK:(\d+)", report.stdout)
    return f"registers={usage.group(1)} stack={usage.group(2)}" if usage else "registers=? (cuobjdump failed)"


def all_kernels(quick: bool = False) -> list[tuple]:
    """(name, targets, kernel, signature, constexprs, num_warps) of every distinct kernel to compile."""
    groups = [flag_variants(), scale_kernel_variants()] + ([] if quick else [sweep_variants()])
    distinct = {}
    for name, targets, kernel, signature, constexprs, num_warps in itertools.chain(*groups):
        key = (id(kernel), tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()), num_warps,
               targets)
        distinct.setdefault(key, (name, targets, kernel, signature, constexprs, num_warps))
    return list(distinct.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="flag variants and the scale kernel only")
    parser.add_argument("--report", action="store_true", help="print registers and spills of each kernel")
    args = parser.parse_args()
    kernels = all_kernels(args.quick)
    for name, targets, kernel, signature, constexprs, num_warps in kernels:
        for target in targets:
            compiled = compile_for(kernel, signature, constexprs, target, num_warps)
            assert compiled.asm.get("cubin"), f"{name}: no cubin for sm_{target.arch}"
            if args.report and target is SM90:
                print(f"   sm_90 {resource_usage(compiled.asm['cubin'])} shared={compiled.metadata.shared}")
        print(f"ok {name}", flush=True)
    print(f"compiled {len(kernels)} kernels")


if __name__ == "__main__":
    main()
