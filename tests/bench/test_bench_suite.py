"""bench/gpu_check.sh, the one script a GPU machine runs, dry-run end to end on the CPU in smoke mode (tiny
shapes, kernels in Triton's interpreter): the CUDA test step, the planted-defect step, the kernel sweep, the
benchmark suite (cases, phases, memory harness, rows, ratio table, plot) and the packing of its results into
at most 8 files, so that no GPU time is spent on a broken script."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
DEVICE_FILE_LIMIT = 8  # the device machine returns at most 8 files from $OUT


def test_gpu_check_dry_run_packs_everything_into_few_files(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, SGA_BENCH_SMOKE="1", OUT=str(out), TRITON_INTERPRET="1")
    env.pop("SGA_BENCH_RESULTS", None)
    result = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], env=env, capture_output=True, text=True,
                            timeout=1800)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    files = sorted(path for path in out.rglob("*") if path.is_file())
    assert len(files) <= DEVICE_FILE_LIMIT, files
    assert {"results.tar.gz", "summary.txt", "tuning_table.py", "logits_vs_vocab.png"} == {p.name for p in files}

    results = tmp_path / "results"
    with tarfile.open(out / "results.tar.gz") as archive:
        archive.extractall(results, filter="data")
    for log in ("device.txt", "cuda_tests.log", "cuda_tests_planted_defect.log", "sweep.log", "bench_logits.log",
                "bench_linear.log", "sweep.jsonl", "sweep_table.txt", "logits_table.txt", "linear_table.txt"):
        assert (results / log).is_file(), log

    summary = (out / "summary.txt").read_text()
    assert "CUDA logits tests against a halved gradient: not run (no CUDA device)" in summary
    assert "kernel sweep (exit 0)" in summary and "variants that disagreed with the torch backend: 0" in summary
    assert "logits benchmark (exit 0)" in summary and "fused linear benchmark (exit 0)" in summary

    sweep_rows = [json.loads(line) for line in (results / "sweep.jsonl").read_text().splitlines()]
    assert {(r["dtype"], r["vocab_size"]) for r in sweep_rows} == {("bfloat16", 100), ("float32", 70)}
    assert all(r["correct"] for r in sweep_rows) and len({r["variant"] for r in sweep_rows}) >= 15
    table_source = (out / "tuning_table.py").read_text()
    from sga.kernels.tuning import KernelConfig

    namespace = {"KernelConfig": KernelConfig}
    exec(table_source, namespace)  # the table is valid Python to paste into kernels/sga_kernels/tuning.py
    assert set(namespace["TABLE"]) == {("cpu", "bfloat16", 100), ("cpu", "float32", 70)}

    rows = {name: [json.loads(line) for line in (results / f"{name}.jsonl").read_text().splitlines()]
            for name in ("logits", "linear")}  # fmt: skip
    assert {r["implementation"] for r in rows["logits"]} == {"ours", "ours_inplace", "torch_eager"}
    linear_impls = [r["implementation"] for r in rows["linear"]]
    assert set(linear_impls) == {"ours", "ours_low_memory", "materialized_kernel", "torch_eager"}
    assert linear_impls[0] == "ours" and rows["logits"][0]["implementation"] == "ours"  # ours before the others
    for row in rows["logits"] + rows["linear"]:
        assert row["median_ms"] > 0 and row["floor_ms"] > 0 and row["device"] and row["torch"]
        # memory comes with forward+backward only (the RSS of a tiny case is too coarse to check its value)
        assert ("peak_extra_bytes" in row) == (row["phase"] == "forward+backward")
    eager = next(r for r in rows["linear"] if r["implementation"] == "torch_eager" and r["phase"] == "forward+backward")
    assert "time_ratio_vs_ours" in eager and "memory_ratio_vs_ours" in eager
    assert "torch_eager" in (results / "logits_table.txt").read_text()
    assert (out / "logits_vs_vocab.png").stat().st_size > 0


def test_report_reads_the_rows_of_a_results_file(tmp_path):
    rows = [{"op": "logits", "implementation": impl, "phase": "forward+backward", "num_tokens": 8, "vocab_size": v,
             "dtype": "bfloat16", "median_ms": ms * v, "floor_ms": 0.1, "peak_extra_bytes": 10, "device": "cpu"}
            for v in (100, 200) for impl, ms in (("ours", 1.0), ("torch_eager", 3.0))]  # fmt: skip
    path = tmp_path / "logits.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = subprocess.run([sys.executable, "report.py", str(path), "--plot", str(tmp_path / "p.png")], cwd=BENCH,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "torch_eager 3.00x" in table.stdout and (tmp_path / "p.png").stat().st_size > 0


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
