"""What a run tells its user while it trains (main process only).

- On a terminal with ``train.progress`` on: a tqdm bar over the optimizer steps, with the step's NLLs. The time
  spent evaluating is taken out of the bar's clock, so its remaining-time estimate counts training only.
- Not on a terminal (a log file, a batch job) with ``train.progress`` on: a plain line about every
  :data:`LINE_EVERY_S` seconds and at the last step, instead of carriage-return bar updates.
- Always: one line per evaluation with its key metrics, and any other notice of the run (:meth:`RunLog.say`).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any, Iterator, Mapping, Optional

LINE_EVERY_S = 30.0
# the metrics an evaluation line shows first, when the evaluation has them
KEY_METRICS = ("forget_quality", "model_utility", "forget_prob", "forget_rouge", "verbmem_f", "knowmem_f", "knowmem_r", "privleak")
# the step metrics a progress line or the bar's postfix shows
STEP_METRICS = ("forget_nll", "normal_nll", "lr", "rate")


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def format_evaluation(step: int, total_steps: int, metrics: Mapping[str, Any], is_best: Optional[bool]) -> str:
    """``eval step 5/15: forget_quality 0.0335, model_utility 0.412, ... (best so far)``."""
    shown = [f"{name} {_number(metrics[name])}" for name in KEY_METRICS if metrics.get(name) is not None]
    mark = " (best so far)" if is_best else ""
    return f"eval step {step}/{total_steps}: {', '.join(shown) or 'no key metric'}{mark}"


class RunLog:
    """The progress display of one run: a bar, periodic lines, or only the notices (``mode``)."""

    def __init__(self, total_steps: int, initial_step: int, description: str, *, progress: bool, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.mode = "quiet"
        if enabled and progress:
            self.mode = "bar" if sys.stderr.isatty() else "lines"
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=description, dynamic_ncols=True)
        self.step = initial_step
        self.started = time.monotonic()
        self.paused_s = 0.0  # evaluation time, not training time
        self.last_line = -math.inf
        self.first_step = initial_step

    def say(self, message: str) -> None:
        """A line for the user (above the bar when there is one)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"[sga] {message}")
        else:
            print(f"[sga] {message}", flush=True)

    def update(self, step: int, record: Mapping[str, Any]) -> None:
        """After optimizer step ``step`` with its logged record."""
        self.step = step
        shown = {name: record[name] for name in STEP_METRICS if isinstance(record.get(name), float)}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({name: _number(value) for name, value in shown.items()})
        elif self.mode == "lines":
            now = time.monotonic()
            if now - self.last_line >= LINE_EVERY_S or step == self.total_steps:
                self.last_line = now
                training_s = now - self.started - self.paused_s
                done = step - self.first_step
                eta = training_s / done * (self.total_steps - step) if done else math.nan
                metrics = ", ".join(f"{name} {_number(value)}" for name, value in shown.items())
                remaining = _clock(eta) if math.isfinite(eta) else "?"
                self.say(f"step {step}/{self.total_steps} ({100 * step // self.total_steps}%): {metrics}; "
                         f"training {_clock(training_s)}, about {remaining} left")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside the block (an evaluation) does not count as training time in the bar's or the lines'
        remaining-time estimate."""
        began = time.monotonic()
        try:
            yield
        finally:
            elapsed = time.monotonic() - began
            self.paused_s += elapsed
            if self.bar is not None:
                # tqdm's rate comes from start_t (average) and last_print_t (its smoothed estimate)
                self.bar.start_t += elapsed
                self.bar.last_print_t += elapsed

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
