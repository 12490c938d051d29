"""bench/gpu_check.sh, the one script a GPU machine runs, dry-run end to end on the CPU in smoke mode (tiny
shapes, kernels in Triton's interpreter): the setup and import check, the CUDA test step, the planted-defect
step, the engine's SGA step (its CPU twin), the kernel sweep with two planted broken variants, the benchmark
suite (cases and their order, phases, memory harness, floors, rows, ratio tables, plot) and the packing of its
results into at most 8 files, so that no GPU time is spent on a broken script. Also: its written time budget adds
up to at most 8.5 minutes."""
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
DEVICE_FILE_LIMIT = 8  # the device machine returns at most 8 files from $OUT
LEASE_BUDGET_S = 510  # 8.5 minutes of the lease's 10 per command and 15 in all (the machine's start included)
CUDA_TEST_FILES = ("test_smoothed_ga_cuda.py", "test_linear_smoothed_ga.py", "test_token_loss.py",
                   "test_linear_chunk_loop.py", "test_trainer_cuda.py")  # fmt: skip


def test_the_written_time_budget_fits_the_lease():
    """The budget at the top of gpu_check.sh: the steps' shares plus the kill grace stay within its total, and the
    total within 8.5 minutes; the comment table says the same numbers as the code."""
    script = (BENCH / "gpu_check.sh").read_text()
    shares = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A BUDGET_S=\((.*)\)", script).group(1)))
    shares = {name: int(seconds) for name, seconds in shares.items()}
    steps = re.search(r"STEPS=\((.*)\)", script).group(1).split()
    total = int(re.search(r"BUDGET_TOTAL_S=(\d+)", script).group(1))
    grace = int(re.search(r"KILL_GRACE_S=(\d+)", script).group(1))
    assert set(steps) == set(shares)
    assert sum(shares.values()) + grace <= total <= LEASE_BUDGET_S, (shares, total)
    for name, seconds in shares.items():  # the comment table at the top
        assert re.search(rf"^#   {name} +{seconds} ", script, re.MULTILINE), name
    assert re.search(rf"^#   total +{sum(shares.values())} ", script, re.MULTILINE)
    assert int(re.search(r"SWEEP_STARTUP_S=(\d+)", script).group(1)) < shares["sweep"]


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
    for log in ("device.txt", "install.log", "cuda_tests.log", "cuda_tests_planted_defect.log", "sweep.log",
                "bench_logits.log", "bench_linear.log", "bench_engine.log", "sweep.jsonl", "sweep_table.txt",
                "logits_table.txt", "linear_table.txt", "engine_table.txt", "floors.jsonl"):  # fmt: skip
        assert (results / log).is_file(), log

    summary = (out / "summary.txt").read_text()
    for step in ("setup: done", "cuda_tests: exit", "planted: exit 0", "engine: exit 0", "sweep: exit 0",
                 "logits: exit 0", "linear: exit 0"):  # fmt: skip
        assert f"   {step}" in summary, step
    assert "STOPPED" not in summary and "TIMED OUT" not in summary
    assert "CUDA logits tests against a halved gradient: not run (no CUDA device)" in summary
    # every CUDA test file was collected (a collection error would show as ERROR), its tests skipped with a reason
    cuda_log = (results / "cuda_tests.log").read_text()
    assert "ERROR" not in cuda_log and "error" not in cuda_log.splitlines()[-1]
    for name in CUDA_TEST_FILES:
        assert re.search(rf"SKIPPED \[\d+\] tests/\w+/{name}:\d+: needs a CUDA device", cuda_log), name
    # the alternatives' versions or import errors, and where sga.kernels was imported from
    device = (results / "device.txt").read_text()
    for package in ("torch", "triton", "transformers", "peft", "liger_kernel", "cut_cross_entropy"):
        assert re.search(rf"^{package}( \d| ?: import failed)", device, re.MULTILINE), package
    assert "liger_kernel.transformers.apply_liger_kernel_to_llama" in device
    assert "sga.kernels from " + str(BENCH.parent) in device
    # the floors beside the ratios: the sweep's and each benchmark process's
    assert re.search(r"gpu_sweep.py: .* copy \d+ GB/s", summary)
    floors = r"floors of test_bench_linear.py: copy \d+ GB/s \(read \+ write\), bf16 [\d.e+-]+ TFLOP/s"
    assert re.search(floors + r".*\n== logits benchmark", summary, re.DOTALL)  # in the floors section
    assert re.search("== fused linear benchmark: exit 0.*\n" + floors, summary)  # and beside its ratio table

    # the sweep: the two planted broken variants are reported wrong, never timed, never ranked
    assert "sweep: exit 0" in summary and "variants that disagreed with the torch backend: 0" in summary
    assert "planted broken variants reported wrong: 2 of 2" in summary
    assert "caught planted-writes-nothing: gradient elements left unwritten" in summary
    assert "caught planted-raises: raised ValueError" in summary
    sweep_rows = [json.loads(line) for line in (results / "sweep.jsonl").read_text().splitlines()]
    assert {(r["dtype"], r["vocab_size"]) for r in sweep_rows} == {("bfloat16", 100), ("float32", 70)}
    planted = [r for r in sweep_rows if r["planted"]]
    assert sorted(r["variant"] for r in planted) == ["planted-raises", "planted-writes-nothing"]
    assert all(not r["correct"] and r["median_ms"] is None for r in planted)
    real = [r for r in sweep_rows if not r["planted"]]
    assert all(r["correct"] and r["median_ms"] > 0 for r in real) and len({r["variant"] for r in real}) >= 15
    assert sweep_rows[0]["variant"] == real[0]["variant"] and sweep_rows[1]["variant"] == "planted-writes-nothing"
    sweep_table = (results / "sweep_table.txt").read_text()
    ranked = [line.split()[3] for line in sweep_table.splitlines()[1:] if re.match(r"(bfloat16|float32) ", line)]
    assert len(ranked) == 2 and not any(name.startswith("planted") for name in ranked)
    table_source = (out / "tuning_table.py").read_text()
    from sga.kernels.tuning import KernelConfig

    namespace = {"KernelConfig": KernelConfig}
    exec(table_source, namespace)  # the table is valid Python to paste into kernels/sga_kernels/tuning.py
    assert set(namespace["TABLE"]) == {("cpu", "bfloat16", 100), ("cpu", "float32", 70)}
    assert KernelConfig(**planted[1]["config"]) not in namespace["TABLE"].values()  # the raising config

    rows = {name: [json.loads(line) for line in (results / f"{name}.jsonl").read_text().splitlines()]
            for name in ("logits", "linear", "engine")}  # fmt: skip
    assert {r["implementation"] for r in rows["logits"]} == {"ours", "ours_inplace", "torch_eager"}
    linear_impls = [r["implementation"] for r in rows["linear"]]
    assert set(linear_impls) == {"ours", "ours_low_memory", "materialized_kernel", "torch_eager"}
    assert linear_impls[0] == "ours" and rows["logits"][0]["implementation"] == "ours"  # ours before the others
    for name in ("logits", "linear"):  # the goal's phase at every shape before any other phase
        phases = [r["phase"] for r in rows[name]]
        assert phases == sorted(phases, key=lambda phase: phase != "forward+backward"), phases
    for row in rows["logits"] + rows["linear"]:
        assert row["median_ms"] > 0 and row["floor_ms"] > 0 and row["device"] and row["torch"]
        # memory comes with forward+backward only (the RSS of a tiny case is too coarse to check its value)
        assert ("peak_extra_bytes" in row) == (row["phase"] == "forward+backward")
    eager = next(r for r in rows["linear"] if r["implementation"] == "torch_eager" and r["phase"] == "forward+backward")
    assert "time_ratio_vs_ours" in eager and "memory_ratio_vs_ours" in eager
    assert "torch_eager" in (results / "logits_table.txt").read_text()
    assert (out / "logits_vs_vocab.png").stat().st_size > 0

    # the engine's CPU twin: ours and the model's own loss, full weights and LoRA; Liger skipped with its reason
    engine = {(r["variant"], r["implementation"]): r for r in rows["engine"]}
    assert set(engine) == {(v, i) for v in ("full", "lora") for i in ("ours", "model_loss")}
    for variant in ("full", "lora"):
        assert engine[(variant, "ours")]["median_ms"] > 0 and "time_ratio_vs_ours" in engine[(variant, "model_loss")]
    assert engine[("lora", "ours")]["trainable_parameters"] < engine[("full", "ours")]["trainable_parameters"]
    assert "SKIPPED [2] test_bench_engine.py" in (results / "bench_engine.log").read_text()
    assert "Liger-Kernel runs on CUDA only" in summary and "model_loss" in (results / "engine_table.txt").read_text()


