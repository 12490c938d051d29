"""Correctness of sga.kernels.linear_smoothed_ga_loss against the float64 oracle on materialized logits.

The oracle: logits = softcap(hidden @ W^T + b) in float64, then smoothed_ga_loss_reference, gradients by
autograd. The Triton row kernel runs in the CPU interpreter here, so its cases stay small.
"""
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from kernel_oracle import assert_no_worse_than_fp32, max_error
from sga.kernels import linear_smoothed_ga_loss, smoothed_ga_loss_reference
from sga.kernels.linear import FusedLinearFunction, default_chunk_rows

FP32_TOL = dict(atol=2e-5, rtol=2e-5)


def make_case(num_tokens, hidden_size, vocab_size, *, dtype=torch.float32, bias=True, seed=0, ignore_index=-100,
              device="cpu"):
    """hidden [N, D], weight [V, D] scaled so that the logits have std ~3, bias [V] or None, labels [N] with
    about 20% of the tokens set to ignore_index; generated on ``device`` (CUDA tests: no host-to-device copies)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    on = dict(generator=generator, device=device)
    hidden = torch.randn(num_tokens, hidden_size, **on).to(dtype)
    weight = (3.0 / math.sqrt(hidden_size) * torch.randn(vocab_size, hidden_size, **on)).to(dtype)
    bias_tensor = torch.randn(vocab_size, **on).to(dtype) if bias else None
    labels = torch.randint(0, vocab_size, (num_tokens,), **on)
    ignored = torch.rand(num_tokens, **on) < 0.2
    labels = torch.where(ignored, torch.full_like(labels, ignore_index), labels)
    return hidden, weight, bias_tensor, labels


def reference_logits(hidden, weight, bias, softcap):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def grads_of(fn, hidden, weight, bias, labels, grad_output=None, *, cast=None, **kwargs):
    """Loss and (dH, dW, db) of fn(hidden, weight, labels, bias=..., **kwargs) on fresh leaves.

    cast: a dtype to run fn in (the leaves keep their dtype; the gradients come back through the cast)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    args = [t.to(cast) if (cast is not None and t is not None) else t for t in leaves]
    loss = fn(args[0], args[1], labels, bias=args[2], **kwargs)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    loss.backward(grad_output.to(loss.dtype))
    return loss.detach(), tuple(t.grad if t is not None else None for t in leaves)


def materialized(hidden, weight, labels, *, bias=None, softcap=None, chunk_size=None, backend=None, **kwargs):
    """The oracle: materialized logits and the float64 reference loss."""
    return smoothed_ga_loss_reference(reference_logits(hidden, weight, bias, softcap), labels, **kwargs)


def truth(hidden, weight, bias, labels, grad_output=None, **kwargs):
    double = [t.double() if t is not None else None for t in (hidden, weight, bias)]
    return grads_of(materialized, *double, labels, grad_output, **kwargs)


def ours(hidden, weight, bias, labels, grad_output=None, **kwargs):
    return grads_of(linear_smoothed_ga_loss, hidden, weight, bias, labels, grad_output, **kwargs)


def assert_matches_truth(result, exact, tol=FP32_TOL):
    (loss, grads), (exact_loss, exact_grads) = result, exact
    assert loss.shape == exact_loss.shape
    torch.testing.assert_close(loss.double(), exact_loss, **tol)
    for grad, exact_grad in zip(grads, exact_grads):
        if exact_grad is None:
            assert grad is None
        else:
            torch.testing.assert_close(grad.double(), exact_grad, **tol)


