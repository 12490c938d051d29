"""Launch configurations of the logits row kernel: the variants, and the table that picks one per case.

A :class:`KernelConfig` names every compile-time switch of ``smoothed_ga_triton.smoothed_ga_rows_kernel`` that
changes speed but not results, plus the persistent grid's size. ``bench/gpu_sweep.py`` times the variants of
:func:`sweep_variants` on a GPU and prints the winners as ``TABLE`` entries, keyed by (architecture, dtype,
largest V of the range); :func:`config_for` reads the table and falls back to :func:`default_config`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Iterator

# largest row the sweep tries to keep whole in registers: 2**15 fp32 values over 32 warps is 32 registers a thread
SINGLE_BLOCK_MAX_V = 1 << 15
# largest row the default keeps whole: up to 2**14 the single-block kernel spills nothing on sm_90 at 8 / 32 warps
# (Triton 3.6 with the JIT's real specialization, `tests/kernels/compile_kernels_for_gpu.py`; docs/kernel-notes.md,
# "Resources with the JIT's specialization"), at 2**15 it spills 64 bytes a thread at 32 warps and 88 at 16
SINGLE_BLOCK_DEFAULT_MAX_V = 1 << 14
# values a thread in the sweep's two-sweep variants: a budget choice, not a spill limit (64 a thread compile without
# spills, e.g. bf16 16384-element blocks at 8 warps: 235 registers; 128 a thread spill), since 64 a thread leaves one
# program of 4-8 warps on an SM, too few to hide the memory latency
MAX_ELEMENTS_PER_THREAD = 32


@dataclass(frozen=True)
class KernelConfig:
    """One variant of the row kernel.

    block_v: elements per block of the two sweeps (a power of 2); with single_block, the whole row in one block.
    num_warps: warps per program. num_stages: software-pipelining depth of sweep 1 (1 = a plain loop).
    programs_per_sm: persistent programs per multiprocessor (rows in flight).
    reverse_sweep2: sweep 2 walks the row's blocks last to first (the last ones read are still in L2).
    cache_hints: sweep 1 loads evict_last (keep for sweep 2), sweep 2 loads evict_first, stores stream (.cs).
    ftz_exp2: exp2 as the flush-to-zero MUFU instruction (inline PTX; plain tl.exp2 in the interpreter).
    """

    block_v: int
    num_warps: int
    num_stages: int = 1
    programs_per_sm: int = 2
    single_block: bool = False
    reverse_sweep2: bool = False
    cache_hints: bool = False
    ftz_exp2: bool = False

    def name(self) -> str:
        flags = [f"b{self.block_v}", f"w{self.num_warps}", f"s{self.num_stages}", f"p{self.programs_per_sm}"]
        flags += [flag for flag, on in (("single", self.single_block), ("rev", self.reverse_sweep2),
                                        ("hints", self.cache_hints), ("ftz", self.ftz_exp2)) if on]
        return "-".join(flags)

    def as_dict(self) -> dict:
        return asdict(self)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def fits_single_block(vocab_size: int) -> bool:
    return vocab_size <= SINGLE_BLOCK_MAX_V


def default_config(vocab_size: int, element_size: int) -> KernelConfig:
    """The untuned choice, read off the sm_90 resource table (docs/kernel-notes.md, "Resources with the JIT's
    specialization"; Triton 3.6, the real JIT specialization: 16-byte loads and cp.async):

    - rows up to 2**14: the whole row in registers (each logit read from HBM once), no spills there;
    - longer rows: two sweeps over 32 KB blocks (16384 bf16 / 8192 fp32 elements) at 16 warps, sweep 1 pipelined two
      deep, sweep 2 reversed, one program per SM. 123 (bf16) / 105 (fp32) registers, no spills. One program per SM
      is chosen for L2, not registers (8-warp programs of 16 KB blocks take 128 registers, so two would fit): 132
      rows in flight are 33 MB of bf16 V = 128256 rows, inside the H100's 50 MB L2, so sweep 2 reads from L2; two
      per SM would be 66 MB. With one program per SM the bytes in flight come from the block: 32 KB blocks, two
      stages deep, keep up to 64 KB an SM in flight, above Little's law's ~14 KB (H100, 3 TB/s) and ~22 KB (H200,
      4.8 TB/s) at ~0.6 us of latency, with room for a slower one; 16 KB blocks are at the H200's figure. A
      prediction until bench/gpu_sweep.py has timed the variants."""
    if vocab_size <= SINGLE_BLOCK_DEFAULT_MAX_V:
        return KernelConfig(block_v=next_power_of_2(vocab_size), num_warps=32 if vocab_size > 8192 else 8,
                            programs_per_sm=1, single_block=True)
    block = 32768 // element_size
    return KernelConfig(block_v=block, num_warps=16, num_stages=2, programs_per_sm=1, reverse_sweep2=True)


def interpreter_config(vocab_size: int) -> KernelConfig:
    """Triton's CPU interpreter: one numpy operation per block, so the biggest blocks are the fastest."""
    if fits_single_block(vocab_size):
        return KernelConfig(block_v=next_power_of_2(vocab_size), num_warps=1, programs_per_sm=4, single_block=True)
    return KernelConfig(block_v=SINGLE_BLOCK_MAX_V, num_warps=1, programs_per_sm=4)


# (architecture "sm90", dtype name, largest V of the range) -> the measured winner of bench/gpu_sweep.py.
# Empty: no GPU run has measured the variants yet (docs/kernel-notes.md); default_config applies everywhere.
TABLE: dict[tuple[str, str, int], KernelConfig] = {}


def config_for(architecture: str, dtype_name: str, vocab_size: int, element_size: int) -> KernelConfig:
    """The table's entry for the smallest V range holding vocab_size, else the default."""
    ranges = sorted(v_max for arch, dtype, v_max in TABLE if arch == architecture and dtype == dtype_name)
    for v_max in ranges:
        if vocab_size <= v_max:
            config = TABLE[(architecture, dtype_name, v_max)]
            if config.single_block and not fits_single_block(vocab_size):
                break
            if config.single_block:
                return replace(config, block_v=next_power_of_2(vocab_size))
            return config
    return default_config(vocab_size, element_size)


def sweep_variants(vocab_size: int, element_size: int) -> Iterator[KernelConfig]:
    """The variants bench/gpu_sweep.py times for one case, the default first, then one knob changed at a time around
    it (a full grid would not fit the sweep's budget): block size x warps, pipelining depth, programs per SM,
    reversed sweep 2, cache hints, ftz exp2, and the single-block path where the row fits."""
    base = replace(default_config(max(vocab_size, SINGLE_BLOCK_MAX_V + 1), element_size))
    seen = set()

    def once(config: KernelConfig):
        if config not in seen:
            seen.add(config)
            yield config

    yield from once(base)  # the default first: a sweep cut short by its budget has measured it
    for kilobytes in (8, 16, 32):
        for warps in (4, 8, 16, 32):
            block = kilobytes * 1024 // element_size
            if 4 <= block // (32 * warps) <= MAX_ELEMENTS_PER_THREAD:
                yield from once(replace(base, block_v=block, num_warps=warps))
    for stages in (1, 3, 4):
        yield from once(replace(base, num_stages=stages))
    for programs in (2, 4):  # at the default's registers only one program is resident: the others queue
        yield from once(replace(base, programs_per_sm=programs))
    # two co-resident programs per SM (8 warps of 16 KB blocks take 128 registers): twice the rows in flight, the
    # alternative to the default's one program per SM
    yield from once(replace(base, block_v=16384 // element_size, num_warps=8, programs_per_sm=2))
    yield from once(replace(base, reverse_sweep2=False))
    yield from once(replace(base, cache_hints=True))
    yield from once(replace(base, cache_hints=True, programs_per_sm=2))
    yield from once(replace(base, ftz_exp2=True))
    if fits_single_block(vocab_size):
        block = next_power_of_2(vocab_size)
        for warps in (16, 32):
            for programs in (1, 2):
                yield from once(KernelConfig(block_v=block, num_warps=warps, programs_per_sm=programs, single_block=True))
