"""The fused linear loss's fast path and the engine on it: kept rows (ignored tokens never reach the GEMMs),
the pluggable row kernel, logit_scale, the per-token losses of the same pass, the chunk budget, the gradient
built in forward for the linear objectives (no GEMM in backward), and no host sync inside a training step.
"""
import contextlib
import math

import pytest
import torch

from engine_helpers import make_config, memorized_model, tokenizer, unlearning_data
from sga.config import MethodConfig
from sga.data.unlearning import UnlearningData
from sga.engine.trainer import UnlearningTrainer
from sga.kernels import linear_smoothed_ga_loss
from sga.kernels.linear import MAX_CHUNK_ROWS, default_chunk_rows, fused_linear_rows
from sga.kernels.smoothed_ga import SmoothedGARowKernel
from sga.methods import build_objective
from test_linear_smoothed_ga import FP32_TOL, RecordOps, assert_matches_truth, make_case, ours, truth


def _kept(labels, ignore_index=-100):
    return (labels.reshape(-1) != ignore_index).nonzero().squeeze(1)


# --------------------------------------------------------------------------------------------------------------
# kept rows: given, computed, opted out


@pytest.mark.parametrize("rows", ["given", "computed", "all"])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kept_rows_given_computed_or_opted_out_match_the_oracle(rows, softcap, reduction):
    hidden, weight, bias, labels = make_case(41, 9, 67, seed=31)
    options = dict(smoothing=0.1, softcap=softcap, reduction=reduction)
    extra = {"given": dict(kept_rows=_kept(labels)), "computed": {}, "all": dict(skip_ignored=False)}[rows]
    grad_output = torch.randn(41) if reduction == "none" else None
    result = ours(hidden, weight, bias, labels, grad_output, chunk_size=6, **options, **extra)
    assert_matches_truth(result, truth(hidden, weight, bias, labels, grad_output, **options))


def test_ignored_rows_never_reach_the_gemms():
    """Half the tokens ignored: every GEMM has at most the kept rows; dH is exactly 0 on ignored rows."""
    hidden, weight, bias, labels = make_case(40, 6, 33, seed=32)
    labels[::2] = -100
    kept = int((labels != -100).sum())
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    with RecordOps() as record:
        loss = linear_smoothed_ga_loss(leaves[0], leaves[1], labels, bias=leaves[2], chunk_size=8)
        loss.backward()
    logits_gemms = [shape for shape in record.gemms() if shape[1] == 33]  # [R, V] products
    assert sum(shape[0] for shape in logits_gemms) == kept
    ignored = labels == -100
    assert torch.equal(leaves[0].grad[ignored], torch.zeros(int(ignored.sum()), 6))
    exact_loss, exact_grads = truth(hidden, weight, bias, labels)
    torch.testing.assert_close(loss.detach().double(), exact_loss, **FP32_TOL)


def test_opting_out_sends_every_row_through_and_computes_no_index():
    hidden, weight, _, labels = make_case(20, 6, 33, bias=False, seed=33)
    with RecordOps() as record:
        linear_smoothed_ga_loss(hidden, weight, labels, chunk_size=20, skip_ignored=False, validate=False)
    assert record.gemms() == [(20, 33)]
    assert not any(name == "nonzero" for name, _ in record.calls)


def test_kept_rows_may_include_ignored_rows():
    """Extra rows are scored as ignored (0 loss, 0 gradient): the result is unchanged."""
    hidden, weight, bias, labels = make_case(30, 5, 21, seed=34)
    kept = torch.cat([_kept(labels), (labels == -100).nonzero().squeeze(1)[:2]])
    result = ours(hidden, weight, bias, labels, kept_rows=kept, chunk_size=7)
    assert_matches_truth(result, truth(hidden, weight, bias, labels))


@pytest.mark.parametrize(
    "make_kept, error, message",
    [
        (lambda kept: kept[1:], ValueError, "misses a token"),
        (lambda kept: torch.cat([kept, kept[:1]]), ValueError, "twice"),
        (lambda kept: torch.cat([kept[:-1], torch.tensor([30])]), IndexError, "must lie in"),
        (lambda kept: kept.float(), TypeError, "index tensor"),
        (lambda kept: kept[None], ValueError, "1-D"),
    ],
)
def test_bad_kept_rows_raise_before_any_gemm(make_kept, error, message):
    hidden, weight, bias, labels = make_case(30, 5, 21, seed=35)
    with RecordOps() as record, pytest.raises(error, match=message):
        linear_smoothed_ga_loss(hidden, weight, labels, bias=bias, kept_rows=make_kept(_kept(labels)))
    assert record.gemms() == []