class RecordOps(TorchFunctionMode):
    """Records (name, output shape) of every torch function / tensor method called while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        self.calls.append((getattr(func, "__name__", str(func)), shape))
        return out

    def gemms(self):
        return [shape for name, shape in self.calls if name in ("mm", "addmm", "addmm_")]


# --------------------------------------------------------------------------------------------------------------
# the option grid against the oracle


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing, ascent", [(0.0, True), (0.1, False), (-0.4, True), (1.0, True)])
def test_option_grid_matches_float64_oracle(softcap, has_bias, reduction, smoothing, ascent):
    """Odd D and V, V far above the chunk's rows, N not a multiple of the chunk, mixed-sign token weights."""
    hidden, weight, bias, labels = make_case(37, 13, 301, bias=has_bias, seed=1)
    weights = torch.randn(37, generator=torch.Generator().manual_seed(2))
    grad_output = torch.randn(37) if reduction == "none" else torch.tensor(0.7)
    options = dict(softcap=softcap, smoothing=smoothing, ascent=ascent, token_weights=weights, reduction=reduction)
    result = ours(hidden, weight, bias, labels, grad_output, chunk_size=8, backend="torch", **options)
    assert result[0].dtype == torch.float32
    assert_matches_truth(result, truth(hidden, weight, bias, labels, grad_output, **options))


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_row_kernel_matches_float64_oracle(softcap, reduction):
    hidden, weight, bias, labels = make_case(19, 7, 211, seed=3)
    grad_output = torch.randn(19) if reduction == "none" else torch.tensor(-1.3)
    options = dict(softcap=softcap, smoothing=0.1, reduction=reduction)
    result = ours(hidden, weight, bias, labels, grad_output, chunk_size=8, backend="triton", **options)
    assert_matches_truth(result, truth(hidden, weight, bias, labels, grad_output, **options))


@pytest.mark.parametrize("ignore_index", [-100, 5])
def test_ignore_index_negative_and_in_range(ignore_index):
    hidden, weight, bias, labels = make_case(29, 11, 97, ignore_index=ignore_index, seed=4)
    labels[:3] = 5  # an in-range ignore_index must be ignored too
    options = dict(smoothing=0.2, ignore_index=ignore_index)
    result = ours(hidden, weight, bias, labels, chunk_size=5, backend="torch", **options)
    assert_matches_truth(result, truth(hidden, weight, bias, labels, **options))


def test_default_chunking_with_several_chunks():
    """N = 300 with the default rule: chunks of 128, 128 and 44 rows."""
    assert default_chunk_rows(300, 1) == 128
    hidden, weight, bias, labels = make_case(300, 16, 1000, seed=5)
    options = dict(smoothing=0.1, softcap=6.0)
    result = ours(hidden, weight, bias, labels, **options)
    assert_matches_truth(result, truth(hidden, weight, bias, labels, **options))


def test_default_chunk_rule():
    """1/16 of the tokens (1/32 with softcap's second buffer), at least 128 rows, at most N."""
    assert default_chunk_rows(8192, 1) == 512
    assert default_chunk_rows(8192, 2) == 256
    assert default_chunk_rows(2048, 1) == 128
    assert default_chunk_rows(2048, 2) == 128
    assert default_chunk_rows(100, 1) == 100
    assert default_chunk_rows(0, 1) == 1


def test_leading_dimensions_and_per_token_output():
    hidden, weight, bias, labels = make_case(24, 9, 50, seed=6)
    hidden3, labels3 = hidden.reshape(2, 3, 4, 9), labels.reshape(2, 3, 4)
    grad_output = torch.randn(2, 3, 4)
    result = ours(hidden3, weight, bias, labels3, grad_output, reduction="none", chunk_size=7, backend="torch")
    assert result[0].shape == (2, 3, 4)
    assert result[1][0].shape == hidden3.shape
    assert_matches_truth(result, truth(hidden3, weight, bias, labels3, grad_output, reduction="none"))


def test_descent_equals_label_smoothed_cross_entropy_of_the_logits():
    hidden, weight, bias, labels = make_case(40, 12, 77, seed=7)
    loss = linear_smoothed_ga_loss(hidden, weight, labels, bias=bias, smoothing=0.3, ascent=False, chunk_size=9)
    logits = reference_logits(hidden, weight, bias, None)
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.3)
    torch.testing.assert_close(loss, expected, **FP32_TOL)


