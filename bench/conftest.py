"""Benchmark session setup: hardware floors measured once, rows collected, a ratio table printed at the end."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from floors import copy_bandwidth, matmul_throughput  # noqa: E402
from report import format_table  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# SGA_BENCH_SMOKE=1: tiny shapes on the CPU, so that the test suite runs the whole benchmark machinery in seconds
SHAPE_SET = "smoke" if os.environ.get("SGA_BENCH_SMOKE") == "1" and DEVICE == "cpu" else DEVICE
COLLECTED_ROWS: list[dict] = []


@pytest.fixture(scope="session")
def floors() -> dict:
    """The device's copy bandwidth (bytes/s) and matmul throughput (flop/s, by dtype name), measured in this run.

    The smoke run's matmuls are small: its times mean nothing, and a CPU without bfloat16 GEMM instructions (no
    AVX-512) takes minutes for one bfloat16 product of the real size."""
    size = 256 if SHAPE_SET == "smoke" else None
    matmul = {name: matmul_throughput(DEVICE, getattr(torch, name), size) for name in ("bfloat16", "float32")}
    return {"copy_bytes_per_s": copy_bandwidth(DEVICE), "matmul_flops_per_s": matmul}


@pytest.fixture
def collect_row():
    return COLLECTED_ROWS.append


def pytest_terminal_summary(terminalreporter):
    if COLLECTED_ROWS:
        terminalreporter.write_line("")
        terminalreporter.write_line(format_table(COLLECTED_ROWS))
