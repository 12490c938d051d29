"""Compile the Triton kernels ahead of time for NVIDIA targets, without a GPU (run without TRITON_INTERPRET), with
the specialization Triton's JIT gives the launcher's real arguments.

Each kernel is reached through its real launcher (``smoothed_ga_triton.rows_forward``, ``triton_launch.scale_rows_``,
``token_loss_triton.rows_forward``) on meta tensors of the benchmark's shapes: the launch is captured instead of run,
and the captured arguments go through Triton's own binder (``create_function_from_signature``, then
``JITFunction._pack_args``), which is what ``JITFunction.run`` does on a GPU before it compiles. So the types
(i32 vs i64 scalars) and the divisibility-by-16 attributes of the pointers and integers (torch's allocations are
16-byte aligned; the strides and V of every benchmark shape are multiples of 16) are the ones the JIT uses, and
the cubin is the one a GPU would run: 16-byte vector loads and cp.async where the alignment allows them. A hand-written
signature without those attributes compiles 2-byte scalar loads and about twice the registers, which is what an
earlier version of this script reported.

Catches what the CPU interpreter lets through (type errors in loop-carried values, unsupported ops, inline PTX,
pipelining of sweep 1) by lowering kernel variants all the way to a cubin: every dtype and option flag at the
default config for sm_80 and sm_90, and every variant that bench/gpu_sweep.py times for sm_90. Prints one
"ok <name>" line per kernel; with --report the resources of each sm_90 cubin; with --table the resource table of
the sweep's variants (docs/kernel-notes.md).

    python tests/kernels/compile_kernels_for_gpu.py [--quick] [--report] [--table]
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from sga.kernels import smoothed_ga_triton, triton_launch, tuning

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
SM90, SM80 = GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)
NUM_ROWS = 16384  # bench/gpu_sweep.py's N (a multiple of 16, as most batches' token counts are not: only a loop bound)
# an H100's / H200's multiprocessor: 64K 32-bit registers, at most 64 resident warps, 228 KB of shared memory of
# which 1 KB per block is reserved
SM90_REGISTERS, SM90_MAX_WARPS, SM90_SHARED_BYTES, SM90_SHARED_PER_BLOCK_RESERVED = 65536, 64, 233472, 1024


@contextlib.contextmanager
def captured_launches():
    """Within the block, a launch of any @triton.jit kernel (``kernel[grid](*args, **kwargs)``) is recorded as
    (kernel, args, kwargs) instead of run."""
    launches: list[tuple[JITFunction, tuple, dict]] = []
    run = JITFunction.run

    def capture(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = capture
    try:
        yield launches
    finally:
        JITFunction.run = run


def compile_captured(kernel: JITFunction, args: tuple, kwargs: dict, target: GPUTarget):
    """Compile one captured launch the way ``JITFunction.run`` does on a device of ``target``: Triton's binder
    specializes the arguments (types, divisibility by 16, integers equal to 1), ``_pack_args`` turns them into the
    signature, constexprs and attributes of the ASTSource."""
    from triton import knobs

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton >= 3.7 passes it too
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def compile_launches(launch: Callable[[], object], target: GPUTarget) -> list:
    """Run ``launch`` (a call of a real launcher on meta tensors), compile every kernel launch it makes."""
    with captured_launches() as launches:
        launch()
    assert launches, "the launcher launched no kernel"
    return [compile_captured(kernel, args, kwargs, target) for kernel, args, kwargs in launches]


def meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor with a shape, a dtype and contiguous strides but no storage (its data_ptr is 0: 16-byte aligned, as
    every tensor torch's CUDA allocator returns)."""
    return torch.empty(shape, dtype=dtype, device="meta")