# --------------------------------------------------------------------------------------------------------------
# logit_scale, per-token losses, the pluggable row kernel


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_logit_scale_matches_the_oracle(softcap):
    """z = softcap(a (h W^T + b)): the oracle on a-scaled W and b, whose gradient is a times ours."""
    hidden, weight, bias, labels = make_case(23, 7, 31, seed=36)
    scale = 0.37
    loss, (dh, dw, db) = ours(hidden, weight, bias, labels, softcap=softcap, smoothing=0.2, logit_scale=scale, chunk_size=4)
    exact_loss, (edh, edw, edb) = truth(hidden, weight * scale, bias * scale, labels, softcap=softcap, smoothing=0.2)
    torch.testing.assert_close(loss.double(), exact_loss, **FP32_TOL)
    torch.testing.assert_close(dh.double(), edh, **FP32_TOL)
    torch.testing.assert_close(dw.double(), edw * scale, **FP32_TOL)
    torch.testing.assert_close(db.double(), edb * scale, **FP32_TOL)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="logit_scale"):
            linear_smoothed_ga_loss(hidden, weight, labels, logit_scale=bad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_losses_come_from_the_same_pass(reduction):
    hidden, weight, bias, labels = make_case(3 * 11, 6, 29, seed=37)
    hidden, labels = hidden.reshape(3, 11, 6), labels.reshape(3, 11)
    weights = torch.randn(3, 11)
    options = dict(bias=bias, token_weights=weights, smoothing=0.1)
    with RecordOps() as record:
        loss, token_losses = linear_smoothed_ga_loss(
            hidden, weight, labels, reduction=reduction, return_token_losses=True, chunk_size=40, **options
        )
    assert len(record.gemms()) == 1  # one chunk, no second pass for the token losses
    per_token = linear_smoothed_ga_loss(hidden, weight, labels, reduction="none", **options)
    assert token_losses.shape == (3, 11) and not token_losses.requires_grad
    torch.testing.assert_close(token_losses, per_token, **FP32_TOL)
    assert torch.equal(token_losses[labels == -100], torch.zeros(int((labels == -100).sum())))
    expected = linear_smoothed_ga_loss(hidden, weight, labels, reduction=reduction, **options)
    torch.testing.assert_close(loss, expected, **FP32_TOL)


def test_pluggable_row_kernel():
    """A hand-written row kernel (descent cross-entropy with a focal-style weight on the row) runs through the same
    chunk loop; the result equals autograd through materialized logits."""

    def row_kernel(logits, labels, weights, write_grad):
        valid = labels != -100
        z = logits.float()
        log_p = torch.log_softmax(z, dim=-1)
        nll = -log_p.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
        coef = (torch.ones_like(nll) if weights is None else weights) * valid
        if write_grad:
            grad = log_p.exp()
            grad.scatter_add_(1, labels.clamp(min=0)[:, None], -torch.ones_like(nll)[:, None])
            logits.copy_(grad * coef[:, None])
        return coef * nll

    hidden, weight, bias, labels = make_case(26, 5, 19, seed=38)
    weights = torch.rand(26)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = fused_linear_rows(
        leaves[0], leaves[1], labels, row_kernel=row_kernel, bias=leaves[2], token_weights=weights, chunk_size=4, softcap=4.0
    )
    loss.backward()
    ref_leaves = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    logits = 4.0 * torch.tanh((ref_leaves[0] @ ref_leaves[1].t() + ref_leaves[2]) / 4.0)
    per_token = torch.nn.functional.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
    ref = (per_token * weights.double()).sum() / (labels != -100).sum()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), **FP32_TOL)
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, **FP32_TOL)


def test_linear_smoothed_ga_loss_is_fused_linear_rows_with_the_smoothed_ga_kernel():
    hidden, weight, bias, labels = make_case(17, 4, 13, seed=39)
    kernel = SmoothedGARowKernel(smoothing=0.3, sign=-1.0, ignore_index=-100, backend="torch")
    a = fused_linear_rows(hidden, weight, labels, row_kernel=kernel, bias=bias, reduction="sum")
    b = linear_smoothed_ga_loss(hidden, weight, labels, bias=bias, smoothing=0.3, reduction="sum")
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------
# chunk rows from the budget; no pass over dW for "sum"


