"""sga.kernels: fused smoothed gradient-ascent and token-rule unlearning losses (Triton kernels, PyTorch fallbacks,
autograd Functions).

Importing this package needs only torch, triton and numpy.
"""
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