def rows_launch(dtype_name: str, vocab_size: int, config: tuning.KernelConfig, *, weights: bool = True,
                write_grad: bool = True, smoothing: float = 0.1, softcap: Optional[float] = None,
                grad_buffer_zeroed: bool = False) -> Callable[[], object]:
    """``smoothed_ga_triton.rows_forward`` on meta tensors of [NUM_ROWS, vocab_size], as the losses call it."""
    dtype = DTYPES[dtype_name]
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32

    def launch():
        return smoothed_ga_triton.rows_forward(
            meta(NUM_ROWS, vocab_size, dtype=dtype), meta(NUM_ROWS, dtype=torch.int64),
            meta(NUM_ROWS, dtype=accumulation) if weights else None, meta(dtype=accumulation),
            meta(NUM_ROWS, vocab_size, dtype=dtype) if write_grad else None, smoothing, -1.0, -100,
            softcap=softcap, grad_buffer_zeroed=grad_buffer_zeroed, config=config,
        )  # fmt: skip

    return launch


def flag_variants():
    """Every dtype x option flag at the default multi-block and single-block configs, sm_80 and sm_90."""
    flags = ("HAS_WEIGHTS", "WRITE_GRAD", "HAS_SMOOTHING", "HAS_SOFTCAP", "ZERO_IGNORED_ROWS")
    for dtype_name, vocab_size in itertools.product(DTYPES, (128256, 32000)):
        config = tuning.default_config(vocab_size, DTYPES[dtype_name].itemsize)
        for values in ((True,) * 5, (False,) * 5, (True, True, False, True, False), (False, True, True, False, True)):
            on = dict(zip(flags, values))
            name = f"rows {dtype_name} V={vocab_size} {config.name()} " + " ".join(f"{f}={v}" for f, v in on.items())
            launch = rows_launch(dtype_name, vocab_size, config, weights=on["HAS_WEIGHTS"], write_grad=on["WRITE_GRAD"],
                                 smoothing=0.1 if on["HAS_SMOOTHING"] else 0.0, softcap=30.0 if on["HAS_SOFTCAP"] else None,
                                 grad_buffer_zeroed=not on["ZERO_IGNORED_ROWS"])  # fmt: skip
            yield name, (SM90, SM80), launch, (dtype_name, vocab_size, config)


def sweep_variants(vocab_sizes=(128256, 32000)):
    """Every variant bench/gpu_sweep.py times, bf16 and fp32, sm_90 (the sweep's call: no weights, smoothing 0.1);
    the softcap path too for the first of each kind (it is independent of the block, warp and cache switches)."""
    for dtype_name, vocab_size in itertools.product(("bfloat16", "float32"), vocab_sizes):
        configs = list(tuning.sweep_variants(vocab_size, DTYPES[dtype_name].itemsize))
        with_softcap = {configs[0], next((c for c in configs if c.single_block), configs[0])}
        for config in configs:
            for softcap in (None, 30.0) if config in with_softcap else (None,):
                name = f"sweep {dtype_name} V={vocab_size} {config.name()} softcap={softcap is not None}"
                launch = rows_launch(dtype_name, vocab_size, config, weights=False, softcap=softcap)
                yield name, (SM90,), launch, (dtype_name, vocab_size, config)


def scale_kernel_variants():
    for dtype_name, per_row in itertools.product(DTYPES, (False, True)):
        dtype = DTYPES[dtype_name]
        accumulation = torch.float64 if dtype == torch.float64 else torch.float32

        def launch(dtype=dtype, per_row=per_row, accumulation=accumulation):
            grad_output = meta(NUM_ROWS, dtype=accumulation) if per_row else meta(dtype=accumulation)
            triton_launch.scale_rows_(meta(NUM_ROWS, 128256, dtype=dtype), grad_output)

        yield f"scale {dtype_name} per_row={per_row}", (SM90, SM80), launch, None


