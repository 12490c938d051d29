"""The CPU goals of the kernels in one process: each case's implementations interleaved (the order rotated every
round), best of the rounds, after a warm-up call of each (torch.compile, the CPU route probe of
``sga.kernels.cpu_routes`` and first-touch allocations happen there, never in a timed call).

    python bench/cpu_check.py                          # every case, 1 thread, 3 rounds, wall clock
    python bench/cpu_check.py --cases linear_none,logits --clock cpu    # thread CPU time (a loaded machine)

Cases (ratio = the alternative's time / ours; > 1: ours faster):
- linear_none / linear_half: ``linear_smoothed_ga_loss`` forward+backward, fp32 N=1024 D=512 V=65536, no token /
  half of the tokens ignored (a prompt prefix of every 128-token block), against materialized logits + the
  logits kernel with ``inplace_backward=True`` (bench/test_bench_linear.py's ``materialized_kernel``);
- linear_bench_none / linear_bench_half: the same at bench/test_bench_linear.py's fp32 shape N=2048 D=512
  V=128256;
- logits: ``smoothed_ga_loss`` (the CPU torch backend) forward+backward, fp32 N=2048 V=32000, against
  torch.compile of the eager loss and the eager loss itself (bench/alternatives.py);
- hf: ``sga.hf.causal_lm_loss`` forward+backward on a tiny 2-layer Llama (D=256, V=128256), 12 sequences of 128
  tokens with the first half of each a prompt, against the model's own loss (``model(...).loss``).
With --routes, the fused linear cases also time ours on each fixed GEMM route (``ours_route_mm``: torch.mm for every
chunk GEMM; ``ours_route_onednn``: oneDNN for every one, the route before the probe existed), and linear_none ours
within a budget of exactly 1/16 of the logits (``ours_sixteenth``: 64-row chunks instead of the 128-row floor). With --memory, the
fused linear cases also report ours' peak extra memory in a fresh process after a first call
(RSS high-water mark beyond the inputs and the returned dH and dW; bench/harness.py), as a share of the fp32
logits.

The header names the CPU as /proc/cpuinfo gives it (model name, family, model, the SIMD flags), the torch version,
the thread count and the load average before and after: numbers from different CPUs do not carry over.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cpu_description() -> str:
    try:
        from harness import cpu_name
    except ImportError:  # an older tree's harness: the model name alone
        import platform

        return platform.processor() or platform.machine()
    return cpu_name()


def cached_routes() -> dict:
    """This CPU's cached GEMM routes (None where this tree has no sga.kernels.cpu_routes, e.g. an older one)."""
    try:
        from sga.kernels import cpu_routes
    except ImportError:
        return None
    return cpu_routes.describe_cache()


def _clock(kind: str):
    return time.perf_counter if kind == "wall" else time.thread_time


def with_route(run, value: str):
    """run() with SGA_CPU_ROUTE=value (the route is read at each call)."""

    def routed():
        previous = os.environ.get("SGA_CPU_ROUTE")
        os.environ["SGA_CPU_ROUTE"] = value
        try:
            run()
        finally:
            if previous is None:
                del os.environ["SGA_CPU_ROUTE"]
            else:
                os.environ["SGA_CPU_ROUTE"] = previous

    return routed


def linear_case(num_tokens, hidden_size, vocab_size, ignored, routes=False, sixteenth=False):
    from test_bench_linear import make_phases

    def build(implementation):
        forward, backward, _ = make_phases(
            implementation, num_tokens, hidden_size, vocab_size, "float32", None, ignored, "cpu"
        )
        return lambda: backward(forward())

    runs = {"ours": build("ours"), "materialized_kernel": build("materialized_kernel")}
    if routes:  # ours on each fixed route too: what the measured choice buys over either
        runs["ours_route_mm"] = with_route(runs["ours"], "mm")
        runs["ours_route_onednn"] = with_route(runs["ours"], "onednn")
    if sixteenth:  # ours within a budget of exactly 1/16 of the full fp32 logits (no 128-row floor)
        runs["ours_sixteenth"] = sixteenth_budget(num_tokens, hidden_size, vocab_size, ignored)
    return runs


def sixteenth_budget(num_tokens, hidden_size, vocab_size, ignored):
    """ours with chunk_budget_bytes = 1/16 of the full fp32 logits: below 128 rows the budget's rows are used as they
    are, so at N = 1024 that is 64-row chunks (6.25% of the logits) instead of the default's 128-row floor (12.5%)."""
    import torch

    from sga.kernels import linear_smoothed_ga_loss
    from test_bench_linear import SMOOTHING, make_labels

    torch.manual_seed(0)
    hidden = torch.randn(num_tokens, hidden_size).requires_grad_(True)
    weight = (torch.randn(vocab_size, hidden_size) / hidden_size**0.5).requires_grad_(True)
    labels = make_labels(num_tokens, vocab_size, ignored, "cpu")
    budget = num_tokens * vocab_size * 4 // 16
    try:
        from sga.kernels.linear import warm_up_cpu_route

        warm_up_cpu_route(hidden, weight, labels, chunk_budget_bytes=budget)
    except ImportError:
        pass

    def run():
        hidden.grad = weight.grad = None
        linear_smoothed_ga_loss(hidden, weight, labels, smoothing=SMOOTHING, validate=False,
                                chunk_budget_bytes=budget).backward()  # fmt: skip

    return run


