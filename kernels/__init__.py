"""sga.kernels: fused smoothed gradient-ascent losses (Triton kernels, PyTorch fallbacks, autograd Functions).

Importing this package needs only torch, triton and numpy.
"""
from .linear import FusedLinearFunction, linear_smoothed_ga_loss
from .reference import smoothed_ga_loss_reference
from .smoothed_ga import SmoothedGALoss, SmoothedGALossFunction, smoothed_ga_loss

__all__ = [
    "FusedLinearFunction",
    "SmoothedGALoss",
    "SmoothedGALossFunction",
    "linear_smoothed_ga_loss",
    "smoothed_ga_loss",
    "smoothed_ga_loss_reference",
]
