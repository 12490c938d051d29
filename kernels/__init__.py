"""sga.kernels: fused smoothed gradient-ascent and token-rule unlearning losses (Triton kernels, PyTorch fallbacks,
autograd Functions).

Importing this package needs only torch, triton and numpy.

This folder is installed as ``sga.kernels`` only. With the repository root on sys.path (the working directory of
``python -m pytest``, a script run from the checkout) it is also findable as a top-level ``kernels``, the name of
another PyPI project, and transformers imports that name while probing for it: imported so, this module defines
nothing, so the custom ops of ``sga.kernels`` are never registered a second time (a second registration corrupts
torch's dispatcher entries: segfaults and "schema" assertions in later calls).
"""
if __name__ == "sga.kernels":
    from .linear import FusedLinearFunction, linear_smoothed_ga_loss
    from .reference import smoothed_ga_loss_reference
    from .smoothed_ga import SmoothedGALoss, SmoothedGALossFunction, smoothed_ga_loss
    from .token_loss import TokenLossFunction, linear_token_loss, token_loss
    from .token_reference import token_loss_reference
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
else:
    __all__: list[str] = []
