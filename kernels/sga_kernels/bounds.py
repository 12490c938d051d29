"""Splitting a range into near-equal consecutive parts: the one rule behind the CPU GEMM blocks of the fused
linear loss and the row chunks of the compiled torch backend."""
from __future__ import annotations


def near_equal_bounds(total: int, count: int) -> list[tuple[int, int]]:
    """(start, stop) of ``count`` consecutive parts covering range(total), sizes differing by at most one:
    edge i = floor(total * i / count)."""
    if count < 1:
        raise ValueError(f"near_equal_bounds: count must be at least 1, got {count} (total={total})")
    edges = [total * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))
