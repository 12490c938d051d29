"""The oracle rule of tests/kernels/kernel_oracle.py catches wrong results at any magnitude: planted defects (a halved,
a 1%-off or an unsmoothed gradient, a missing dW, an all-zero dH of size 1e-4) fail it, and the Triton kernel
run with SGA_PLANTED_DEFECT=halve_gradient fails the oracle suite."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernel_oracle import assert_no_worse_than_fp32, fp32_eager, make_inputs, truth
from sga.kernels import smoothed_ga_loss_reference

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent.parent


def logits_case(magnitude=1.0):
    """bf16 logits, smoothing 0.1, signed weights: the exact gradient, the fp32 baseline's, and a correct one
    (the exact value rounded once to bf16, as the kernel stores it), all times magnitude."""
    logits, labels = make_inputs((6, 9), 777, dtype=torch.bfloat16, seed=30)
    weights = torch.randn(6, 9, generator=torch.Generator().manual_seed(31)) * magnitude
    options = dict(smoothing=0.1, token_weights=weights)
    _, exact = truth(logits, labels, **options)
    _, baseline = fp32_eager(logits, labels, **options)
    _, unsmoothed = truth(logits, labels, token_weights=weights)
    return exact, baseline, exact.to(torch.bfloat16), unsmoothed.to(torch.bfloat16)


def linear_case(magnitude):
    """A bf16 head, dH and dW of size ~magnitude: exact (float64), baseline (materialized bf16 logits, fp32 loss)."""
    generator = torch.Generator().manual_seed(32)
    hidden = torch.randn(64, 16, generator=generator).bfloat16()
    weight = (torch.randn(300, 16, generator=generator) * 0.3).bfloat16()
    labels = torch.randint(0, 300, (64,), generator=generator)

    def grads(h, w, upcast):
        h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logits = (h.double() @ w.double().t()) if upcast else (h @ w.t()).float()
        (magnitude * smoothed_ga_loss_reference(logits, labels, smoothing=0.1)).backward()
        return h.grad, w.grad

    return grads(hidden, weight, upcast=True), grads(hidden, weight, upcast=False)


def test_correct_result_passes():
    exact, baseline, correct, _ = logits_case()
    assert_no_worse_than_fp32(correct, baseline, exact, what="gradient")


@pytest.mark.parametrize("magnitude", [1.0, 1e-4])
@pytest.mark.parametrize("defect", ["halved", "one_percent_off", "unsmoothed", "zero"])
def test_planted_gradient_defects_fail(defect, magnitude):
    exact, baseline, correct, unsmoothed = logits_case(magnitude)
    wrong = {"halved": correct * 0.5, "one_percent_off": (exact * 1.01).to(torch.bfloat16),
             "unsmoothed": unsmoothed, "zero": torch.zeros_like(correct)}[defect]  # fmt: skip
    for rtol in (1e-5, 5e-3):  # the logits tests' and the fused linear tests' tolerances
        with pytest.raises(AssertionError):
            assert_no_worse_than_fp32(wrong, baseline, exact, rtol=rtol, what="gradient")


@pytest.mark.parametrize("which", ["dH", "dW"])
def test_missing_or_zero_linear_gradients_fail_at_real_magnitudes(which):
    """dH ~ 1e-4 and dW ~ 1e-3 at real sizes: a bound of rtol * max(size, 1) would let an all-zero result pass;
    the oracle rule does not."""
    (exact_h, exact_w), (plain_h, plain_w) = linear_case(magnitude=1e-3)
    exact, plain = (exact_h, plain_h) if which == "dH" else (exact_w, plain_w)
    assert exact.abs().max() < 1e-2
    assert_no_worse_than_fp32(exact.to(plain.dtype), plain, exact, rtol=5e-3, what=which)  # correct: passes
    zero = torch.zeros_like(plain)
    old_rule_allowed = (plain.double() - exact).abs().max() + 1e-2 * max(exact.abs().max().item(), 1.0)
    assert (zero.double() - exact).abs().max() <= old_rule_allowed  # what such a bound lets through
    with pytest.raises(AssertionError):
        assert_no_worse_than_fp32(zero, plain, exact, rtol=5e-3, what=which)
    with pytest.raises(AssertionError):
        assert_no_worse_than_fp32(plain * 1.02, plain, exact, rtol=5e-3, what=which)


def test_the_kernel_with_a_halved_gradient_fails_the_oracle_suite():
    """The defect bench/gpu_check.sh plants on the GPU, planted here under the interpreter: the suite must fail."""
    env = dict(os.environ, SGA_PLANTED_DEFECT="halve_gradient", TRITON_INTERPRET="1")
    selection = "triton and (option_grid and mean-False-True or low_precision_no_worse or large_vocabulary)"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_smoothed_ga.py", "-k", selection]
    result = subprocess.run(command, cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert "failed" in summary and "passed" not in summary, summary  # every selected test caught it


def test_the_sweep_refuses_a_variant_that_disagrees():
    """bench/gpu_sweep.py never picks a wrong variant: its check fails a halved, an all-zero or an unwritten (NaN)
    gradient, and a loss off by 0.1% or not finite."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_sweep import verdict

    rows = torch.arange(8)
    loss, grad = torch.randn(8).double(), torch.randn(8, 50) * 1e-6
    assert verdict(loss, grad, rows, loss, grad)[0]
    for wrong in (grad * 0.5, torch.zeros_like(grad), torch.full_like(grad, float("nan"))):
        correct, _, reason = verdict(loss, wrong, rows, loss, grad)
        assert not correct and reason
    assert not verdict(loss * 1.001, grad, rows, loss, grad)[0]
    assert not verdict(loss.clone().fill_(float("inf")), grad, rows, loss, grad)[0]
