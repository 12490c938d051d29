"""Results of a benchmark run: a readable text table and JSON files."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def _plain(value: Any) -> Any:
    """numpy scalars / arrays and paths -> JSON-ready Python values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def save_results(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a results dict as indented JSON (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(results), indent=2) + "\n", encoding="utf-8")
    return path


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results dict written by ``save_results``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"results file not found: {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def _format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if value != 0.0 and math.isfinite(value) and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return f"[{len(value)} values]"
    return str(value)


def _rows(results: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _rows(value, prefix=f"{name}.")
        else:
            rows.append((name, _format_value(value)))
    return rows


def format_results(results: Mapping[str, Any], *, title: str | None = None) -> str:
    """Render a (possibly nested) results dict as a two-column text table. Nested dicts become dotted
    names, per-sample lists are summarized by their length, missing values (None) show as n/a."""
    rows = _rows(results)
    if not rows:
        raise ValueError("results is empty")
    width = max(len(name) for name, _ in rows)
    lines = [title, "=" * max(len(title), width + 12)] if title else []
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