# --------------------------------------------------------------------------------------------------------------
# low precision: no worse than what materializing the logits gives on the same inputs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_no_worse_than_plain_arithmetic(dtype, softcap, reduction):
    """The error rule of kernel_oracle. Truth: float64 on the (already rounded) low-precision inputs. Baseline, what users get by
    materializing: logits = hidden @ W^T + b in the input dtype (as the model's lm_head computes them), the
    loss in float32 arithmetic on them (as HF upcasts), gradients by autograd. Ours must not be less accurate
    than that, up to 0.5% of the largest value (about one bf16 rounding, 2^-8)."""
    hidden, weight, bias, labels = make_case(70, 24, 500, dtype=dtype, seed=8)
    grad_output = torch.randn(70) if reduction == "none" else None
    options = dict(softcap=softcap, smoothing=0.1, reduction=reduction)

    def plain(h, w, y, *, bias=None, **kwargs):
        return smoothed_ga_loss_reference(reference_logits(h, w, bias, softcap).float(), y, **kwargs).float()

    loss, grads = ours(hidden, weight, bias, labels, grad_output, chunk_size=16, **options)
    plain_options = dict(smoothing=0.1, reduction=reduction)
    plain_loss, plain_grads = grads_of(plain, hidden, weight, bias, labels, grad_output, **plain_options)
    exact_loss, exact_grads = truth(hidden, weight, bias, labels, grad_output, **options)
    assert loss.dtype == torch.float32
    assert all(g.dtype == dtype for g in grads)
    assert_no_worse_than_fp32(loss, plain_loss, exact_loss, rtol=5e-3, what="loss")
    for name, grad, plain_grad, exact_grad in zip("HWb", grads, plain_grads, exact_grads):
        assert_no_worse_than_fp32(grad, plain_grad, exact_grad, rtol=5e-3, what=f"d{name}")


def test_low_precision_weight_gradient_is_accumulated_in_float32():
    """Many chunks of a bf16 head: summing per-chunk dW in bf16 would lose the small contributions. Ours stays
    within a few bf16 roundings of the truth, far below what bf16 accumulation over 64 chunks gives."""
    hidden, weight, bias, labels = make_case(256, 8, 64, dtype=torch.bfloat16, bias=False, seed=9)
    _, (_, grad_weight, _) = ours(hidden, weight, None, labels, reduction="sum", chunk_size=4)
    _, (_, exact_weight, _) = truth(hidden, weight, None, labels, reduction="sum")
    scale = exact_weight.abs().max().item()
    assert max_error(grad_weight, exact_weight) <= 2 * 2**-8 * scale
    # what accumulating in bf16 would give, for contrast: the test can tell the two apart
    logits = reference_logits(hidden.double(), weight.double(), None, None)
    per_token = torch.softmax(logits, -1) - torch.nn.functional.one_hot(labels.clamp_min(0), 64).double()
    per_token[labels == -100] = 0.0
    accumulated = torch.zeros_like(weight)
    for start in range(0, 256, 4):
        chunk = (-per_token[start : start + 4]).t() @ hidden[start : start + 4].double()
        accumulated += chunk.to(torch.bfloat16)
    assert max_error(accumulated, exact_weight) > max_error(grad_weight, exact_weight)


# --------------------------------------------------------------------------------------------------------------
# which gradients are computed


