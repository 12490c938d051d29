"""Kernel-test setup: the planted defect that proves the tests catch a wrong gradient.

With ``SGA_PLANTED_DEFECT=halve_gradient`` in the environment, every launch of the smoothed-GA Triton kernel
(``sga.kernels.smoothed_ga_triton.rows_forward``, which the logits loss and the fused linear loss both reach
through ``sga.kernels.ops``) has the gradient it wrote halved; the loss is left as it is. ``bench/gpu_check.sh``
runs the CUDA tests once that way and expects them to fail, and ``test_smoothed_ga_oracle.py`` does the same
under the Triton interpreter. Without the variable nothing is patched.
"""
import os

import pytest

PLANTED_DEFECT_ENV = "SGA_PLANTED_DEFECT"
PLANTED_DEFECTS = ("halve_gradient",)


def pytest_configure(config):
    defect = os.environ.get(PLANTED_DEFECT_ENV, "")
    if defect and defect not in PLANTED_DEFECTS:
        raise pytest.UsageError(f"{PLANTED_DEFECT_ENV}={defect!r}: the planted defects are {PLANTED_DEFECTS}")


@pytest.fixture(autouse=True)
def _planted_defect(monkeypatch):
    if os.environ.get(PLANTED_DEFECT_ENV, "") != "halve_gradient":
        return
    from sga.kernels import smoothed_ga_triton

    launch = smoothed_ga_triton.rows_forward

    def halved_gradient(logits, labels, weights, grad_norm, grad_buffer, *args, **kwargs):
        row_loss = launch(logits, labels, weights, grad_norm, grad_buffer, *args, **kwargs)
        if grad_buffer is not None:
            grad_buffer.mul_(0.5)
        return row_loss

    monkeypatch.setattr(smoothed_ga_triton, "rows_forward", halved_gradient)
