"""sga.kernels: fused smoothed gradient-ascent and token-rule unlearning losses (Triton kernels, PyTorch fallbacks,
autograd Functions).

Importing this package needs only torch, triton and numpy. The source lives in the repository's top-level folder
``kernels/sga_kernels/`` and is installed as ``sga.kernels`` only (``package_dir`` in setup.py): the top-level
``kernels/`` folder is not a Python package, so the import name ``kernels`` stays free for Hugging Face's PyPI
package of that name, which transformers imports.

Modules, bottom up (each imports only from the ones before it): ``checks``, ``tuning``, ``bounds``;
``compiled_rows``, ``linear_gemms``; ``cpu_routes`` (the measured CPU GEMM route); ``triton_launch``, ``token_rules``; the backends ``smoothed_ga_torch``,
``smoothed_ga_triton``, ``token_loss_torch``, ``token_loss_triton``; ``ops`` (the custom ops); ``row_loss``;
``linear`` (the chunk loop of the fused linear losses); the losses ``smoothed_ga`` and ``token_loss``; the float64
references ``smoothed_ga_reference`` and ``token_loss_reference``. The import-linter contract "kernels: one
direction" in pyproject.toml checks that order.
"""
from .linear import FusedLinearFunction
from .smoothed_ga import SmoothedGALoss, SmoothedGALossFunction, linear_smoothed_ga_loss, smoothed_ga_loss
from .smoothed_ga_reference import smoothed_ga_loss_reference
from .token_loss import TokenLossFunction, linear_token_loss, token_loss
from .token_loss_reference import token_loss_reference
from .token_rules import TOKEN_RULES, TokenRule

__all__ = [
    "FusedLinearFunction",
    "SmoothedGALoss",
    "SmoothedGALossFunction",
    "linear_smoothed_ga_loss",
    "smoothed_ga_loss",
    "smoothed_ga_loss_reference",
    "TOKEN_RULES",
    "TokenLossFunction",
    "TokenRule",
    "linear_token_loss",
    "token_loss",
    "token_loss_reference",
]
