"""What a run folder holds, and the guard that keeps a run from overwriting another one.

A run writes, under ``train.output_dir``::

    config.yaml      the run's settings (``sga unlearn --config`` reads it back)
    run.json         the batch layout, the distributed setup and the data pairing
    metrics.jsonl    one record per optimizer step, rate estimate and evaluation
    checkpoints/     resumable states (``sga.engine.checkpoint``)
    best/            the best model under the declared criterion (``sga.engine.evaluation``)
    logs/            the experiment trackers' files (``train.report_to``: TensorBoard event files, ...)
    final/           the trained model: the run is finished

:func:`check_output_dir` runs before any model or data is loaded. It refuses, with the fix in one line, a
fresh run into a folder that holds a started or finished run (unless ``--overwrite``), a resume of a finished
run, and always an output folder that contains the model the run loads.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional

from sga.config import UnlearnConfig
from sga.engine.checkpoint import CheckpointError, checkpoint_root, list_checkpoints

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
BEST_DIR = "best"
FINAL_MODEL_DIR = "final"
LOGS_DIR = "logs"
# everything a run writes: what --overwrite deletes (the checkpoints folder too)
RUN_ENTRIES = (CONFIG_FILE, RUN_FILE, METRICS_FILE, BEST_DIR, f".tmp-{BEST_DIR}", FINAL_MODEL_DIR, LOGS_DIR)
# the parent folder of the default output folders, one per run
DEFAULT_RUNS_DIR = "sga-runs"


def default_output_dir(method: str, *, now: Optional[float] = None) -> Path:
    """A fresh output folder for one run: ``sga-runs/<method>-<YYYYmmdd-HHMMSS>`` (a suffix -2, -3, ... when a
    run of the same method started within the same second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    candidate = Path(DEFAULT_RUNS_DIR) / f"{method}-{stamp}"
    suffix = 2
    while candidate.exists():
        candidate = Path(DEFAULT_RUNS_DIR) / f"{method}-{stamp}-{suffix}"
        suffix += 1
    return candidate


def resolve_output_dir(config: UnlearnConfig) -> Path:
    """``train.output_dir``, set to :func:`default_output_dir` of the method when the config leaves it unset."""
    if config.train.output_dir is None:
        config.train.output_dir = str(default_output_dir(config.method.name))
    return Path(config.train.output_dir)


def run_contents(output_dir: Path) -> list[str]:
    """The entries of a run that ``output_dir`` holds (empty for a folder without a run)."""
    found = [name for name in RUN_ENTRIES if (output_dir / name).exists()]
    checkpoints = list_checkpoints(output_dir)
    if checkpoints:
        found.append(f"checkpoints/{checkpoints[-1].name}")
    return found


def _contains(folder: Path, path: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (symlinks resolved)."""
    folder, path = folder.resolve(), path.resolve()
    return path == folder or folder in path.parents


def check_output_dir(
    output_dir: str | os.PathLike, *, resume: Optional[str], overwrite: bool, model_path: Optional[str] = None
) -> Path:
    """Make sure ``output_dir`` is a folder this run may write (created if missing); raises
    :class:`sga.engine.checkpoint.CheckpointError` with the fix otherwise:

    - it contains ``model_path`` (a local model folder the run loads): always refused, --overwrite included;
    - a fresh run (``resume`` None) into a folder that holds a run (any entry of :data:`RUN_ENTRIES` or a
      checkpoint): refused unless ``overwrite``;
    - ``--resume auto`` of a finished run (``final/`` written): refused, nothing is left to train.
    """
    output_dir = Path(output_dir)
    if model_path and Path(model_path).exists() and _contains(output_dir, Path(model_path)):
        raise CheckpointError(
            f"--model {model_path} lies inside --output-dir {output_dir}: the run would overwrite the model it loads; "
            "choose another --output-dir"
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise CheckpointError(f"--output-dir {output_dir} is a file, not a folder: choose another --output-dir")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".sga-write-test-{os.getpid()}"  # one per process: every process checks
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"--output-dir {output_dir} is not writable ({err.strerror or err}): choose another --output-dir") from None
    contents = run_contents(output_dir)
    finished = (output_dir / FINAL_MODEL_DIR).exists()
    if resume is None and contents and not overwrite:
        if finished:
            raise CheckpointError(
                f"{output_dir} holds a finished run ({', '.join(contents)}): delete it with --overwrite, or choose "
                "another --output-dir"
            )
        raise CheckpointError(
            f"{output_dir} holds a started run ({', '.join(contents)}): continue it with --resume auto, delete it "
            "with --overwrite, or choose another --output-dir"
        )
    if resume == "auto" and finished:
        raise CheckpointError(
            f"{output_dir} holds a finished run (its model is in {output_dir / FINAL_MODEL_DIR}): nothing to resume; "
            "run again with --overwrite, or choose another --output-dir"
        )
    return output_dir


def clear_run(output_dir: str | os.PathLike) -> None:
    """Delete everything a previous run wrote in ``output_dir`` (``--overwrite``)."""
    output_dir = Path(output_dir)
    shutil.rmtree(checkpoint_root(output_dir), ignore_errors=True)
    for name in RUN_ENTRIES:
        target = output_dir / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
