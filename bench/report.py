"""Summaries of benchmark rows: a ratio table (alternatives against ours, ours against the floor) and a
plot of time and memory against vocabulary size.

    python bench/report.py bench/results/logits.jsonl --plot bench/logits_vs_vocab.png
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def _shape_key(row: dict) -> tuple:
    size = row.get("hidden_size")
    shape = f"N={row['num_tokens']} V={row['vocab_size']}" + (f" D={size}" if size else "")
    if row.get("ignored_fraction"):
        shape += f" ign={row['ignored_fraction']:g}"
    return row["op"], shape, row["dtype"], row["phase"]


def format_table(rows: list[dict]) -> str:
    """One line per (op, shape, dtype, phase): ours in ms and as a multiple of the floor, then each
    alternative's time (and, for forward+backward, peak extra memory) as a multiple of ours."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        groups[_shape_key(row)][row["implementation"]] = row
    lines = [
        f"device: {rows[0]['device']}  (time x = alternative / ours; mem x = alternative's peak extra / ours)",
        f"{'op':7} {'shape':26} {'dtype':9} {'phase':17} {'ours ms':>9} {'x floor':>8}  alternatives",
    ]
    for (op, shape, dtype, phase), by_impl in sorted(groups.items()):
        mine = by_impl.get("ours")
        if mine is None:
            continue
        floor = mine["median_ms"] / mine["floor_ms"] if mine.get("floor_ms") else float("nan")
        parts = []
        for name, other in sorted(by_impl.items()):
            if name == "ours":
                continue
            part = f"{name} {other['median_ms'] / mine['median_ms']:.2f}x"
            if mine.get("peak_extra_bytes") and other.get("peak_extra_bytes") is not None:
                part += f" mem {other['peak_extra_bytes'] / mine['peak_extra_bytes']:.2f}x"
                if "peak_extra_over_logits" in other:
                    part += f" ({100 * other['peak_extra_over_logits']:.1f}% of logits)"
            parts.append(part)
        memory = ""
        if mine.get("peak_extra_bytes") is not None:
            memory = f" [ours extra {mine['peak_extra_bytes'] / 2**20:.0f} MiB"
            if "peak_extra_over_logits" in mine:
                memory += f" = {100 * mine['peak_extra_over_logits']:.1f}% of logits"
            memory += "]"
        lines.append(
            f"{op:7} {shape:26} {dtype:9} {phase:17} {mine['median_ms']:9.2f} {floor:8.2f}  "
            + ", ".join(parts)
            + memory
        )
    return "\n".join(lines)


def plot_against_vocabulary(rows: list[dict], path: Path) -> None:
    """Forward+backward time and peak extra memory against V, one line per implementation and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    selected = [r for r in rows if r["op"] == "logits" and r["phase"] == "forward+backward"]
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple, list[dict]] = defaultdict(list)
    for row in selected:
        series[(row["implementation"], row["dtype"])].append(row)
    for (implementation, dtype), points in sorted(series.items()):
        points.sort(key=lambda r: r["vocab_size"])
        vocab = [p["vocab_size"] for p in points]
        label = f"{implementation} ({dtype})"
        time_axis.plot(vocab, [p["median_ms"] for p in points], marker="o", label=label)
        memory_axis.plot(vocab, [p.get("peak_extra_bytes", 0) / 2**30 for p in points], marker="o", label=label)
    time_axis.set(xlabel="vocabulary size V", ylabel="forward+backward ms", title="time")
    memory_axis.set(xlabel="vocabulary size V", ylabel="peak extra GiB", title="memory beyond the inputs")
    time_axis.legend(fontsize=7)
    token_counts = "/".join(str(n) for n in sorted({r["num_tokens"] for r in selected}))
    figure.suptitle(f"smoothed_ga_loss, N={token_counts} (see the table), {selected[0]['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def read_rows(path: Path) -> list[dict]:
    """Rows of a results file; a later row for the same case replaces an earlier one."""
    latest = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        latest[(_shape_key(row), row["implementation"], row["device"])] = row
    return list(latest.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a .jsonl file written by the benchmarks")
    parser.add_argument("--plot", type=Path, help="write a PNG of time and memory against V here")
    args = parser.parse_args()
    rows = read_rows(args.results)
    print(format_table(rows))
    if args.plot:
        plot_against_vocabulary(rows, args.plot)


if __name__ == "__main__":
    main()
