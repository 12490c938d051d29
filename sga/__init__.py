"""sga: LLM unlearning by Smoothed Gradient Ascent, with fused Triton loss kernels.

``sga.unlearn(model, tokenizer, forget=..., retain=..., method="sga", **options)`` and ``sga.evaluate(...)`` are
the short Python API (``sga.api``); they are imported on first use, so that ``import sga.kernels`` needs only
torch, triton and numpy.
"""
from pkgutil import extend_path
from typing import Any

# The subpackage sga.kernels is installed from kernels/sga_kernels/, outside this folder. Run from a checkout with
# the project installed as a wheel, this folder (first on sys.path) would hide the installed sga/kernels/:
# extend_path adds every other sga/ folder on sys.path to this package's search path.
__path__ = extend_path(__path__, __name__)

__all__ = ["evaluate", "unlearn"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sga import (
            api,  # the engine's dependencies (transformers, accelerate) load on first use
        )

        return getattr(api, name)
    raise AttributeError(f"module 'sga' has no attribute {name!r}")
