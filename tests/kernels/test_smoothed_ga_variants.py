"""Every variant of the Triton row kernel (kernels/sga_kernels/tuning.py) against the float64 oracle, under the interpreter.

The GPU runs few programs per SM, each over many rows, with blocks much smaller than a row; the interpreter's
default config does the opposite (the whole row in one block). These tests force the GPU's schedule on the
CPU: few programs, small blocks with a tail, a strided gradient buffer, ignored rows, weights of both signs,
confident tokens, softcap and logit_scale, in place and not.
"""
from dataclasses import replace

import pytest
import torch

from kernel_oracle import rows_truth
from sga.kernels import smoothed_ga_triton, tuning

SMALL_BLOCK = 32  # every sweep variant, its block size divided down so that V = 300 spans blocks and a tail


def small_variants():
    variants = []
    for config in tuning.sweep_variants(128256, 2):
        block = 16 if config.block_v < 8192 else 32 if config.block_v == 8192 else 64
        variants.append(replace(config, block_v=block, programs_per_sm=min(config.programs_per_sm, 3)))
    variants.append(tuning.KernelConfig(block_v=512, num_warps=4, programs_per_sm=2, single_block=True))
    return list(dict.fromkeys(variants))


def make_rows(num_rows, vocab_size, *, dtype=torch.float32, seed=0, confident_row=1, ignored_row=2):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(num_rows, vocab_size, generator=generator)
    labels = torch.randint(0, vocab_size, (num_rows,), generator=generator)
    labels[ignored_row] = -100
    logits[confident_row, labels[confident_row]] += 14.0  # p_y = 1 - O(1e-4)
    weights = torch.randn(num_rows, generator=generator)
    return logits.to(dtype), labels, weights


def run_kernel(logits, labels, weights, config, *, strided=True, inplace=False, **options):
    """rows_forward with a gradient buffer that is a strided view of a wider poisoned tensor (or the logits)."""
    num_rows, vocab_size = logits.shape
    logits = logits.clone()
    if inplace:
        grad = logits
    elif strided:
        grad = torch.full((num_rows, vocab_size + 13), float("nan"), dtype=logits.dtype)[:, 5 : 5 + vocab_size]
    else:
        grad = torch.full_like(logits, float("nan"))
    loss = smoothed_ga_triton.rows_forward(logits, labels, weights, torch.tensor(0.37), grad, options.pop("smoothing"),
                                       options.pop("sign"), -100, config=config, **options)
    return loss, grad


def assert_matches_truth(loss, grad, exact_loss, exact_grad, loss_scale, grad_scale, *, rtol=2e-6):
    """Each element's error against float64, relative to the size of the terms that produced it (the exact
    value where nothing cancels): an all-zero, halved or 1%-off result fails."""
    assert torch.isfinite(grad).all(), "unwritten (NaN-poisoned) or non-finite gradient elements"
    loss_error = (loss.double() - exact_loss).abs()
    assert torch.all(loss_error <= rtol * loss_scale), f"loss error {loss_error.max():.3e}"
    grad_error = (grad.double() - exact_grad).abs()
    worst = (grad_error / grad_scale.clamp_min(1e-300)).max().item()
    assert torch.all(grad_error <= rtol * grad_scale), f"gradient error {worst:.3e} of its terms' size"


@pytest.mark.parametrize("config", small_variants(), ids=lambda c: c.name())
@pytest.mark.parametrize(
    "smoothing, softcap, logit_scale", [(0.0, None, 1.0), (0.1, None, 1.3), (-0.4, 5.0, 0.8)], ids=["plain", "scaled", "softcap"]
)
def test_every_variant_on_the_gpu_schedule(config, smoothing, softcap, logit_scale):
    logits, labels, weights = make_rows(7, 300, seed=1)
    options = dict(smoothing=smoothing, sign=-1.0, softcap=softcap, logit_scale=logit_scale)
    loss, grad = run_kernel(logits, labels, weights, config, **options)
    exact = rows_truth(logits, labels, weights, torch.tensor(0.37), **options)
    assert_matches_truth(loss, grad, *exact)
    assert torch.all(grad[2] == 0) and loss[2] == 0  # the ignored row: zeros written, no loss


@pytest.mark.parametrize("config", small_variants()[::4], ids=lambda c: c.name())
def test_variants_in_place(config):
    """inplace_backward: the gradient overwrites the logits; the target logit must be read before any store."""
    logits, labels, weights = make_rows(5, 300, seed=2)
    options = dict(smoothing=0.1, sign=1.0, softcap=None, logit_scale=1.0)
    loss, grad = run_kernel(logits, labels, weights, config, inplace=True, **options)
    assert_matches_truth(loss, grad, *rows_truth(logits, labels, weights, torch.tensor(0.37), **options))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab_size", [128256, 32000])
