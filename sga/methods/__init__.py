"""Unlearning methods: one class per method, one module per family, and the registry of their names.

The registry is assembled here, top-down: this package imports every method module and lists its classes;
method modules never import the registry. ``sga.config`` and the command line take the method names from
:data:`METHODS`.

==========================  =====================================================================
module                      methods
==========================  =====================================================================
``ascent``                  ga, sga, sga_gls, sga_token (the paper's method and its readings)
``baselines``               grad_diff, npo, simnpo
``preference``              dpo, idk_dpo, and npo / simnpo with open-unlearning's retain term
``token``                   wga, satimp, ce_u, ihl, pdu, undial (token-level rules)
``representation``          rmu
``finetune``                sft (plain fine-tuning through the same trainer)
==========================  =====================================================================

Add a method: subclass :class:`Objective` (``name``, ``compute``, and the hooks it needs) in a module of its
family, then list it here, or call :func:`register` from your own code.
"""
from __future__ import annotations

from sga.config import ConfigError, MethodConfig
from sga.methods.ascent import (
    GradientAscent,
    SmoothedGradientAscent,
    SmoothedGradientAscentLiteral,
    TokenSmoothedAscent,
)
from sga.methods.base import Objective, ObjectiveOutput
from sga.methods.baselines import (
    GradientDifference,
    NegativePreferenceOptimization,
    SimpleNPO,
)
from sga.methods.finetune import SupervisedFineTuning
from sga.methods.preference import (
    DirectPreferenceOptimization,
    IdkDirectPreferenceOptimization,
    NPOWithRetain,
    SimNPOWithRetain,
)
from sga.methods.representation import RepresentationMisdirection
from sga.methods.token import (
    CrossEntropyUnlearning,
    InvertedHingeLoss,
    PrimalDualUnlearning,
    SaturationImportance,
    Undial,
    WeightedGradientAscent,
)

# name -> class. npo and simnpo are the wrappers that add open-unlearning's retain term when alpha or
# forget_weight is set and build the plain baselines otherwise.
METHODS: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        GradientAscent, SmoothedGradientAscent, SmoothedGradientAscentLiteral, TokenSmoothedAscent,
        GradientDifference, NPOWithRetain, SimNPOWithRetain, SupervisedFineTuning,
        DirectPreferenceOptimization, IdkDirectPreferenceOptimization,
        WeightedGradientAscent, SaturationImportance, CrossEntropyUnlearning, InvertedHingeLoss, Undial,
        PrimalDualUnlearning, RepresentationMisdirection,
    )
}


def register(cls: type[Objective]) -> type[Objective]:
    """Add a method of your own to :data:`METHODS` under its ``name`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Objective)) or not isinstance(getattr(cls, "name", None), str):
        raise TypeError(f"register takes an Objective subclass with a name, got {cls!r}")
    METHODS[cls.name] = cls
    return cls


def check_method_name(name: str) -> str:
    """``name`` if it is a registered method, else a :class:`ConfigError` listing the methods."""
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; choose from {', '.join(METHODS)}")
    return name


def build_objective(config: MethodConfig, *, backend: str = "auto") -> Objective:
    """The objective named by ``config.name``, with its parameters."""
    return METHODS[check_method_name(config.name)].from_config(config, backend=backend)


__all__ = [
    "METHODS", "Objective", "ObjectiveOutput", "build_objective", "check_method_name", "register",
    "GradientAscent", "SmoothedGradientAscent", "SmoothedGradientAscentLiteral", "TokenSmoothedAscent",
    "GradientDifference", "NegativePreferenceOptimization", "SimpleNPO", "NPOWithRetain", "SimNPOWithRetain",
    "SupervisedFineTuning", "DirectPreferenceOptimization", "IdkDirectPreferenceOptimization",
    "WeightedGradientAscent", "SaturationImportance", "CrossEntropyUnlearning", "InvertedHingeLoss", "Undial",
    "PrimalDualUnlearning", "RepresentationMisdirection",
]
