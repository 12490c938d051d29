"""Time every variant of the logits row kernel (kernels/sga_kernels/tuning.py) and print the winners as the tuning table.

    python bench/gpu_sweep.py --out DIR [--budget-s 240] [--smoke] [--plant-broken]

On a GPU: N = 16384, V in {128256, 32000, 151936, 262144}, bf16 and fp32 (the goal's case first), forward with
the gradient (the whole forward+backward: backward is a no-op scale for grad_output = 1), beside the copy floor
measured in the same process. Each variant's compile time is counted against the budget; when the budget runs
out the sweep stops cleanly after the variant in flight and writes what it has.

Each variant is checked before its time counts, and a wrong variant is never ranked: the gradient buffer is filled
with NaN before the variant runs (a variant that writes nothing, or skips rows, leaves NaN behind and fails), every
element must then be finite, and the loss and gradient of rows at the start, the middle and the end of the matrix
(with a persistent grid the first rows are every program's first row, the last ones its last) must agree with the
torch backend. A variant that raises is recorded as a wrong row with its error, and the sweep goes on (it stops only
when the CUDA context itself is lost). Times are per call, from many calls between one pair of CUDA events (the
host's launch overhead of 20-60 us a call hidden behind the queue), median of 3 batches.

--plant-broken adds two broken variants to the first case, after its first real variant (so the buffer holds a
correct gradient when they run): one that writes no gradient and one whose launch raises. Both must be reported as
wrong and never ranked; the CPU dry run (tests/bench/test_bench_suite.py) checks that.

Writes DIR/sweep.jsonl (one row per variant and case, appended as each variant finishes), DIR/sweep_table.txt (the
ratio table) and DIR/tuning_table.py (the TABLE entries to paste into kernels/sga_kernels/tuning.py). --smoke: tiny
shapes on the CPU under Triton's interpreter, small blocks, for the test suite.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# the goal's vocabulary first for both dtypes: a sweep stopped by its budget still has the cases that matter most
CASES = [(16384, v, dtype) for v in (128256, 32000, 151936, 262144) for dtype in ("bfloat16", "float32")]
SMOKE_CASES = [(3, 100, "bfloat16"), (3, 70, "float32")]
SMOOTHING, SIGN = 0.1, -1.0
CHECK_WINDOW = {"cuda": 32, "cpu": 1}  # rows checked at the start, the middle and the end of the matrix
TIMED_BATCHES, BATCH_SECONDS, MAX_CALLS_PER_BATCH = 3, 0.03, 50
PLANTED = ("planted-writes-nothing", "planted-raises")


@dataclass(frozen=True)
class Variant:
    """One entry of the sweep: a name, the config it records, and run() -> per-row losses (writing the gradient)."""

    name: str
    config: dict
    run: Callable[[], torch.Tensor]
    planted: bool = False


def kernel_configs(vocab_size: int, element_size: int, smoke: bool):
    from sga.kernels import tuning

    configs = tuning.sweep_variants(vocab_size, element_size)
    if not smoke:
        return list(configs)
    # the interpreter: the same switches over small blocks, so that V spans several blocks and a tail
    shrunk = [config if config.single_block else replace(config, block_v=max(16, config.block_v // 512))
              for config in configs]  # fmt: skip
    return list(dict.fromkeys(shrunk))


def variants(logits, labels, grad_norm, grad, smoke: bool, plant_broken: bool) -> list[Variant]:
    """The kernel configurations of this case as Variants, and with plant_broken the two broken ones after the
    first: one launch without a gradient buffer (it computes the loss and writes nothing) and one with a
    single-block config too small for the row (the launcher raises)."""
    from sga.kernels import smoothed_ga_triton, tuning

    def launch(config, grad_buffer=grad):
        return lambda: smoothed_ga_triton.rows_forward(logits, labels, None, grad_norm, grad_buffer, SMOOTHING, SIGN,
                                                       -100, config=config)  # fmt: skip

    configs = kernel_configs(logits.shape[1], logits.element_size(), smoke)
    entries = [Variant(config.name(), config.as_dict(), launch(config)) for config in configs]
    if plant_broken:
        too_small = tuning.KernelConfig(block_v=16, num_warps=1, single_block=True)
        entries[1:1] = [
            Variant(PLANTED[0], configs[0].as_dict(), launch(configs[0], grad_buffer=None), planted=True),
            Variant(PLANTED[1], too_small.as_dict(), launch(too_small), planted=True),
        ]
    return entries


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str) -> tuple[float, int]:
    """Seconds per call of fn() and the calls timed. On CUDA: after a warm-up call, TIMED_BATCHES batches of as many
    calls as fill BATCH_SECONDS (3 to MAX_CALLS_PER_BATCH), each batch between one pair of events with the GPU kept
    busy while the host queues it (so the launch overhead of each call hides behind the previous kernel); the
    median of the batches' per-call times. On the CPU (the interpreter's smoke run, where times mean nothing) one
    call."""
    if device != "cuda":
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin, 1
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    fn()
    stop.record()
    torch.cuda.synchronize()
    estimate_s = start.elapsed_time(stop) / 2e3
    calls = int(min(MAX_CALLS_PER_BATCH, max(3, BATCH_SECONDS / max(estimate_s, 1e-7))))
    per_call = []
    for _ in range(TIMED_BATCHES):
        torch.cuda._sleep(1_000_000)  # ~0.5 ms of GPU work: the start event fires after the host has queued ahead
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        torch.cuda.synchronize()
        per_call.append(start.elapsed_time(stop) / 1e3 / calls)
    return statistics.median(per_call), calls * TIMED_BATCHES


def check_rows(num_tokens: int, window: int) -> torch.Tensor:
    """Row indices of three windows: the first rows, the middle ones and the last ones."""
    starts = (0, num_tokens // 2 - window // 2, num_tokens - window)
    rows = sorted({row for s in starts for row in range(max(0, s), min(num_tokens, s + window))})
    return torch.tensor(rows, dtype=torch.long)


def reference_rows(logits, labels, grad_norm, rows):
    """Loss and gradient of the checked rows by the torch backend, the check each variant must pass."""
    from sga.kernels import smoothed_ga_torch

    index = rows.to(logits.device)
    selected = logits.index_select(0, index)
    grad = torch.empty_like(selected)
    loss = smoothed_ga_torch.rows_forward(selected, labels.index_select(0, index), None, grad_norm, grad, SMOOTHING,
                                          SIGN, -100)  # fmt: skip
    return loss, grad


def verdict(loss, grad, rows, expected_loss, expected_grad) -> tuple[bool, float, str]:
    """(correct, worst relative error, what is wrong). Every gradient element must have been written (no NaN of
    the poison left) and every loss finite; on the checked rows the loss within 1e-5 of its size and the gradient
    within 2% (two bf16 roundings) of the largest value of the torch backend's."""
    if not bool(torch.isfinite(loss).all()):
        return False, float("inf"), "a row loss is not finite"
    if bool(torch.isnan(grad).any()):
        return False, float("inf"), "gradient elements left unwritten (the NaN poison is still there)"
    index = rows.to(grad.device)
    loss_error = ((loss.index_select(0, index) - expected_loss).abs().max()
                  / expected_loss.abs().max().clamp_min(1e-30)).item()  # fmt: skip
    got = grad.index_select(0, index).float()
    grad_error = ((got - expected_grad.float()).abs().max() / expected_grad.float().abs().max().clamp_min(1e-30)).item()
    worst = max(loss_error, grad_error)
    if not (loss_error <= 1e-5 and grad_error <= 2e-2):
        return False, worst, f"disagrees with the torch backend (loss {loss_error:.1e}, gradient {grad_error:.1e})"
    return True, worst, ""


