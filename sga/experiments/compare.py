"""``sga compare``: one table and one trajectory plot for any set of runs, read from their run folders.

Each run folder is what ``sga unlearn`` writes (``sga.engine.run_folder``): ``metrics.jsonl`` (a record per
optimizer step, rate estimate and evaluation) and ``config.yaml``. The table has a row per run: its method and
parameters, the steps it ran, its last forget / normal NLL and the metrics of its last evaluation. The plot
has two panels: model utility against forgetting over the evaluations (a trajectory per run, step 0 first),
and the forget NLL against the step.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from sga.config import ConfigError
from sga.engine.run_folder import CONFIG_FILE, METRICS_FILE

# (x, y) of the trajectory panel, the first pair a run's evaluations all have: forgetting, then utility
TRAJECTORY_AXES = (
    ("forget_quality", "model_utility"), ("forget_rouge", "model_utility"), ("forget_prob", "model_utility"),
    ("verbmem_f", "knowmem_r"), ("knowmem_f", "knowmem_r"),
)
# the evaluation metrics a table row shows, when the runs have them
TABLE_METRICS = ("forget_quality", "model_utility", "forget_prob", "forget_rouge", "privleak", "verbmem_f", "knowmem_f", "knowmem_r")
TABLE_FILE, SUMMARY_FILE, PLOT_FILE = "compare.md", "compare.json", "compare.png"


@dataclass
class RunHistory:
    """One run's records, split by kind."""

    folder: Path
    label: str
    method: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


def read_run(folder: str | Path) -> RunHistory:
    """The history of the run in ``folder``; a one-line ConfigError when it holds no run."""
    import yaml

    folder = Path(folder)
    metrics = folder / METRICS_FILE
    if not metrics.is_file():
        raise ConfigError(f"{folder} holds no run: no {METRICS_FILE} (give folders that sga unlearn wrote)")
    config = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8")) if (folder / CONFIG_FILE).is_file() else {}
    run = RunHistory(folder, folder.name, (config or {}).get("method", {}), finished=(folder / "final").is_dir())
    for number, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{metrics}, line {number}: not valid JSON ({err.msg})") from None
        if record.get("event") == "eval":
            run.evaluations.append(record)
        elif "event" not in record:
            run.steps.append(record)
    return run


def describe_method(method: dict[str, Any]) -> str:
    """``sga (rate 0.5, K 2)`` from a config's method section."""
    name = method.get("name", "?")
    parts = []
    if name in ("sga", "sga_gls", "sga_token"):
        parts.append(f"rate {method.get('rate')}")
    if name in ("sga", "sga_gls") or method.get("num_classes", 2) != 2:
        parts.append(f"K {method.get('num_classes')}")
    if method.get("adaptive_rate_every"):
        parts.append(f"adaptive every {method['adaptive_rate_every']}")
    return f"{name} ({', '.join(parts)})" if parts else name


def summarize(runs: Sequence[RunHistory]) -> list[dict[str, Any]]:
    """One row per run: label, method, steps, last NLLs, the last evaluation's metrics."""
    rows = []
    for run in runs:
        last = run.steps[-1] if run.steps else {}
        evaluation = run.evaluations[-1] if run.evaluations else {}
        rows.append({
            "run": run.label, "method": describe_method(run.method), "steps": last.get("step", 0),
            "finished": run.finished, "forget_nll": last.get("forget_nll"), "normal_nll": last.get("normal_nll"),
            "eval_step": evaluation.get("step"),
            **{name: evaluation.get(name) for name in TABLE_METRICS if any(name in e for r in runs for e in r.evaluations)},
        })
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`summarize`'s rows."""
    if not rows:
        return ""
    columns = list(rows[0])

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def trajectory_axes(runs: Sequence[RunHistory]) -> Optional[tuple[str, str]]:
    """The first (forgetting, utility) pair of :data:`TRAJECTORY_AXES` that every evaluated run has."""
    evaluated = [run for run in runs if run.evaluations]
    for x, y in TRAJECTORY_AXES:
        if evaluated and all(x in run.evaluations[-1] and y in run.evaluations[-1] for run in evaluated):
            return x, y
    return None


def plot_runs(runs: Sequence[RunHistory], path: Path, title: str = "sga compare") -> Path:
    """The two panels (module docstring), written to ``path`` (matplotlib's Agg canvas: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    axes = trajectory_axes(runs)
    for run in runs:
        if axes and run.evaluations:
            x, y = axes
            points = [(e[x], e[y]) for e in run.evaluations if e.get(x) is not None and e.get(y) is not None]
            if points:
                left.plot(*zip(*points), marker="o", label=run.label)
                left.annotate("start", points[0], fontsize=7, alpha=0.6)
        if run.steps:
            nll_by_step = [(r["step"], r["forget_nll"]) for r in run.steps if "forget_nll" in r]
            right.plot(*zip(*nll_by_step), label=run.label)
    if axes:
        left.set_xlabel(axes[0])
        left.set_ylabel(axes[1])
        left.set_title("utility against forgetting, at each evaluation")
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no evaluations to compare (sga unlearn --eval-every N)", ha="center", va="center")
        left.set_axis_off()
    right.set_xlabel("step")
    right.set_ylabel("forget NLL")
    right.set_title("forget NLL against the step")
    right.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def compare_runs(folders: Sequence[str | Path], out: str | Path) -> tuple[str, Path]:
    """Read every run (all checked before anything is written), write ``compare.md``, ``compare.json`` and
    ``compare.png`` into ``out``; returns the table and the plot's path."""
    if not folders:
        raise ConfigError("give at least one run folder")
    runs = [read_run(folder) for folder in folders]
    labels = [run.label for run in runs]
    if len(set(labels)) < len(labels):  # same folder names under different parents: use the paths
        for run in runs:
            run.label = str(run.folder)
    rows = summarize(runs)
    table = format_table(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / TABLE_FILE).write_text(table + "\n", encoding="utf-8")
    (out / SUMMARY_FILE).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return table, plot_runs(runs, out / PLOT_FILE)
