"""Plots of a study (matplotlib's Agg canvas, no display needed): forget quality against model utility as
trajectories per grid point, and model utility and forget ROUGE-L against epochs. Each line is the mean
over seeds at each evaluation (the target, epoch 0, first); the shaded band is +- one std."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sga.experiments.study_summary import trajectories

TRAJECTORY_PLOT = "forget_quality_vs_utility.png"
EPOCH_PLOT = "utility_and_rouge_vs_epoch.png"
FQ_FLOOR = 1e-12  # forget quality is a p-value: shown on a log axis, floored so 0 stays visible


def _mean_curves(seeds: dict[int, list[dict]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean and std over the seeds of ``key`` at the evaluations every seed has."""
    length = min(len(t) for t in seeds.values())
    values = np.array([[row.get(key) if row.get(key) is not None else np.nan for row in t[:length]] for t in seeds.values()], dtype=float)
    epochs = np.array([row["epoch"] if row["run"] != "target" else 0.0 for row in next(iter(seeds.values()))[:length]])
    return epochs, np.nanmean(values, axis=0), np.nanstd(values, axis=0)


def _style(index: int, label: str) -> dict[str, Any]:
    marker = "o" if label.startswith("sga") else "s"
    return {"color": f"C{index % 10}", "marker": marker, "linestyle": "-" if index < 10 else "--", "markersize": 4, "linewidth": 1.4}


def plot_study(rows: list[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """Write the two figures to ``out``; returns their paths (none when there are no run rows yet)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    target, runs = trajectories(rows)
    if target is None or not runs:
        return []
    figure = Figure(figsize=(9, 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    for i, (label, seeds) in enumerate(runs.items()):
        _, utility, _ = _mean_curves(seeds, "model_utility")
        _, quality, _ = _mean_curves(seeds, "forget_quality")
        axis.plot(utility, np.maximum(quality, FQ_FLOOR), label=label, **_style(i, label))
        if len(utility) > 1:
            axis.annotate("", xy=(utility[-1], max(quality[-1], FQ_FLOOR)), xytext=(utility[-2], max(quality[-2], FQ_FLOOR)),
                          arrowprops={"arrowstyle": "->", "color": f"C{i % 10}"})
    axis.scatter([target["model_utility"]], [max(target["forget_quality"] or FQ_FLOOR, FQ_FLOOR)], s=90, marker="*", color="k", zorder=5, label="target (start)")
    axis.set_yscale("log")
    axis.set_xlabel("model utility (higher: keeps more)")
    axis.set_ylabel("forget quality (KS p-value vs the retain model; higher: forgets like it)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.suptitle(f"{title}\ntrajectories: mean over seeds at each evaluation, arrow at the last", fontsize=9)
    paths = [out / TRAJECTORY_PLOT]
    figure.savefig(paths[0], dpi=110)

    figure = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(figure)
    for axis, (key, ylabel) in zip(figure.subplots(1, 2), (("model_utility", "model utility"), ("forget_rouge", "forget ROUGE-L recall"))):
        for i, (label, seeds) in enumerate(runs.items()):
            epochs, mean, std = _mean_curves(seeds, key)
            axis.plot(epochs, mean, label=label, **_style(i, label))
            axis.fill_between(epochs, mean - std, mean + std, color=f"C{i % 10}", alpha=0.12)
        axis.set_xlabel("epoch (0: the target model)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=7, ncol=2)
    figure.suptitle(f"{title}\nmean over seeds, band: +- one std", fontsize=9)
    paths.append(out / EPOCH_PLOT)
    figure.savefig(paths[1], dpi=110)
    return paths