def cuda_context_alive() -> bool:
    try:
        torch.cuda.synchronize()
        return (torch.ones(1, device="cuda") + 1).item() == 2.0
    except Exception:  # noqa: BLE001 - any CUDA error here means the context is gone
        return False


def sweep_case(case, device: str, smoke: bool, deadline: float, copy_bytes_per_s: float, env: dict,
               plant_broken: bool, write_row: Callable[[dict], None]) -> tuple[list[dict], bool]:
    """Rows for every variant of one case, until the deadline; each row is written as soon as it is known.
    Returns (rows, whether the CUDA context was lost)."""
    num_tokens, vocab_size, dtype_name = case
    dtype = getattr(torch, dtype_name)
    logits = torch.randn(num_tokens, vocab_size, device=device, dtype=dtype)  # generated where they live
    labels = torch.randint(0, vocab_size, (num_tokens,), device=device)
    labels[::11] = -100
    grad = torch.empty_like(logits)
    grad_norm = torch.tensor(1.0 / num_tokens, device=device)
    rows_checked = check_rows(num_tokens, CHECK_WINDOW[device])
    expected_loss, expected_grad = reference_rows(logits, labels, grad_norm, rows_checked)
    floor_s = 2 * logits.numel() * logits.element_size() / copy_bytes_per_s
    rows = []
    for variant in variants(logits, labels, grad_norm, grad, smoke, plant_broken):
        if time.monotonic() > deadline:
            break
        row = {"op": "logits_sweep", "num_tokens": num_tokens, "vocab_size": vocab_size, "dtype": dtype_name,
               "variant": variant.name, "config": variant.config, "planted": variant.planted, "correct": False,
               "relative_error": None, "problem": "", "median_ms": None, "repeats": 0, "compile_s": None,
               "floor_ms": floor_s * 1e3, "over_floor": None, **env}  # fmt: skip
        lost = False
        try:
            grad.fill_(float("nan"))  # poison: whatever this variant does not write stays NaN
            begin = time.monotonic()
            loss = variant.run()  # the first call compiles
            synchronize(device)
            row["compile_s"] = time.monotonic() - begin
            correct, error, problem = verdict(loss, grad, rows_checked, expected_loss, expected_grad)
            row.update(correct=correct, relative_error=error, problem=problem)
            if correct:
                median_s, repeats = time_call(variant.run, device)
                row.update(median_ms=median_s * 1e3, repeats=repeats, over_floor=median_s / floor_s)
        except Exception as error:  # noqa: BLE001 - one variant's failure is a row, not the end of the sweep
            row.update(correct=False, problem=f"raised {type(error).__name__}: {str(error)[:300]}")
            lost = device == "cuda" and not cuda_context_alive()
            if lost:
                row["problem"] += " (the CUDA context is lost: the sweep stops here)"
        rows.append(row)
        write_row(row)
        timing = (f"{row['median_ms']:8.3f} ms {row['over_floor']:5.2f}x floor" if row["correct"]
                  else f"WRONG: {row['problem']}")  # fmt: skip
        compile_s = f"{row['compile_s']:5.1f} s" if row["compile_s"] is not None else "    - "
        print(f"{dtype_name:9s} V={vocab_size:<7d} {variant.name:28s} compile {compile_s}  {timing}", flush=True)
        if lost:
            return rows, True
    return rows, False


