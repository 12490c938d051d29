"""Time every variant of the logits row kernel (kernels/sga_kernels/tuning.py) and print the winners as the tuning table.

    python bench/gpu_sweep.py --out DIR [--budget-s 240] [--smoke]

On a GPU: N = 16384, V in {128256, 32000, 151936, 262144}, bf16 and fp32 (the goal's case first), forward with
the gradient (the whole forward+backward: backward is a no-op scale for grad_output = 1), beside the copy floor
measured in the same process. Each variant's compile time is counted against the budget; when the budget runs
out the sweep stops cleanly after the variant in flight and writes what it has. Each variant's results on the
first rows are checked against the torch backend before its time counts; a wrong variant is never chosen.

Writes DIR/sweep.jsonl (one row per variant and case), DIR/sweep_table.txt (the ratio table) and
DIR/tuning_table.py (the TABLE entries to paste into kernels/sga_kernels/tuning.py). --smoke: tiny shapes on the CPU under
Triton's interpreter, small blocks, for the test suite.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# the goal's vocabulary first for both dtypes: a sweep stopped by its budget still has the cases that matter most
CASES = [(16384, v, dtype) for v in (128256, 32000, 151936, 262144) for dtype in ("bfloat16", "float32")]
SMOKE_CASES = [(3, 100, "bfloat16"), (3, 70, "float32")]
SMOOTHING, SIGN, CHECK_ROWS = 0.1, -1.0, 64


def variants(vocab_size: int, element_size: int, smoke: bool):
    from sga.kernels import tuning

    configs = tuning.sweep_variants(vocab_size, element_size)
    if not smoke:
        return list(configs)
    # the interpreter: the same switches over small blocks, so that V spans several blocks and a tail
    shrunk = [config if config.single_block else replace(config, block_v=max(16, config.block_v // 512))
              for config in configs]  # fmt: skip
    return list(dict.fromkeys(shrunk))


def time_call(fn, device: str, budget_s: float) -> tuple[float, int]:
    """Median seconds of fn() over as many repeats as fit budget_s (3 to 20), after one warm-up call; on the CPU
    (the interpreter's smoke run, where times mean nothing) one call."""
    if device != "cuda":
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin, 1
    fn()
    torch.cuda.synchronize()
    probe_start, probe_stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe_start.record()
    fn()
    probe_stop.record()
    torch.cuda.synchronize()
    repeats = int(min(20, max(3, budget_s / max(probe_start.elapsed_time(probe_stop) / 1e3, 1e-6))))
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return sorted(times)[len(times) // 2], repeats


def reference_rows(logits, labels, grad_norm):
    """Loss and gradient of the first rows by the torch backend, the check each variant must pass."""
    from sga.kernels import smoothed_ga_torch

    rows = logits[:CHECK_ROWS]
    grad = torch.empty_like(rows)
    loss = smoothed_ga_torch.rows_forward(rows, labels[:CHECK_ROWS], None, grad_norm, grad, SMOOTHING, SIGN, -100)
    return loss, grad


def agrees(loss, grad, expected_loss, expected_grad) -> tuple[bool, float]:
    """Relative errors against the torch backend: loss to 1e-5 of its size, gradient to 2% (two bf16 roundings)
    of the largest value; a NaN, an all-zero or a halved gradient fails."""
    loss_error = ((loss - expected_loss).abs().max() / expected_loss.abs().max().clamp_min(1e-30)).item()
    grad_error = ((grad.float() - expected_grad.float()).abs().max()
                  / expected_grad.float().abs().max().clamp_min(1e-30)).item()  # fmt: skip
    worst = max(loss_error, grad_error)
    return bool(loss_error <= 1e-5 and grad_error <= 2e-2), worst


def sweep_case(case, device: str, smoke: bool, deadline: float, copy_bytes_per_s: float, env: dict):
    """Rows for every variant of one case, until the deadline."""
    from sga.kernels import smoothed_ga_triton

    num_tokens, vocab_size, dtype_name = case
    dtype = getattr(torch, dtype_name)
    generator_device = device  # inputs are generated where they live (no host-to-device copy of GBs)
    logits = torch.randn(num_tokens, vocab_size, device=generator_device, dtype=dtype)
    labels = torch.randint(0, vocab_size, (num_tokens,), device=generator_device)
    labels[::11] = -100
    grad = torch.empty_like(logits)
    grad_norm = torch.tensor(1.0 / num_tokens, device=device)
    expected_loss, expected_grad = reference_rows(logits, labels, grad_norm)
    floor_s = 2 * logits.numel() * logits.element_size() / copy_bytes_per_s
    rows = []
    for config in variants(vocab_size, logits.element_size(), smoke):
        if time.monotonic() > deadline:
            break

        def run(config=config):
            return smoothed_ga_triton.rows_forward(logits, labels, None, grad_norm, grad, SMOOTHING, SIGN, -100,
                                               config=config)

        begin = time.monotonic()
        loss = run()  # the first call compiles
        if device == "cuda":
            torch.cuda.synchronize()
        compile_s = time.monotonic() - begin
        correct, error = agrees(loss[:CHECK_ROWS], grad[:CHECK_ROWS], expected_loss, expected_grad)
        median_s, repeats = time_call(run, device, budget_s=0.05 if device == "cuda" else 0.0)
        rows.append({
            "op": "logits_sweep", "num_tokens": num_tokens, "vocab_size": vocab_size, "dtype": dtype_name,
            "variant": config.name(), "config": config.as_dict(), "correct": correct, "relative_error": error,
            "median_ms": median_s * 1e3, "repeats": repeats, "compile_s": compile_s, "floor_ms": floor_s * 1e3,
            "over_floor": median_s / floor_s, **env,
        })  # fmt: skip
        print(f"{dtype_name:9s} V={vocab_size:<7d} {config.name():28s} {median_s * 1e3:8.3f} ms "
              f"{median_s / floor_s:5.2f}x floor  compile {compile_s:5.1f} s  {'ok' if correct else 'WRONG'}",
              flush=True)  # fmt: skip
    return rows


def best_per_case(rows: list[dict]) -> dict:
    best = {}
    for row in rows:
        key = (row["dtype"], row["vocab_size"])
        if row["correct"] and (key not in best or row["median_ms"] < best[key]["median_ms"]):
            best[key] = row
    return best


def tuning_table_source(best: dict, architecture: str) -> str:
    """The TABLE entries for kernels/sga_kernels/tuning.py, one per case, each with its time as a comment."""
    lines = ["TABLE: dict[tuple[str, str, int], KernelConfig] = {"]
    for (dtype_name, vocab_size), row in sorted(best.items()):
        arguments = ", ".join(f"{name}={value!r}" for name, value in row["config"].items())
        lines.append(f"    ({architecture!r}, {dtype_name!r}, {vocab_size}): KernelConfig({arguments}),"
                     f"  # {row['median_ms']:.3f} ms, {row['over_floor']:.2f}x the copy floor, {row['device']}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def summary_table(rows: list[dict], best: dict) -> str:
    from sga.kernels import tuning

    lines = [f"{'dtype':9s} {'V':>7s} {'variants':>8s} {'best':28s} {'ms':>8s} {'x floor':>7s} {'default x':>9s}"]
    for (dtype_name, vocab_size), row in sorted(best.items()):
        case_rows = [r for r in rows if (r["dtype"], r["vocab_size"]) == (dtype_name, vocab_size)]
        default = tuning.default_config(vocab_size, getattr(torch, dtype_name).itemsize).name()
        default_row = next((r for r in case_rows if r["variant"] == default), None)
        default_ratio = f"{default_row['over_floor']:9.2f}" if default_row else f"{'-':>9s}"
        lines.append(f"{dtype_name:9s} {vocab_size:7d} {len(case_rows):8d} {row['variant']:28s} "
                     f"{row['median_ms']:8.3f} {row['over_floor']:7.2f} {default_ratio}")
    wrong = [r for r in rows if not r["correct"]]
    lines.append(f"variants that disagreed with the torch backend: {len(wrong)}"
                 + "".join(f"\n  WRONG {r['dtype']} V={r['vocab_size']} {r['variant']} error {r['relative_error']:.2e}"
                           for r in wrong))  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Time the logits kernel's variants; print the tuning table.")
    parser.add_argument("--out", type=Path, required=True, help="folder for sweep.jsonl, tables and tuning_table.py")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop starting variants after this (s)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the interpreter")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        parser.error("no CUDA device: the sweep times GPU kernels; use --smoke for the CPU dry run")
    from floors import copy_bandwidth
    from harness import environment
    from sga.kernels import triton_launch

    if device == "cpu" and not triton_launch.interpreter_enabled():
        parser.error("--smoke on the CPU needs TRITON_INTERPRET=1 set before the run")
    deadline = time.monotonic() + args.budget_s
    env = environment(device)
    copy_bytes_per_s = copy_bandwidth(device)
    print(f"{env['device']}: copy {copy_bytes_per_s / 1e9:.0f} GB/s (read + write), budget {args.budget_s:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    stopped = False
    for case in SMOKE_CASES if args.smoke else CASES:
        if time.monotonic() > deadline:
            stopped = True
            break
        rows += sweep_case(case, device, args.smoke, deadline, copy_bytes_per_s, env)
        with (args.out / "sweep.jsonl").open("w") as handle:  # rewritten after each case: a kill loses one case
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        if device == "cuda":
            torch.cuda.empty_cache()
    stopped = stopped or time.monotonic() > deadline
    best = best_per_case(rows)
    table = summary_table(rows, best)
    if stopped:
        table += f"budget of {args.budget_s:.0f} s spent: the sweep stopped early; cases above are all it measured\n"
    (args.out / "sweep_table.txt").write_text(table)
    architecture = triton_launch.architecture(torch.device(device))
    (args.out / "tuning_table.py").write_text(tuning_table_source(best, architecture))
    print(table + tuning_table_source(best, architecture))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
