"""Hardware floors measured on the benchmark's own device in the same run (docs/design.md, section 5).

- copy bandwidth: a device-to-device copy of a large buffer, bytes read + written per second;
- matmul throughput: a square matrix product, 2 * n**3 flops per product, per dtype (bf16 and fp32 GEMMs
  differ by 4x or more, on the CPU too where AMX runs bf16), on the fastest GEMM at hand: for float32 on the
  CPU also oneDNN's, which the fused linear loss uses there and which runs at about twice MKL's sgemm (what
  torch.mm calls) on AMD CPUs (docs/kernel-notes.md, fused linear "v4"); with torch.mm alone ours ran "faster than
  the floor".
"""
from __future__ import annotations

import time
from typing import Optional

import torch

# On CUDA a card idles at low clocks and ramps up under load: each floor first runs its operation for WARMUP_S,
# then takes the best of BATCHES batches of OPS_PER_BATCH operations, each batch between one pair of events (a
# single slow batch, or the first operations after process start, would give a slow floor and flatter every ratio).
# On the CPU (no clock ramp to wait for; the floors of the CPU benchmarks and the dry run) fewer, shorter batches.
SCHEDULE = {"cuda": {"warmup_s": 0.5, "batches": 5, "ops_per_batch": 50},
            "cpu": {"warmup_s": 0.0, "batches": 3, "ops_per_batch": 3}}  # fmt: skip


def _best_seconds_per_op(fn, device: str) -> float:
    """Seconds per call of fn(): the best batch's mean, after the warm-up (SCHEDULE)."""
    schedule = SCHEDULE["cuda" if device == "cuda" else "cpu"]
    fn()
    begin = time.perf_counter()
    while time.perf_counter() - begin < schedule["warmup_s"]:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    best = float("inf")
    for _ in range(schedule["batches"]):
        if device == "cuda":
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(schedule["ops_per_batch"]):
                fn()
            stop.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(stop) / 1e3
        else:
            begin = time.perf_counter()
            for _ in range(schedule["ops_per_batch"]):
                fn()
            seconds = time.perf_counter() - begin
        best = min(best, seconds / schedule["ops_per_batch"])
    return best


def copy_bandwidth(device: str, num_bytes: int = 1 << 30) -> float:
    """Bytes per second moved (read + written) by a device-to-device copy."""
    num_bytes = num_bytes if device == "cuda" else num_bytes // 8
    source = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    seconds = _best_seconds_per_op(lambda: target.copy_(source), device)
    return 2 * num_bytes / seconds


def matmul_throughput(device: str, dtype: torch.dtype, size: Optional[int] = None) -> float:
    """Flops per second of a square matrix product in dtype (default size 8192 on CUDA, 4096 for float32 there,
    whose products take 15x longer; 2048 on CPU)."""
    if size is None:
        size = (4096 if dtype == torch.float32 else 8192) if device == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    products = [lambda: a @ b]
    if device == "cpu" and dtype == torch.float32:
        from sga.kernels import linear_gemms

        if linear_gemms.onednn_works():
            b_transposed = b.t().contiguous()
            products.append(lambda: linear_gemms.onednn_linear(a, b_transposed))  # a @ b on oneDNN
    seconds = min(_best_seconds_per_op(product, device) for product in products)
    return 2 * size**3 / seconds


def measure(device: str, matmul_size: Optional[int] = None) -> dict:
    """All floors of one process as a row: copy GB/s, bf16 and fp32 matmul TFLOP/s (bench/conftest.py writes it
    to floors.jsonl, bench/gpu_check.sh prints it beside the ratios)."""
    copy = copy_bandwidth(device)
    matmul = {name: matmul_throughput(device, getattr(torch, name), matmul_size) for name in ("bfloat16", "float32")}
    return {"copy_bytes_per_s": copy, "matmul_flops_per_s": matmul, "copy_GBps": copy / 1e9,
            "bf16_TFLOPs": matmul["bfloat16"] / 1e12, "fp32_TFLOPs": matmul["float32"] / 1e12}  # fmt: skip
