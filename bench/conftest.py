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

import floors as hardware_floors  # noqa: E402
from harness import environment, write_rows  # noqa: E402
from report import format_table  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# SGA_BENCH_SMOKE=1: tiny shapes on the CPU, so that the test suite runs the whole benchmark machinery in seconds
SHAPE_SET = "smoke" if os.environ.get("SGA_BENCH_SMOKE") == "1" and DEVICE == "cpu" else DEVICE
COLLECTED_ROWS: list[dict] = []


@pytest.fixture(scope="session")
def floors(request) -> dict:
    """The device's copy bandwidth (bytes/s) and matmul throughput (flop/s, by dtype name), measured in this run
    (after a warm-up, the best of several batches: bench/floors.py), also written to floors.jsonl (one row per
    benchmark process; bench/gpu_check.sh prints them beside the ratios).

    The smoke run's matmuls are small: its times mean nothing, and a CPU without bfloat16 GEMM instructions (no
    AVX-512) takes minutes for one bfloat16 product of the real size."""
    measured = hardware_floors.measure(DEVICE, 256 if SHAPE_SET == "smoke" else None)
    files = sorted({Path(str(item.fspath)).name for item in request.session.items})
    write_rows("floors", [{"op": "floors", "files": files, "copy_GBps": measured["copy_GBps"],
                           "bf16_TFLOPs": measured["bf16_TFLOPs"], "fp32_TFLOPs": measured["fp32_TFLOPs"],
                           **environment(DEVICE)}])  # fmt: skip
    return measured


@pytest.fixture
def collect_row():
    return COLLECTED_ROWS.append


def pytest_terminal_summary(terminalreporter):
    if COLLECTED_ROWS:
        terminalreporter.write_line("")
        terminalreporter.write_line(format_table(COLLECTED_ROWS))