@pytest.mark.parametrize(
    "needs, expected_gemms",
    [((True, True, True), 3), ((True, False, False), 2), ((False, True, False), 2), ((False, False, True), 1)],
)
def test_only_needed_gradients_are_computed(needs, expected_gemms):
    """A frozen head costs no dW GEMM and no [V, D] buffer; a frozen input no dH GEMM."""
    num_tokens, hidden_size, vocab_size, chunk = 20, 6, 33, 7
    hidden, weight, bias, labels = make_case(num_tokens, hidden_size, vocab_size, seed=10)
    leaves = [t.clone().requires_grad_(need) for t, need in zip((hidden, weight, bias), needs)]
    with RecordOps() as record:
        loss = linear_smoothed_ga_loss(leaves[0], leaves[1], labels, bias=leaves[2], chunk_size=chunk, backend="torch")
        loss.backward()
    chunks = math.ceil(int((labels != -100).sum()) / chunk)  # ignored rows never reach the GEMMs
    assert len(record.gemms()) == expected_gemms * chunks
    assert (("zeros", (vocab_size, hidden_size)) in record.calls) == needs[1]  # the dW accumulator
    for leaf, need in zip(leaves, needs):
        assert (leaf.grad is not None) == need
    exact_loss, exact_grads = truth(hidden, weight, bias, labels)
    torch.testing.assert_close(loss.detach().double(), exact_loss, **FP32_TOL)
    for leaf, need, exact_grad in zip(leaves, needs, exact_grads):
        if need:
            torch.testing.assert_close(leaf.grad.double(), exact_grad, **FP32_TOL)


def test_no_grad_mode_computes_the_loss_only():
    hidden, weight, bias, labels = make_case(20, 6, 33, seed=11)
    weight.requires_grad_(True)
    with torch.no_grad(), RecordOps() as record:
        loss = linear_smoothed_ga_loss(hidden, weight, labels, bias=bias, chunk_size=7)
    assert not loss.requires_grad
    kept = int((labels != -100).sum())  # ignored rows never reach the GEMMs
    assert len(record.gemms()) == math.ceil(kept / 7)  # the logits GEMM of each chunk only
    torch.testing.assert_close(loss.double(), truth(hidden, weight, bias, labels)[0], **FP32_TOL)


def test_tied_weight_gets_both_gradients():
    """The head weight is also the embedding matrix (GPT-2 style): its gradient sums both uses."""
    generator = torch.Generator().manual_seed(12)
    vocab_size, hidden_size = 41, 10
    weight = (0.5 * torch.randn(vocab_size, hidden_size, generator=generator)).requires_grad_(True)
    mix = torch.randn(hidden_size, hidden_size, generator=generator)
    ids = torch.randint(0, vocab_size, (2, 9), generator=generator)
    labels = torch.roll(ids, -1, dims=1)

    def forward(w, loss_fn, **kwargs):
        hidden = torch.tanh(w[ids] @ mix.to(w.dtype))
        return loss_fn(hidden, w, labels, smoothing=0.1, **kwargs)

    loss = forward(weight, linear_smoothed_ga_loss, chunk_size=4)
    loss.backward()
    weight64 = weight.detach().double().requires_grad_(True)
    exact = forward(weight64, materialized)
    exact.backward()
    torch.testing.assert_close(loss.detach().double(), exact.detach(), **FP32_TOL)
    torch.testing.assert_close(weight.grad.double(), weight64.grad, **FP32_TOL)


# --------------------------------------------------------------------------------------------------------------
# reductions, normalizer, edge cases


def test_normalizer_number_and_tensor():
    hidden, weight, bias, labels = make_case(30, 8, 60, seed=13)
    for normalizer in (7.0, torch.tensor(7.0)):
        result = ours(hidden, weight, bias, labels, normalizer=normalizer, chunk_size=8)
        assert_matches_truth(result, truth(hidden, weight, bias, labels, normalizer=7.0))