def test_chunk_rows_from_the_budget():
    row_bytes = 1000
    assert default_chunk_rows(100000, 1, row_bytes, budget_bytes=300 * row_bytes) == 256  # multiple of 128
    assert default_chunk_rows(100000, 2, row_bytes, budget_bytes=300 * row_bytes) == 128
    assert default_chunk_rows(100000, 2, row_bytes, budget_bytes=100 * row_bytes) == 50  # under 128: as it fits
    assert default_chunk_rows(100000, 1, row_bytes, budget_bytes=10**9) == MAX_CHUNK_ROWS
    assert default_chunk_rows(50, 1, row_bytes, budget_bytes=10**9) == 50
    assert default_chunk_rows(100, 1, row_bytes, budget_bytes=1) == 1
    hidden, weight, _, labels = make_case(600, 4, 50, bias=False, seed=40)
    with RecordOps() as record:
        linear_smoothed_ga_loss(hidden, weight, labels, chunk_budget_bytes=256 * 50 * 4, skip_ignored=False)
    assert [shape[0] for shape in record.gemms()] == [256, 256, 88]
    with pytest.raises(ValueError, match="chunk_budget_bytes"):
        linear_smoothed_ga_loss(hidden, weight, labels, chunk_budget_bytes=0)


def test_sum_reduction_makes_no_pass_over_the_weight_gradient():
    """With reduction "sum" and logit_scale 1 the accumulated dW is the gradient: no multiply over [V, D], and a
    grad_output of exactly 1 on the CPU scales nothing."""
    hidden, weight, _, labels = make_case(20, 6, 33, bias=False, seed=41)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    with RecordOps() as record:
        loss = linear_smoothed_ga_loss(leaves[0], leaves[1], labels, reduction="sum", chunk_size=7)
        loss.backward()
    names = [name for name, _ in record.calls]
    assert "mul_" not in names and not any("scale_rows" in name for name in names)
    assert_matches_truth((loss.detach(), (leaves[0].grad, leaves[1].grad, None)), truth(hidden, weight, None, labels, reduction="sum"))


# --------------------------------------------------------------------------------------------------------------
# the engine: one fused call, gradient built in forward


@pytest.fixture(scope="module")
def engine():
    tok = tokenizer()
    model = memorized_model()
    data = unlearning_data(tok, num_classes=3)
    return tok, model, data, data.batch([0, 3, 5], tok.pad_token_id)


LINEAR = [
    ("ga", {}),
    ("sga", {"rate": 0.4, "num_classes": 3}),
    ("sga_gls", {"rate": 0.4, "num_classes": 3}),
    ("sga_token", {"rate": 0.3}),
    ("grad_diff", {"retain_weight": 0.7, "num_classes": 3}),
    ("sft", {}),
]


class CountPasses:
    """Counts the chunked passes of the fused linear loss (each is one GEMM sweep over the vocabulary)."""

    def __init__(self, monkeypatch):
        import sga.kernels.linear as linear

        self.count = 0
        original = linear._chunked_pass

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(linear, "_chunked_pass", counted)


@pytest.mark.parametrize("name, params", LINEAR, ids=[n for n, _ in LINEAR])
def test_linear_objectives_build_the_gradient_in_forward(engine, monkeypatch, name, params):
    """One fused call per micro-batch, and its backward runs no pass (3 GEMMs per token)."""
    _, model, _, batch = engine
    objective = build_objective(MethodConfig(name=name, **params), backend="torch")
    passes = CountPasses(monkeypatch)
    out = objective.compute(model, batch, torch.tensor(5.0))
    assert passes.count == 1
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    assert passes.count == 1


@pytest.mark.parametrize("name, params", [("npo", {"beta": 0.3}), ("simnpo", {"beta": 0.5})])
def test_nonlinear_objectives_recompute_in_backward(engine, monkeypatch, name, params):
    _, model, _, batch = engine
    batch = dict(batch, forget_reference_nll=torch.full((3,), 10.0))
    objective = build_objective(MethodConfig(name=name, **params), backend="torch")
    passes = CountPasses(monkeypatch)
    out = objective.compute(model, batch, torch.tensor(5.0))
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    assert passes.count == 2


