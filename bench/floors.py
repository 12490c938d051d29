"""Hardware floors measured on the benchmark's own device in the same run (docs/design.md, section 5).

- copy bandwidth: a device-to-device copy of a large buffer, bytes read + written per second;
- matmul throughput: a square matrix product, 2 * n**3 flops per product, per dtype (bf16 and fp32 GEMMs
  differ by 4x or more, on the CPU too where AMX runs bf16), on the fastest GEMM at hand: for float32 on the
  CPU also oneDNN's, which the fused linear loss uses there and which runs at about twice MKL's sgemm (what
  torch.mm calls) on AMD CPUs (bench/NOTES.md, fused linear "v4"); with torch.mm alone ours ran "faster than
  the floor".
"""
from __future__ import annotations

import time
from typing import Optional

import torch


def _time(fn, device: str, repeats: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3 / repeats
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - begin) / repeats


def copy_bandwidth(device: str, num_bytes: int = 1 << 30) -> float:
    """Bytes per second moved (read + written) by a device-to-device copy."""
    num_bytes = num_bytes if device == "cuda" else num_bytes // 8
    source = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    seconds = _time(lambda: target.copy_(source), device, repeats=10)
    return 2 * num_bytes / seconds


def matmul_throughput(device: str, dtype: torch.dtype, size: Optional[int] = None) -> float:
    """Flops per second of a square matrix product in dtype (default size 8192 on CUDA, 2048 on CPU)."""
    size = size or (8192 if device == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    products = [lambda: a @ b]
    if device == "cpu" and dtype == torch.float32:
        from sga.kernels import linear_gemms

        if linear_gemms.onednn_works():
            b_transposed = b.t().contiguous()
            products.append(lambda: linear_gemms.onednn_linear(a, b_transposed))  # a @ b on oneDNN
    seconds = min(_time(product, device, repeats=10) for product in products)
    return 2 * size**3 / seconds