def test_microbatches_with_normalizer_add_up_to_the_full_batch():
    hidden, weight, bias, labels = make_case(40, 8, 60, seed=14)
    total = int((labels != -100).sum())
    full_loss, full_grads = ours(hidden, weight, bias, labels, chunk_size=6)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = sum(
        linear_smoothed_ga_loss(leaves[0][s : s + 10], leaves[1], labels[s : s + 10], bias=leaves[2], normalizer=total)
        for s in range(0, 40, 10)
    )
    loss.backward()
    torch.testing.assert_close(loss.detach(), full_loss, **FP32_TOL)
    for leaf, full_grad in zip(leaves, full_grads):
        torch.testing.assert_close(leaf.grad, full_grad, **FP32_TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_ignored_gives_zero_loss_and_gradients(reduction):
    hidden, weight, bias, _ = make_case(12, 5, 20, seed=15)
    labels = torch.full((12,), -100)
    loss, grads = ours(hidden, weight, bias, labels, reduction=reduction, smoothing=0.1, chunk_size=5)
    assert torch.all(loss == 0)
    assert all(torch.all(g == 0) for g in grads)


def test_zero_normalizer_gives_zero():
    hidden, weight, bias, labels = make_case(12, 5, 20, seed=16)
    loss, grads = ours(hidden, weight, bias, labels, normalizer=0.0)
    assert loss.item() == 0.0 and all(torch.all(g == 0) for g in grads)


def test_no_tokens():
    hidden, weight, bias, _ = make_case(1, 5, 20, seed=17)
    labels = torch.zeros(0, dtype=torch.long)
    loss, grads = ours(hidden[:0], weight, bias, labels, smoothing=0.1)
    assert loss.item() == 0.0 and grads[0].shape == (0, 5) and torch.all(grads[1] == 0)


def test_non_contiguous_inputs():
    hidden, weight, bias, labels = make_case(20, 12, 30, seed=18)
    hidden_nc = torch.randn(12, 20).t().copy_(hidden)  # column-major storage
    weight_nc = torch.randn(12, 30).t().copy_(weight)
    assert not hidden_nc.is_contiguous() and not weight_nc.is_contiguous()
    result = ours(hidden_nc, weight_nc, bias, labels[::1], smoothing=0.1, chunk_size=6)
    assert_matches_truth(result, truth(hidden, weight, bias, labels, smoothing=0.1))


def test_int32_labels():
    hidden, weight, bias, labels = make_case(15, 6, 25, seed=19)
    result = ours(hidden, weight, bias, labels.int(), chunk_size=4)
    assert_matches_truth(result, truth(hidden, weight, bias, labels))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_backward_through_a_retained_graph_recomputes(reduction):
    """Backward normally hands over the gradient computed in forward (scaled in place); a second backward
    through a retained graph recomputes it and must give the same numbers."""
    hidden, weight, bias, labels = make_case(21, 7, 40, seed=20)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = linear_smoothed_ga_loss(leaves[0], leaves[1], labels, bias=leaves[2], reduction=reduction, chunk_size=5)
    grad_output = torch.randn(loss.shape)
    first = torch.autograd.grad(loss, leaves, grad_output, retain_graph=True)
    second = torch.autograd.grad(loss, leaves, grad_output)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0.0, rtol=0.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_float64_gradcheck(reduction, softcap):
    hidden, weight, bias, labels = make_case(7, 3, 11, dtype=torch.float64, seed=21)
    weights = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(22))
    leaves = tuple(t.clone().requires_grad_(True) for t in (hidden, weight, bias))

    def fn(h, w, b):
        return linear_smoothed_ga_loss(
            h, w, labels, bias=b, softcap=softcap, smoothing=0.1, token_weights=weights, reduction=reduction,
            chunk_size=3, backend="torch",
        )

    assert fn(*leaves).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_runs_the_gemms_in_the_autocast_dtype(reduction):
    """float32 leaves under bf16 autocast: the same numbers as casting them by hand first (F.linear's rule),
    but the float32 gradients come straight from the float32 accumulators (no bf16 round trip of dW)."""
    hidden, weight, bias, labels = make_case(20, 8, 50, seed=23)
    grad_output = torch.randn(20) if reduction == "none" else None
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    options = dict(smoothing=0.1, chunk_size=6, reduction=reduction)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_smoothed_ga_loss(leaves[0], leaves[1], labels, bias=leaves[2], **options)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    expected, expected_grads = ours(hidden, weight, bias, labels, grad_output, cast=torch.bfloat16, **options)
    torch.testing.assert_close(loss.detach(), expected, atol=0.0, rtol=0.0)
    for leaf, grad in zip(leaves, expected_grads):
        # by hand, each gradient is rounded to bf16 once more (dH before its 1 / D scaling, dW and db after it)
        assert leaf.grad.dtype == torch.float32
        torch.testing.assert_close(leaf.grad, grad, atol=2**-8 * grad.abs().max().item(), rtol=0.0)


