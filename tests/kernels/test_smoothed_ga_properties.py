"""Algebraic properties of the smoothed-GA loss, checked by hypothesis on random inputs."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_oracle import loss_and_grad
from sga.kernels import smoothed_ga_loss

shapes = st.tuples(st.integers(1, 6), st.integers(1, 300))
smoothings = st.floats(-2.0, 1.0, allow_nan=False)
seeds = st.integers(0, 2**31 - 1)
reductions = st.sampled_from(["mean", "sum", "none"])
backends = st.sampled_from(["torch", "torch", "torch", "triton"])  # the interpreter is slow: sample it less


def random_case(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    num_tokens, vocab_size = shape
    logits = 4 * torch.randn(num_tokens, vocab_size, generator=generator)
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    labels[torch.rand(num_tokens, generator=generator) < 0.25] = -100
    weights = torch.randn(num_tokens, generator=generator)
    return logits, labels, weights


@settings(max_examples=40, deadline=None)
@given(shape=shapes, smoothing=smoothings, seed=seeds, reduction=reductions, backend=backends)
def test_ascent_is_minus_descent(shape, smoothing, seed, reduction, backend):
    logits, labels, weights = random_case(shape, seed)
    options = dict(smoothing=smoothing, token_weights=weights, reduction=reduction, backend=backend)
    up, up_grad = loss_and_grad(smoothed_ga_loss, logits, labels, ascent=True, **options)
    down, down_grad = loss_and_grad(smoothed_ga_loss, logits, labels, ascent=False, **options)
    torch.testing.assert_close(up, -down, rtol=0, atol=0)
    torch.testing.assert_close(up_grad, -down_grad, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, smoothing=smoothings, seed=seeds, backend=backends, a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_linear_in_the_token_weights(shape, smoothing, seed, backend, a, b):
    logits, labels, first = random_case(shape, seed)
    second = torch.randn(first.shape, generator=torch.Generator().manual_seed(seed + 1))
    options = dict(smoothing=smoothing, reduction="sum", backend=backend)
    combined, combined_grad = loss_and_grad(smoothed_ga_loss, logits, labels, token_weights=a * first + b * second, **options)
    part1, grad1 = loss_and_grad(smoothed_ga_loss, logits, labels, token_weights=first, **options)
    part2, grad2 = loss_and_grad(smoothed_ga_loss, logits, labels, token_weights=second, **options)
    scale = 1 + part1.abs() * abs(a) + part2.abs() * abs(b)
    torch.testing.assert_close(combined, a * part1 + b * part2, atol=1e-5 * scale.item(), rtol=1e-5)
    torch.testing.assert_close(combined_grad, a * grad1 + b * grad2, atol=1e-5 * (1 + abs(a) + abs(b)), rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, smoothing=smoothings, seed=seeds, shift=st.floats(-50, 50))
def test_invariant_to_shifting_a_row(shape, smoothing, seed, shift):
    """Adding a constant to every logit of a row changes neither l nor its gradient."""
    logits, labels, weights = random_case(shape, seed)
    base, base_grad = loss_and_grad(smoothed_ga_loss, logits, labels, smoothing=smoothing, reduction="none", backend="torch")
    moved, moved_grad = loss_and_grad(smoothed_ga_loss, logits + shift, labels, smoothing=smoothing, reduction="none", backend="torch")
    torch.testing.assert_close(moved, base, atol=1e-4 * (1 + abs(shift)), rtol=1e-4)
    torch.testing.assert_close(moved_grad, base_grad, atol=1e-5, rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, smoothing=st.floats(0.0, 1.0), seed=seeds)
def test_descent_loss_is_nonnegative_and_gradient_rows_sum_to_zero(shape, smoothing, seed):
    """For 0 <= eps <= 1 the descent loss is a cross-entropy against a distribution (>= 0), and each
    valid row's gradient sums to zero (softmax minus a distribution)."""
    logits, labels, _ = random_case(shape, seed)
    loss, grad = loss_and_grad(smoothed_ga_loss, logits, labels, smoothing=smoothing, ascent=False,
                               reduction="none", backend="torch")
    assert torch.all(loss >= -1e-5)
    torch.testing.assert_close(grad.sum(-1), torch.zeros(shape[0]), atol=1e-5, rtol=0)