def sass_summary(cubin: bytes) -> dict:
    """Registers, stack bytes (spills), and the global loads by width and the cp.async copies of a cubin, read with
    the cuobjdump that Triton's package carries."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", handle.name], capture_output=True, text=True)
        sass = subprocess.run([str(tool), "-sass", handle.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage.stdout)
    opcodes = Counter(re.findall(r"\b(LDG(?:\.[A-Z0-9_]+)*|LDGSTS(?:\.[A-Z0-9_]+)*|LDL|STL)\b", sass))
    loads = Counter()
    for opcode, count in opcodes.items():
        if opcode.startswith("LDGSTS"):
            loads["cp.async"] += count
        elif opcode.startswith("LDG"):
            width = next((w for w in ("128", "64", "U16", "U8") if opcode.endswith("." + w)), "32")
            loads[{"128": "16B", "64": "8B", "U16": "2B", "U8": "1B", "32": "4B"}[width]] += count
    return {
        "registers": int(found.group(1)) if found else -1,
        "stack": int(found.group(2)) if found else -1,
        "local_accesses": opcodes.get("LDL", 0) + opcodes.get("STL", 0),
        "loads": dict(loads),
    }


def resident_programs(registers: int, num_warps: int, shared_bytes: int) -> int:
    """Programs of one kernel that fit one sm_90 multiprocessor at once: registers (allocated per warp in units of
    256, i.e. per thread rounded up to 8), warps (64) and shared memory."""
    per_warp = -(-registers // 8) * 8 * 32
    by_registers = SM90_REGISTERS // (per_warp * num_warps)
    by_warps = SM90_MAX_WARPS // num_warps
    by_shared = SM90_SHARED_BYTES // (shared_bytes + SM90_SHARED_PER_BLOCK_RESERVED)
    return min(by_registers, by_warps, by_shared)


def describe(compiled, config: Optional[tuning.KernelConfig]) -> str:
    summary = sass_summary(compiled.asm["cubin"])
    warps = compiled.metadata.num_warps
    resident = resident_programs(summary["registers"], warps, compiled.metadata.shared)
    loads = " ".join(f"{width}:{count}" for width, count in sorted(summary["loads"].items()))
    line = (f"registers={summary['registers']} stack={summary['stack']} shared={compiled.metadata.shared} "
            f"warps={warps} resident_per_sm={resident} loads[{loads}]")  # fmt: skip
    if config is not None and resident < config.programs_per_sm:
        line += f" (programs_per_sm={config.programs_per_sm} is not co-resident)"
    return line


def all_kernels(quick: bool = False) -> list[tuple]:
    """(name, targets, launch, case) of every distinct kernel to compile; case is (dtype, V, config) for the row
    kernel, None for the scale kernel."""
    groups = [flag_variants(), scale_kernel_variants()] + ([] if quick else [sweep_variants()])
    return list(itertools.chain(*groups))


def resource_table(vocab_sizes=(128256, 32000)) -> str:
    """The sweep's variants at sm_90 as a markdown table (docs/kernel-notes.md)."""
    lines = ["| dtype | V | variant | warps | registers | stack | shared KB | resident / SM | global loads |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, _, launch, (dtype_name, vocab_size, config) in sweep_variants(vocab_sizes):
        if name.endswith("softcap=True"):
            continue
        (compiled,) = compile_launches(launch, SM90)
        summary = sass_summary(compiled.asm["cubin"])
        warps = compiled.metadata.num_warps
        resident = resident_programs(summary["registers"], warps, compiled.metadata.shared)
        loads = ", ".join(f"{count} x {width}" for width, count in sorted(summary["loads"].items()))
        lines.append(f"| {dtype_name} | {vocab_size} | {config.name()} | {warps} | {summary['registers']} | "
                     f"{summary['stack']} | {compiled.metadata.shared / 1024:.1f} | {resident} | {loads} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="flag variants and the scale kernel only")
    parser.add_argument("--report", action="store_true", help="print the resources of each sm_90 kernel")
    parser.add_argument("--table", action="store_true", help="only print the resource table of the sweep's variants")
    args = parser.parse_args()
    if args.table:
        print(f"triton {triton.__version__}, sm_90, N = {NUM_ROWS}")
        resource_table()
        return
    kernels = all_kernels(args.quick)
    for name, targets, launch, case in kernels:
        for target in targets:
            for compiled in compile_launches(launch, target):
                assert compiled.asm.get("cubin"), f"{name}: no cubin for sm_{target.arch}"
                if args.report and target is SM90:
                    print(f"   sm_90 {describe(compiled, case[2] if case else None)}")
        print(f"ok {name}", flush=True)
    print(f"compiled {len(kernels)} kernels")


if __name__ == "__main__":
    main()