class RecordStorages(TorchFunctionMode):
    """The distinct storages of a given shape that torch functions return while active."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.storages = shape, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            self.storages[out.untyped_storage().data_ptr()] = out.dtype
        return out


def test_autocast_float32_master_weight_has_no_extra_weight_sized_buffer():
    """Under bf16 autocast a float32 head gets its float32 gradient accumulated in place: the only [V, D] buffers
    are the bf16 cast of W (what F.linear makes too) and the float32 gradient itself (with chunks of 2 rows,
    the bf16 dW products come in vocabulary blocks of 2 * 40 // 6 = 13 rows)."""
    hidden, weight, _, labels = make_case(24, 6, 40, seed=26)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with RecordStorages((40, 6)) as record:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_smoothed_ga_loss(hidden, weight, labels, chunk_size=2, backend="torch")
        loss.backward()
    new_storages = {ptr: dtype for ptr, dtype in record.storages.items() if ptr != weight.data_ptr()}
    assert sorted(map(str, new_storages.values())) == ["torch.bfloat16", "torch.float32"], new_storages
    assert weight.grad.dtype == torch.float32 and weight.grad.data_ptr() in new_storages


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_weight_gradient_in_the_weight_dtype_when_asked(softcap):
    """accumulate_in_float32=False: no float32 [V, D] buffer, dW summed in bf16 (one rounding per chunk), still
    within a rounding per chunk of the truth; dH and the loss are the default path's, bit for bit."""
    hidden, weight, bias, labels = make_case(96, 12, 70, dtype=torch.bfloat16, seed=27)
    options = dict(softcap=softcap, smoothing=0.1, reduction="sum", chunk_size=8)
    with RecordStorages((70, 12)) as record:
        lean_loss, lean_grads = ours(hidden, weight, bias, labels, accumulate_in_float32=False, **options)
    assert torch.float32 not in record.storages.values(), record.storages  # no float32 [V, D] accumulator
    loss, grads = ours(hidden, weight, bias, labels, **options)
    _, exact_grads = truth(hidden, weight, bias, labels, **options)
    torch.testing.assert_close(lean_loss, loss, atol=0.0, rtol=0.0)
    torch.testing.assert_close(lean_grads[0], grads[0], atol=0.0, rtol=0.0)
    torch.testing.assert_close(lean_grads[2], grads[2], atol=0.0, rtol=0.0)
    assert lean_grads[1].dtype == torch.bfloat16
    chunks = 96 // 8
    scale = exact_grads[1].abs().max().item()
    assert max_error(lean_grads[1], exact_grads[1]) <= chunks * 2**-8 * scale
    assert max_error(grads[1], exact_grads[1]) <= max_error(lean_grads[1], exact_grads[1])


def test_accumulate_in_float32_must_be_a_bool_and_false_only_for_bfloat16():
    hidden, weight, _, labels = make_case(4, 3, 5, seed=28)
    with pytest.raises(TypeError, match="accumulate_in_float32"):
        linear_smoothed_ga_loss(hidden, weight, labels, accumulate_in_float32="no")
    with pytest.raises(ValueError, match="not float16"):
        linear_smoothed_ga_loss(hidden.half(), weight.half(), labels, accumulate_in_float32=False)


def test_autocast_mixed_input_dtypes_are_accepted_but_float64_is_not_cast():
    hidden, weight, _, labels = make_case(10, 4, 9, seed=29)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = linear_smoothed_ga_loss(hidden.bfloat16(), weight, labels)  # bf16 activations, fp32 head
        with pytest.raises(TypeError, match="weight dtype"):
            linear_smoothed_ga_loss(hidden, weight.double(), labels)
    torch.testing.assert_close(mixed, linear_smoothed_ga_loss(hidden.bfloat16(), weight.bfloat16(), labels))


def test_prepared_inputs_through_the_function():
    """The autograd Function is usable directly with prepared arguments (as the functional API prepares them)."""
    from sga.kernels.linear import FusedLinearConfig
    from sga.kernels.smoothed_ga import SmoothedGARowKernel

    hidden, weight, bias, labels = make_case(10, 4, 9, seed=24)
    config = FusedLinearConfig(
        row_kernel=SmoothedGARowKernel(smoothing=0.0, sign=1.0, ignore_index=-100, backend="torch"),
        ignore_index=-100,
        reduction="sum",
        backend="torch",
        softcap=None,
        logit_scale=1.0,
        chunk_rows=3,
        compute_dtype=torch.float32,
    )
    loss, _ = FusedLinearFunction.apply(hidden, weight, bias, labels, None, None, None, config)
    expected = linear_smoothed_ga_loss(hidden, weight, labels, bias=bias, ascent=False, reduction="sum")
    torch.testing.assert_close(loss, expected, **FP32_TOL)


# --------------------------------------------------------------------------------------------------------------
# bad input


def _bad_calls():
    hidden, weight, bias, labels = make_case(6, 4, 10, seed=25)
    return [
        ("hidden size", ValueError, lambda: linear_smoothed_ga_loss(hidden[:, :3], weight, labels)),
        ("bias must have shape", ValueError, lambda: linear_smoothed_ga_loss(hidden, weight, labels, bias=bias[:9])),
        ("2-D", ValueError, lambda: linear_smoothed_ga_loss(hidden, weight[0], labels)),
        ("empty vocabulary", ValueError, lambda: linear_smoothed_ga_loss(hidden, weight[:0], labels)),
        ("weight dtype", TypeError, lambda: linear_smoothed_ga_loss(hidden, weight.bfloat16(), labels)),
        ("bias dtype", TypeError, lambda: linear_smoothed_ga_loss(hidden, weight, labels, bias=bias.double())),
        ("hidden must be float", TypeError, lambda: linear_smoothed_ga_loss(hidden.int(), weight.int(), labels)),
        ("softcap", ValueError, lambda: linear_smoothed_ga_loss(hidden, weight, labels, softcap=0.0)),
        ("softcap", ValueError, lambda: linear_smoothed_ga_loss(hidden, weight, labels, softcap=-30.0)),
        ("softcap", ValueError, lambda: linear_smoothed_ga_loss(hidden, weight, labels, softcap=float("inf"))),
        ("softcap", ValueError, lambda: linear_smoothed_ga_loss(hidden, weight, labels, softcap=float("nan"))),
        ("softcap", TypeError, lambda: linear_smoothed_ga_loss(hidden, weight, labels, softcap=True)),
        ("leading shape", ValueError, lambda: linear_smoothed_ga_loss(hidden, weight, labels[:5])),
        ("labels must be int", TypeError, lambda: linear_smoothed_ga_loss(hidden, weight, labels.float())),
        ("token_weights shape", ValueError,
         lambda: linear_smoothed_ga_loss(hidden, weight, labels, token_weights=torch.ones(5))),
        ("smoothing", ValueError, lambda: linear_smoothed_ga_loss(hidden, weight, labels, smoothing=1.5)),
        ("reduction", ValueError, lambda: linear_smoothed_ga_loss(hidden, weight, labels, reduction="avg")),
        ("backend", ValueError, lambda: linear_smoothed_ga_loss(hidden, weight, labels, backend="cuda")),
        ("chunk_size", ValueError, lambda: linear_smoothed_ga_loss(hidden, weight, labels, chunk_size=0)),
        ("normalizer applies", ValueError,
         lambda: linear_smoothed_ga_loss(hidden, weight, labels, reduction="sum", normalizer=3.0)),
        ("ascent must be a bool", TypeError, lambda: linear_smoothed_ga_loss(hidden, weight, labels, ascent=1)),
        ("weight must be a torch.Tensor", TypeError, lambda: linear_smoothed_ga_loss(hidden, [[1.0]], labels)),
        ("labels must lie in", IndexError,
         lambda: linear_smoothed_ga_loss(hidden, weight, torch.full_like(labels, 10))),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_raises_before_any_work(index):
    message, error, call = _bad_calls()[index]
    with RecordOps() as record, pytest.raises(error, match=message):
        call()
    assert record.gemms() == []


# --------------------------------------------------------------------------------------------------------------
# real sizes on a GPU


@pytest.mark.cuda
@pytest.mark.parametrize(
    "num_tokens, hidden_size, vocab_size, softcap",
    [(4096, 4096, 128256, None), (2048, 2304, 256000, 30.0)],
)
def test_real_heads_bf16_on_gpu(num_tokens, hidden_size, vocab_size, softcap):
    """Llama-3 and Gemma-2 head shapes, bf16, Triton row kernel: no worse than materializing the bf16 logits."""
    torch.manual_seed(0)
    hidden, weight, _, labels = make_case(num_tokens, hidden_size, vocab_size, dtype=torch.bfloat16, bias=False,
                                          device="cuda")
    options = dict(softcap=softcap, smoothing=0.1)

    def plain(h, w, y, *, bias=None, **kwargs):
        return smoothed_ga_loss_reference(reference_logits(h, w, None, softcap).float(), y, **kwargs).float()

    (hidden[:8, :8] @ weight[:8, :8].t()).sum().item()  # cuBLAS's ~32 MiB workspace is not ours: allocate it first
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, grads = ours(hidden, weight, None, labels, **options)
    peak = torch.cuda.max_memory_allocated() - before
    # beyond the test's own clones of hidden and weight and their gradients: the float32 dW accumulator, the
    # chunk buffer (one: the smoothed-GA row kernel applies the softcap in its own sweep) and the bf16 dW
    # product of one vocabulary block (one chunk's size)
    num_buffers = 1
    chunk_bytes = default_chunk_rows(num_tokens, num_buffers) * vocab_size * 2
    budget = 4 * weight.numel() + (num_buffers + 1) * chunk_bytes + 0.02 * num_tokens * vocab_size * 2
    assert peak - 2 * (weight.numel() + hidden.numel()) * 2 <= budget
    plain_loss, plain_grads = grads_of(plain, hidden, weight, None, labels, smoothing=0.1)
    exact_loss, exact_grads = truth(hidden, weight, None, labels, **options)
    assert_no_worse_than_fp32(loss, plain_loss, exact_loss, rtol=5e-3, what="loss")
    for name, grad, plain_grad, exact_grad in zip("HW", grads, plain_grads, exact_grads):
        assert_no_worse_than_fp32(grad, plain_grad, exact_grad, rtol=5e-3, what=f"d{name}")


@pytest.mark.cuda
def test_triton_and_torch_row_kernels_agree_on_gpu():
    hidden, weight, bias, labels = make_case(3000, 512, 50000, dtype=torch.bfloat16, seed=26, device="cuda")
    results = [ours(hidden, weight, bias, labels, backend=b, smoothing=0.1, softcap=20.0) for b in ("triton", "torch")]
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-4, rtol=1e-4)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2 * b.float().abs().max().item(), rtol=0.0)