def test_logged_nll_from_the_fused_call_equals_a_separate_evaluation(engine):
    """The per-sequence NLLs read back from the weighted call's token losses (sum_t (c / n) l_t / c) equal
    l(x) computed on their own, for negative, positive and tiny coefficients."""
    from sga.methods.sequence_nll import joint_sequence_nll, weighted_sequence_loss

    _, model, _, batch = engine
    with torch.no_grad():
        plain = joint_sequence_nll(model, batch, ("forget", "normal"), smoothing=0.0, backend="torch")
        _, read_back = weighted_sequence_loss(
            model, batch, [("forget", -0.93), ("normal", 1e-4)], torch.tensor(3.0), backend="torch"
        )
        _, with_zero = weighted_sequence_loss(model, batch, [("forget", -1.0), ("normal", 0.0)], torch.tensor(3.0))
    for got, want in zip(read_back, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_zero[1], plain[1], rtol=1e-5, atol=1e-6)


def test_labels_are_checked_once_against_the_model_vocabulary(tmp_path):
    tok = tokenizer()
    model = memorized_model()
    data = unlearning_data(tok, normal=False)
    vocab = model.lm_head.weight.shape[0]
    bad = UnlearningData([*data.forget[:-1], type(data.forget[0])(
        data.forget[-1].input_ids, [*data.forget[-1].labels[:-1], vocab], data.forget[-1].prompt_length
    )], [])
    with pytest.raises(ValueError, match=rf"forget sequence {len(data.forget) - 1} has label {vocab} outside"):
        UnlearningTrainer(model, tok, bad, make_config(tmp_path, "ga"))


# --------------------------------------------------------------------------------------------------------------
# no host sync inside a training step