def test_sweep_variants_at_their_real_block_sizes(dtype, vocab_size):
    """The very configs the GPU sweep times, on rows of 2-3 real blocks plus a tail (or one single block)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    for config in tuning.sweep_variants(vocab_size, element_size):
        width = vocab_size if config.single_block else 2 * config.block_v + 37
        logits, labels, weights = make_rows(3, width, dtype=dtype, seed=3)
        options = dict(smoothing=0.1, sign=-1.0, softcap=None, logit_scale=1.0)
        loss, grad = run_kernel(logits, labels, weights, replace(config, programs_per_sm=2), strided=False, **options)
        exact_loss, exact_grad, loss_scale, grad_scale = rows_truth(logits, labels, weights, torch.tensor(0.37), **options)
        if dtype == torch.bfloat16:  # one rounding of the fp32 result: half a bf16 ulp of the exact value
            grad_scale = grad_scale * 2e-6 + 2.0**-8 * exact_grad.abs() * (1 + 1e-3)
            grad_scale = grad_scale / 2e-6
        assert_matches_truth(loss, grad, exact_loss, exact_grad, loss_scale, grad_scale)


def test_confident_token_target_gradient_has_no_cancellation():
    """1 - p_y < 1e-7: p_y - 1 as exp(z_y - lse) - 1 in fp32 would be 0 or a whole fp32 ulp of 1 (1.2e-7) off;
    -sum_{v != y} p_v is exact to fp32 rounding."""
    logits, labels, weights = make_rows(4, 300, seed=4, confident_row=0)
    logits[0, labels[0]] = logits[0].max() + 22.0
    options = dict(smoothing=0.0, sign=1.0, softcap=None, logit_scale=1.0)
    config = tuning.KernelConfig(block_v=64, num_warps=4, programs_per_sm=1)
    _, grad = run_kernel(logits, labels, weights, config, **options)
    _, exact_grad, _, _ = rows_truth(logits, labels, weights, torch.tensor(0.37), **options)
    target, exact_target = grad[0, labels[0]].double(), exact_grad[0, labels[0]]
    assert abs(exact_target) < 1e-6
    assert abs(target - exact_target) <= 1e-5 * abs(exact_target)


def test_zeroed_buffer_leaves_ignored_rows_unwritten():
    logits, labels, weights = make_rows(4, 300, seed=5)
    grad = torch.full_like(logits, float("nan"))
    config = tuning.KernelConfig(block_v=64, num_warps=4, programs_per_sm=1)
    smoothed_ga_triton.rows_forward(logits, labels, weights, torch.tensor(1.0), grad, 0.1, -1.0, -100,
                                grad_buffer_zeroed=True, config=config)
    assert torch.isnan(grad[2]).all()  # not written: the caller promised zeros there
    assert torch.isfinite(grad[[0, 1, 3]]).all()


@pytest.mark.parametrize("softcap, logit_scale, error", [(0.0, 1.0, "softcap"), (None, -1.0, "logit_scale"),
                                                         (float("inf"), 1.0, "softcap")])
def test_bad_transform_is_refused(softcap, logit_scale, error):
    logits, labels, weights = make_rows(3, 10, seed=6)
    with pytest.raises(ValueError, match=error):
        smoothed_ga_triton.rows_forward(logits, labels, weights, torch.tensor(1.0), None, 0.0, 1.0, -100,
                                    softcap=softcap, logit_scale=logit_scale)


def test_single_block_config_must_hold_the_row():
    logits, labels, weights = make_rows(3, 300, seed=7)
    config = tuning.KernelConfig(block_v=256, num_warps=4, single_block=True)
    with pytest.raises(ValueError, match="single-block"):
        smoothed_ga_triton.rows_forward(logits, labels, weights, torch.tensor(1.0), None, 0.0, 1.0, -100, config=config)


def test_tuning_table_lookup(monkeypatch):
    default = tuning.config_for("sm90", "bfloat16", 128256, 2)
    assert default == tuning.default_config(128256, 2) and not default.single_block
    assert tuning.config_for("sm90", "bfloat16", 16000, 2).single_block  # the row fits without spills
    assert not tuning.config_for("sm90", "bfloat16", 32000, 2).single_block  # it would spill: two sweeps
    measured = tuning.KernelConfig(block_v=4096, num_warps=16, num_stages=3, programs_per_sm=1)
    monkeypatch.setitem(tuning.TABLE, ("sm90", "bfloat16", 131072), measured)
    assert tuning.config_for("sm90", "bfloat16", 128256, 2) == measured
    assert tuning.config_for("sm90", "bfloat16", 262144, 2) == tuning.default_config(262144, 2)
    assert tuning.config_for("sm80", "bfloat16", 128256, 2) == default
