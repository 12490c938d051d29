"""The benchmark suite's machinery (bench/: cases, phases, the memory harness, rows, the ratio table, the plot)
run end to end on tiny shapes, so that a GPU session does not spend device time on a broken benchmark."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_bench_suite_runs_on_tiny_shapes_and_reports(tmp_path):
    env = dict(os.environ, SGA_BENCH_SMOKE="1", SGA_BENCH_RESULTS=str(tmp_path), TRITON_INTERPRET="1")
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
        "-k", "ours or eager or materialized", "test_bench_smoothed_ga.py", "test_bench_linear.py",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=BENCH, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    rows = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
            for name in ("logits", "linear")}  # fmt: skip
    logits_impls = {r["implementation"] for r in rows["logits"]}
    linear_impls = {r["implementation"] for r in rows["linear"]}
    assert logits_impls == {"ours", "ours_inplace", "torch_eager"}
    assert linear_impls == {"ours", "ours_low_memory", "materialized_kernel", "torch_eager"}
    for row in rows["logits"] + rows["linear"]:
        assert row["median_ms"] > 0 and row["floor_ms"] > 0 and row["device"] and row["torch"]
        # memory comes with forward+backward only (the RSS of a tiny case is too coarse to check its value)
        assert ("peak_extra_bytes" in row) == (row["phase"] == "forward+backward")
    ours_linear = next(r for r in rows["linear"] if r["implementation"] == "ours" and r["phase"] == "forward+backward")
    assert "time_ratio_vs_torch_eager" in ours_linear and "memory_ratio_vs_torch_eager" in ours_linear
    # the ratio table at the end of the run, and the table and plot from the results file
    assert "alternatives" in result.stdout and "linear" in result.stdout and "logits" in result.stdout
    plot = tmp_path / "plot.png"
    report = [sys.executable, "report.py", str(tmp_path / "logits.jsonl"), "--plot", str(plot)]
    table = subprocess.run(report, cwd=BENCH, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "torch_eager" in table.stdout and plot.stat().st_size > 0


def test_engine_step_bench_runs_on_tiny_shapes(tmp_path):
    """bench/test_bench_engine.py (one SGA training step, engine vs the model's own loss) in smoke mode."""
    env = dict(os.environ, SGA_BENCH_SMOKE="1", SGA_BENCH_RESULTS=str(tmp_path), TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only", "test_bench_engine.py"]
    result = subprocess.run(command, cwd=BENCH, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "engine.jsonl").read_text().splitlines()]
    assert {r["implementation"] for r in rows} == {"ours", "model_loss"}
    ours = next(r for r in rows if r["implementation"] == "ours")
    assert ours["median_ms"] > 0 and "time_ratio_vs_model_loss" in ours
    assert "engine" in result.stdout  # the ratio table