class HostReads:
    """Patches the ways a tensor's value reaches the host (item, tolist, bool, int, float, numpy, nonzero) to
    raise while ``forbidden`` and not inside an :meth:`allowed` block."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "nonzero")

    def __init__(self, monkeypatch):
        self.forbidden = False
        self.depth = 0
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._guard(getattr(torch.Tensor, name), f"Tensor.{name}"))
        monkeypatch.setattr(torch, "nonzero", self._guard(torch.nonzero, "torch.nonzero"))

    def _guard(self, original, what):
        def guarded(*args, **kwargs):
            if self.forbidden and self.depth == 0:
                raise AssertionError(f"host read {what} inside a training step")
            return original(*args, **kwargs)

        return guarded

    @contextlib.contextmanager
    def allowed(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def allow_in(self, monkeypatch, owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            with self.allowed():
                return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize("method, settings", [
    ("sga", dict(rate=0.5, num_classes=3, max_grad_norm=1.0)),
    ("npo", {}),
])
def test_training_step_reads_nothing_from_the_device(tmp_path, monkeypatch, method, settings):
    """Forward and backward of every micro-batch, the accumulation of the logged statistics and the gradient
    clipping read no tensor value on the host. Allowed, each named: building the window's batches (host data),
    the step's one read of its log record at the end, the optimizer step (AdamW's step counter is a CPU tensor
    even on CUDA), transformers' own causal-mask construction (it inspects the padding mask: the model's
    code, not the loss's) and the fused loss's check of a CPU grad_output for 1 (``is_cpu_unit``: on CUDA it
    reads nothing)."""
    import transformers.models.llama.modeling_llama as llama

    import sga.kernels.linear as linear

    reads = HostReads(monkeypatch)
    for owner, name in ((UnlearningTrainer, "_window"), (UnlearningTrainer, "_step_record"),
                        (torch.optim.AdamW, "step"), (llama, "create_causal_mask"), (linear, "is_cpu_unit")):
        reads.allow_in(monkeypatch, owner, name)
    original_step = UnlearningTrainer._step

    def step(self, *args, **kwargs):
        reads.forbidden = True
        try:
            return original_step(self, *args, **kwargs)
        finally:
            reads.forbidden = False

    monkeypatch.setattr(UnlearningTrainer, "_step", step)
    tok = tokenizer()
    config = make_config(tmp_path, method, max_steps=2, batch_size=2, grad_accum=2, **settings)
    data = unlearning_data(tok, config.method.num_classes, normal=build_objective(config.method).uses_normal)
    result = UnlearningTrainer(memorized_model(), tok, data, config).train()
    assert result.status == "completed" and len(result.history) == 2


def test_the_guard_catches_a_host_read(monkeypatch):
    """The test above can fail: a nonzero over the labels (the kept-row count without kept_rows) is caught."""
    reads = HostReads(monkeypatch)
    hidden, weight, _, labels = make_case(8, 4, 11, bias=False, seed=42)
    reads.forbidden = True
    with pytest.raises(AssertionError, match="host read"):
        linear_smoothed_ga_loss(hidden, weight, labels, validate=False)
    linear_smoothed_ga_loss(hidden, weight, labels, validate=False, kept_rows=torch.arange(8))
    reads.forbidden = False


@pytest.mark.cuda
def test_training_steps_make_no_cuda_sync(tmp_path, monkeypatch):
    """A few SGA steps on CUDA under torch.cuda.set_sync_debug_mode("error"), with the same named exceptions as
    the CPU test (the first step runs before, for the one-time feature checks)."""
    import transformers.models.llama.modeling_llama as llama

    def unsynced(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return original(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(mode)

        monkeypatch.setattr(owner, name, wrapper)

    for owner, name in ((UnlearningTrainer, "_window"), (UnlearningTrainer, "_step_record"),
                        (torch.optim.AdamW, "step"), (llama, "create_causal_mask")):
        unsynced(owner, name)
    original_step = UnlearningTrainer._step
    calls = []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return original_step(self, *args, **kwargs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original_step(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(UnlearningTrainer, "_step", step)
    tok = tokenizer()
    config = make_config(tmp_path, "sga", max_steps=3, batch_size=2, grad_accum=2, rate=0.5, num_classes=3)
    config.train.backend = "auto"
    data = unlearning_data(tok, 3)
    result = UnlearningTrainer(memorized_model(), tok, data, config).train()
    assert result.status == "completed" and len(calls) == 3
    assert math.isfinite(result.history[-1]["loss"])


def test_accelerate_backward_path_gives_the_same_gradient(tmp_path, monkeypatch):
    """Where the step must go through accelerate's backward (GradScaler, DeepSpeed: it divides the loss by the
    accumulation steps), the normalizer absorbs that division: the run equals the direct loss.backward() one,
    gradient norm included."""
    def run(output_dir):
        tok = tokenizer()
        config = make_config(
            output_dir, "sga", max_steps=2, batch_size=2, grad_accum=3, rate=0.5, num_classes=3, max_grad_norm=1e6
        )
        model = memorized_model()
        result = UnlearningTrainer(model, tok, unlearning_data(tok, 3), config).train()
        return model, result

    direct_model, direct = run(tmp_path / "direct")
    monkeypatch.setattr(UnlearningTrainer, "_needs_accelerate_backward", lambda self: True)
    calls = []
    import accelerate

    original = accelerate.Accelerator.backward

    def counted(self, loss, **kwargs):
        calls.append(1)
        return original(self, loss, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "backward", counted)
    via_model, via = run(tmp_path / "via_accelerate")
    assert len(calls) == 2 * 3
    assert [h["loss"] for h in via.history] == pytest.approx([h["loss"] for h in direct.history], rel=1e-6)
    # the gradient's scale (AdamW's update would hide a wrong one): its norm, logged before clipping
    assert [h["grad_norm"] for h in via.history] == pytest.approx([h["grad_norm"] for h in direct.history], rel=1e-5)
    for (name, p), (_, q) in zip(direct_model.named_parameters(), via_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_softcap_is_fused_into_the_smoothed_ga_row_kernel(monkeypatch, backend):
    """With softcap the chunk loop hands the cap to the row kernel (one [R, V] buffer, no tanh
    passes of its own): every launch gets the softcap, and the result matches the float64 truth on both backends
    (a cap applied twice, or not at all, would not)."""
    from sga.kernels import ops

    seen = []
    original = ops.smoothed_ga_rows

    def recording(*args, **kwargs):
        seen.append(kwargs.get("softcap"))
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "smoothed_ga_rows", recording)
    torch.manual_seed(3)
    hidden = torch.randn(29, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 97, (29,))
    labels[::4] = -100
    loss = linear_smoothed_ga_loss(hidden, weight, labels, softcap=4.0, smoothing=0.1, backend=backend, chunk_size=8)
    loss.backward()
    assert seen and all(cap == 4.0 for cap in seen)
    from sga.kernels import smoothed_ga_loss_reference

    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    exact = smoothed_ga_loss_reference(4.0 * torch.tanh(h @ w.t() / 4.0), labels, smoothing=0.1)
    exact.backward()
    # the Triton kernel's tanh is a float32-accurate formula (series below |u / c| = 1 / 8), also for float64
    torch.testing.assert_close(loss, exact, rtol=1e-7, atol=0)
    torch.testing.assert_close(hidden.grad, h.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(weight.grad, w.grad, rtol=1e-6, atol=1e-9)
