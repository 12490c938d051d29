"""Gradient ascent and Smoothed Gradient Ascent (docs/design.md, section 2.2).

Notation (``sga.methods.sequence_nll``): l(x) the token-mean NLL of a sequence's answer, r the smoothing rate,
K >= 2 classes, x_f a forget sample, x_n^1..x_n^{K-1} its normal samples (``sga.data.pairing``):

- ``ga``:        L = -l(x_f)
- ``sga``:       L = -(1 - r + r/K) l(x_f) + (r/K) sum_k l(x_n^k)        (r = 0 is ga)
- ``sga_gls``:   L = -(1 - r + r/K) l(x_f) - (r/K) sum_k l(x_n^k)        (literal label-smoothing reading:
                 ascent on the whole smoothed mixture; normal data is descended only for r < 0)
- ``sga_token``: L = -l_eps(x_f) with eps = r the vocabulary smoothing of the kernel (UGradSL-style
                 token-level variant: l_eps = (1-eps) NLL + eps * (lse - mean_v z_v) per token)
"""
from __future__ import annotations

from typing import ClassVar

from sga.methods.base import Objective, ObjectiveOutput
from sga.methods.sequence_nll import weighted_sequence_loss


class GradientAscent(Objective):
    """``ga``: L = -l(x_f), gradient ascent on the forget answers' token-mean NLL."""

    name = "ga"

    def compute(self, model, batch, num_forget):
        loss, (forget,) = weighted_sequence_loss(model, batch, [("forget", -1.0)], num_forget, backend=self.backend)
        return ObjectiveOutput(loss=loss, forget_nll=forget)


class _SmoothedAscent(Objective):
    """Shared by ``sga`` and ``sga_gls``: L = c_f l(x_f) + c_n sum_k l(x_n^k), with
    c_f = -(1 - r + r/K) and c_n = normal_sign * r/K. At r = 0 the normal sequences carry zero weight and
    are not run, so the computation is exactly that of ``ga``."""

    uses_normal = True
    supports_adaptive_rate = True
    normal_sign: ClassVar[float]

    def __init__(self, *, rate: float, num_classes: int, backend: str = "auto") -> None:
        super().__init__(backend=backend)
        if num_classes < 2:
            raise ValueError(f"num_classes (K) must be >= 2, got {num_classes}")
        self.rate = float(rate)
        self.num_classes = int(num_classes)

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        return cls(rate=config.rate, num_classes=config.num_classes, backend=backend)

    def coefficients(self) -> tuple[float, float]:
        """(c_f, c_n) for the current rate."""
        r, k = self.rate, self.num_classes
        return -(1.0 - r + r / k), self.normal_sign * r / k

    def compute(self, model, batch, num_forget):
        c_forget, c_normal = self.coefficients()
        if c_normal == 0.0:
            loss, (forget,) = weighted_sequence_loss(model, batch, [("forget", c_forget)], num_forget, backend=self.backend)
            return ObjectiveOutput(loss=loss, forget_nll=forget)
        coefficients = [("forget", c_forget), ("normal", c_normal)]
        loss, (forget, normal) = weighted_sequence_loss(model, batch, coefficients, num_forget, backend=self.backend)
        return ObjectiveOutput(loss=loss, forget_nll=forget, normal_nll=normal)

    def describe(self):
        return {"method": self.name, "rate": self.rate, "num_classes": self.num_classes}


class SmoothedGradientAscent(_SmoothedAscent):
    """``sga`` (docs/design.md, section 2.2): L = -(1 - r + r/K) l(x_f) + (r/K) sum_k l(x_n^k).

    The weights come from label smoothing over K "classes" (the forget sample the true class, its K-1
    normal samples the others): ascent on the forget sample, descent on the normal samples for r > 0."""

    name = "sga"
    normal_sign = 1.0


class SmoothedGradientAscentLiteral(_SmoothedAscent):
    """``sga_gls``, the literal label-smoothing reading: ascent on the whole smoothed mixture,
    L = -(1 - r + r/K) l(x_f) - (r/K) sum_k l(x_n^k); normal data is descended only for r < 0."""

    name = "sga_gls"
    normal_sign = -1.0


class TokenSmoothedAscent(Objective):
    """``sga_token``: GA with vocabulary label smoothing eps = r in the kernel, L = -l_eps(x_f) where per
    token l_eps = lse(z) - (1 - eps) z_y - (eps/V) sum_v z_v (the token-level, UGradSL-style variant).
    Its logged forget NLL is l_eps itself."""

    name = "sga_token"

    def __init__(self, *, rate: float, backend: str = "auto") -> None:
        super().__init__(backend=backend)
        if not rate <= 1.0:
            raise ValueError(f"sga_token's rate is the vocabulary smoothing eps and must be <= 1, got {rate}")
        self.rate = float(rate)

    @classmethod
    def from_config(cls, config, *, backend="auto"):
        return cls(rate=config.rate, backend=backend)

    def compute(self, model, batch, num_forget):
        loss, (forget,) = weighted_sequence_loss(
            model, batch, [("forget", -1.0)], num_forget, smoothing=self.rate, backend=self.backend
        )
        return ObjectiveOutput(loss=loss, forget_nll=forget)

    def describe(self):
        return {"method": self.name, "rate": self.rate}