def best_per_case(rows: list[dict]) -> dict:
    """The fastest correct variant of each case (a wrong one is never ranked, whatever its time)."""
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
    """Per case: variants run, the best, its time and multiple of the copy floor, the default's multiple; then
    every wrong variant with what was wrong (planted ones marked)."""
    from sga.kernels import tuning

    lines = [f"{'dtype':9s} {'V':>7s} {'variants':>8s} {'best':28s} {'ms':>8s} {'x floor':>7s} {'default x':>9s}"]
    for (dtype_name, vocab_size), row in sorted(best.items()):
        case_rows = [r for r in rows if (r["dtype"], r["vocab_size"]) == (dtype_name, vocab_size)]
        default = tuning.default_config(vocab_size, getattr(torch, dtype_name).itemsize).name()
        default_row = next((r for r in case_rows if r["variant"] == default and r["correct"]), None)
        default_ratio = f"{default_row['over_floor']:9.2f}" if default_row else f"{'-':>9s}"
        lines.append(f"{dtype_name:9s} {vocab_size:7d} {len(case_rows):8d} {row['variant']:28s} "
                     f"{row['median_ms']:8.3f} {row['over_floor']:7.2f} {default_ratio}")
    wrong = [r for r in rows if not r["correct"]]
    real_wrong = [r for r in wrong if not r["planted"]]
    lines.append(f"variants that disagreed with the torch backend: {len(real_wrong)}"
                 + "".join(f"\n  WRONG {r['dtype']} V={r['vocab_size']} {r['variant']}: {r['problem']}"
                           for r in real_wrong))  # fmt: skip
    planted = [r for r in rows if r["planted"]]
    if planted:
        caught = [r for r in planted if not r["correct"]]
        lines.append(f"planted broken variants reported wrong: {len(caught)} of {len(planted)}"
                     + "".join(f"\n  {'caught' if not r['correct'] else 'NOT CAUGHT'} {r['variant']}: {r['problem']}"
                               for r in planted))  # fmt: skip
    return "\n".join(lines) + "\n"


def write_tables(out: Path, rows: list[dict], architecture: str, note: str = "") -> str:
    best = best_per_case(rows)
    table = summary_table(rows, best) + note
    (out / "sweep_table.txt").write_text(table)
    (out / "tuning_table.py").write_text(tuning_table_source(best, architecture))
    return table + tuning_table_source(best, architecture)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Time the logits kernel's variants; print the tuning table.")
    parser.add_argument("--out", type=Path, required=True, help="folder for sweep.jsonl, tables and tuning_table.py")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop starting variants after this (s)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the interpreter")
    parser.add_argument("--plant-broken", action="store_true",
                        help="add a variant that writes nothing and one that raises to the first case")
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
    architecture = triton_launch.architecture(torch.device(device))
    results = args.out / "sweep.jsonl"
    results.write_text("")
    rows: list[dict] = []

    def write_row(row: dict) -> None:  # appended as each variant finishes, the tables rewritten: a kill loses one
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        rows.append(row)
        write_tables(args.out, rows, architecture)

    note, lost = "", False
    for index, case in enumerate(SMOKE_CASES if args.smoke else CASES):
        if time.monotonic() > deadline:
            note = f"budget of {args.budget_s:.0f} s spent: the sweep stopped early; cases above are all it measured\n"
            break
        try:
            _, lost = sweep_case(case, device, args.smoke, deadline, copy_bytes_per_s, env,
                                 args.plant_broken and index == 0, write_row)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - a case that cannot even be set up (memory) is a note
            note += f"case {case} not run: {type(error).__name__}: {str(error)[:300]}\n"
            lost = device == "cuda" and not cuda_context_alive()
        if lost:
            note += "the CUDA context was lost: the sweep stopped\n"
            break
        if device == "cuda":
            torch.cuda.empty_cache()
    if not note and time.monotonic() > deadline:
        note = f"budget of {args.budget_s:.0f} s spent: the sweep stopped early; cases above are all it measured\n"
    print(write_tables(args.out, rows, architecture, note))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