def logits_case(num_tokens=2048, vocab_size=32000):
    import torch

    from alternatives import LOGITS_IMPLEMENTATIONS

    torch.manual_seed(0)
    logits = torch.randn(num_tokens, vocab_size).requires_grad_(True)
    labels = torch.randint(0, vocab_size, (num_tokens,))

    def build(name):
        loss_fn = LOGITS_IMPLEMENTATIONS[name]("cpu")

        def run():
            logits.grad = None
            loss_fn(logits, labels).backward()

        return run

    return {"ours": build("ours"), "torch_compile": build("torch_compile"), "torch_eager": build("torch_eager")}


def hf_case(layers=2, hidden_size=256, vocab_size=128256, sequences=12, length=128):
    import torch
    import transformers

    from sga.hf import causal_lm_loss

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(1, vocab_size, (sequences, length))
    labels = ids.clone()
    labels[:, : length // 2] = -100  # the prompt half is not scored

    def ours():
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model, ids, labels, smoothing=0.0, ascent=False, validate=False).backward()

    def model_loss():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()

    return {"ours": ours, "model_loss": model_loss}


CASES = {
    "linear_none": lambda routes: linear_case(1024, 512, 65536, 0.0, routes, sixteenth=routes),
    "linear_half": lambda routes: linear_case(1024, 512, 65536, 0.5, routes),
    "linear_bench_none": lambda routes: linear_case(2048, 512, 128256, 0.0, routes),
    "linear_bench_half": lambda routes: linear_case(2048, 512, 128256, 0.5, routes),
    "logits": lambda routes: logits_case(),
    "hf": lambda routes: hf_case(),
}
LINEAR_SHAPES = {
    "linear_none": (1024, 512, 65536, 0.0),
    "linear_half": (1024, 512, 65536, 0.5),
    "linear_bench_none": (2048, 512, 128256, 0.0),
    "linear_bench_half": (2048, 512, 128256, 0.5),
}


def probes_run() -> int:
    """CPU route probes run so far in this process (0 where this tree has none)."""
    try:
        from sga.kernels import cpu_routes
    except ImportError:
        return 0
    return cpu_routes.probe_count


def time_case(runs: dict, rounds: int, clock) -> dict[str, list[float]]:
    """Each implementation once untimed, then `rounds` rounds of each, the order rotated every round. Fails if a
    CPU route probe runs during the timed rounds."""
    names = list(runs)
    for name in names:
        runs[name]()
    probes = probes_run()
    times = {name: [] for name in names}
    for round_index in range(rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            begin = clock()
            runs[name]()
            times[name].append(clock() - begin)
    assert probes_run() == probes, "a CPU route probe ran while timing"
    return times


def peak_memory_share(case: str) -> float:
    """Ours' peak extra memory (fresh process, after a first call) over the fp32 logits of the case."""
    from harness import peak_extra_bytes
    from test_bench_linear import WARMUP_SHAPE, make_case

    num_tokens, hidden_size, vocab_size, ignored = LINEAR_SHAPES[case]
    args = ("ours", num_tokens, hidden_size, vocab_size, "float32", None, ignored, "cpu")
    warmup = ("ours", *WARMUP_SHAPE, "float32", None, ignored, "cpu")
    grad_bytes = (num_tokens + vocab_size) * hidden_size * 4
    extra = peak_extra_bytes(make_case, args, warmup, "cpu") - grad_bytes
    return extra / (num_tokens * vocab_size * 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock (idle cores) or the thread's CPU time (a loaded machine, 1 thread)")
    parser.add_argument("--memory", action="store_true", help="also the fused linear cases' peak extra memory")
    parser.add_argument("--routes", default="", help="comma-separated fused linear cases that also time ours on "
                        "each forced GEMM route (SGA_CPU_ROUTE=mm, onednn)")
    parser.add_argument("--json", type=Path, help="append the results as one JSON line here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    header = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "rounds": args.rounds,
        "load_before": os.getloadavg(),
    }
    print(json.dumps(header))
    clock = _clock(args.clock)
    results = {}
    for case in args.cases.split(","):
        runs = CASES[case](case in args.routes.split(","))
        times = time_case(runs, args.rounds, clock)
        best = {name: min(values) for name, values in times.items()}
        ratios = {name: best[name] / best["ours"] for name in best if name != "ours"}
        results[case] = {"best_s": best, "all_s": times, "ratio": ratios}
        if args.memory and case in LINEAR_SHAPES:
            results[case]["ours_peak_extra_over_fp32_logits"] = peak_memory_share(case)
        line = "  ".join(f"{name} {seconds:.3f}s" for name, seconds in best.items())
        ratio_text = "  ".join(f"{name}/ours {value:.2f}x" for name, value in ratios.items())
        memory = results[case].get("ours_peak_extra_over_fp32_logits")
        memory_text = "" if memory is None else f"  ours peak extra {100 * memory:.1f}% of fp32 logits"
        print(f"{case:18} {line}  {ratio_text}{memory_text}", flush=True)
        del runs
    header["load_after"] = os.getloadavg()
    header["routes"] = cached_routes()
    print(json.dumps({"load_after": header["load_after"], "routes": header["routes"]}))
    if args.json:
        with args.json.open("a") as handle:
            handle.write(json.dumps({**header, "results": results}) + "\n")


if __name__ == "__main__":
    main()
