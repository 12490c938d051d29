"""The durability scores of an attack: how far a metric moved, relative to its size.

Both are symmetric relative differences in [0, 1], 1 meaning "unchanged" (or "changed like the reference"):

- relearning (open-unlearning's meta-evaluation as the UDS paper reimplements it): with d = after - before the
  change of a metric under the same relearning, for the unlearned model (d_unl) and for the retain model, which
  never saw the forget set (d_ret),

      R = 1 - clip(|d_unl - d_ret| / (|d_unl| + |d_ret| + eps), 0, 1)

  R = 1: the forgotten knowledge comes back exactly as fast as a model that never learned it learns it; R -> 0:
  it comes back much faster (or the two move in opposite directions).
- quantization (Zhang et al., arXiv 2410.16454) and prompt probes: the metric before and after the attack,

      Q = 1 - clip(|after - before| / (|before| + |after| + eps), 0, 1)

eps keeps 0 / 0 at 0 (both scores are 1 when nothing moved). None in, None out: a metric the measurement lacks
(e.g. forget quality without a retain reference) has no score.
"""
from __future__ import annotations

import math
from typing import Optional

# the guard against 0 / 0 (open-unlearning's eps for its ratios)
SCORE_EPS = 1e-10


def _clip01(value: float) -> float:
    return min(1.0, max(0.0, value))


def _check(*values: float) -> None:
    for value in values:
        if not math.isfinite(value):
            raise ValueError(f"durability scores need finite metric values, got {value}")


def relearn_score(d_unlearned: Optional[float], d_retain: Optional[float], eps: float = SCORE_EPS) -> Optional[float]:
    """R = 1 - clip(|d_unl - d_ret| / (|d_unl| + |d_ret| + eps), 0, 1), d = after - before of one metric under
    relearning, for the unlearned model and for the retain model (module docstring)."""
    if d_unlearned is None or d_retain is None:
        return None
    _check(d_unlearned, d_retain)
    return 1.0 - _clip01(abs(d_unlearned - d_retain) / (abs(d_unlearned) + abs(d_retain) + eps))


def change_score(before: Optional[float], after: Optional[float], eps: float = SCORE_EPS) -> Optional[float]:
    """Q = 1 - clip(|after - before| / (|before| + |after| + eps), 0, 1) of one metric (module docstring)."""
    if before is None or after is None:
        return None
    _check(before, after)
    return 1.0 - _clip01(abs(after - before) / (abs(before) + abs(after) + eps))