@pytest.mark.parametrize("copy", ["without kernels", "elsewhere"])
def test_a_broken_install_stops_the_run_with_a_clear_line(tmp_path, copy):
    """An sga that shadows the checkout (first on PYTHONPATH): without sga.kernels (an editable install's finder
    still maps sga.kernels to the checkout, so only the check of sga's own path catches it), or a whole other
    copy. The script stops after the import check, exit 1, with the reason and the install log in summary.txt;
    nothing runs."""
    fake = tmp_path / "fake" / "sga"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    if copy == "elsewhere":
        (fake / "kernels").mkdir()
        (fake / "kernels" / "__init__.py").write_text("")
    out = tmp_path / "out"
    env = dict(os.environ, SGA_BENCH_SMOKE="1", OUT=str(out), TRITON_INTERPRET="1", TMPDIR=str(tmp_path),
               PYTHONPATH=str(fake.parent))  # fmt: skip
    env.pop("SGA_BENCH_RESULTS", None)
    result = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:]
    summary = (out / "summary.txt").read_text()
    assert "== STOPPED: import sga.kernels fails after the install (or imports another copy)" in summary
    assert f"sga imported from {fake}" in summary
    assert "   setup: STOPPED" in summary and "   cuda_tests: not run yet" in summary


def _session_processes(session_id: int) -> list[int]:
    """Live (not zombie) processes of the session the test started, by session id, read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":  # pid (comm) state ppid pgrp session ...
            found.append(int(stat.parent.name))
    return found


def _kill_session(session_id: int) -> None:
    """SIGKILL every process of the session the test started."""
    for pid in _session_processes(session_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_a_step_past_its_limit_is_stopped_and_a_stopped_run_keeps_the_finished_steps(tmp_path, stop):
    """With every limit at its 5 s minimum the CUDA test step (pytest alone takes longer to start) is stopped by
    its timeout and recorded as such; summary.txt and results.tar.gz are rewritten right after it, so a run killed
    outright (SIGKILL: no exit trap runs) still returns that step's log and verdict. A run sent SIGTERM (what a lease
    ending may send) stops at once, the step in flight with it, and says so in its summary."""
    out = tmp_path / "out"
    env = dict(os.environ, SGA_BENCH_SMOKE="1", OUT=str(out), TRITON_INTERPRET="1", SGA_GPU_CHECK_TIME_SCALE="0",
               TMPDIR=str(tmp_path))  # fmt: skip
    env.pop("SGA_BENCH_RESULTS", None)
    process = subprocess.Popen(["bash", str(BENCH / "gpu_check.sh")], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    summary = out / "summary.txt"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and "   cuda_tests: not run" in (summary.read_text() if summary.exists()
                                                                           else "   cuda_tests: not run"):  # fmt: skip
            time.sleep(0.5)
        os.kill(process.pid, stop)  # the script only: its steps run in process groups of their own
        process.wait(timeout=60)
    finally:
        _kill_session(process.pid)  # anything left of this run (its steps run in process groups of their own)
    text = summary.read_text()
    assert re.search(r"   cuda_tests: TIMED OUT after \d+ s \(limit 5 s, exit 124\)", text), text
    with tarfile.open(out / "results.tar.gz") as archive:
        names = archive.getnames()
    assert "./cuda_tests.log" in names and "./device.txt" in names
    if stop == signal.SIGKILL:
        assert "planted: not run yet" in text
    else:
        assert process.returncode == 143
        # the signal lands in a step (planted, or engine on a fast machine) or in the pause after one
        stopped = re.search(r"== STOPPED: interrupted by a signal during (?:the pause after )?(\w+)", text)
        assert stopped and stopped.group(1) in ("cuda_tests", "planted", "engine"), text
        if "the pause after" not in stopped.group(0):
            assert f"   {stopped.group(1)}: INTERRUPTED by a signal" in text
        assert "sweep: not run yet" in text
        # nothing of the run is left: the step in flight was stopped with the script
        deadline = time.monotonic() + 30
        while _session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _session_processes(process.pid)


def test_benchmark_order_runs_the_goal_phase_first_and_the_compiled_baseline_last():
    sys.path.insert(0, str(BENCH))
    from harness import benchmark_order

    order = benchmark_order(["goal", "other"], ("forward+backward", "forward"), ("ours", "torch_compile", "liger"))
    assert order[:4] == [("goal", "forward+backward", "ours"), ("goal", "forward+backward", "liger"),
                         ("other", "forward+backward", "ours"), ("other", "forward+backward", "liger")]  # fmt: skip
    assert order[4:6] == [("goal", "forward+backward", "torch_compile"), ("other", "forward+backward", "torch_compile")]
    assert [phase for _, phase, _ in order[6:]] == ["forward"] * 6 and order[-1][2] == "torch_compile"


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
