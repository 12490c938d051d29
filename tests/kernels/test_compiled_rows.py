"""The torch backend's compiled chunk path (kernels/sga_kernels/compiled_rows.py) and its eager fallback.

Large CPU inputs take the compiled path; here the size threshold is lowered so that small inputs take it too.
Each (dtype, softcap, in-place) variant compiles once per process (a few seconds), so the shapes stay few.
"""
import warnings

import pytest
import torch

from kernel_oracle import assert_low_precision_rule, loss_and_grad, make_inputs, truth
from sga.kernels import compiled_rows, smoothed_ga_loss, smoothed_ga_torch

FP32_TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture
def compiled_only(monkeypatch):
    """Every input with >= 2 rows and > 4096 classes takes the compiled path, and the eager loop may not run."""
    monkeypatch.setattr(compiled_rows, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(compiled_rows, "_failure", None)

    def eager_must_not_run(*args, **kwargs):
        raise AssertionError("the eager loop ran")

    monkeypatch.setattr(smoothed_ga_torch, "_eager_forward", eager_must_not_run)


def rows_forward(logits, labels, weights, grad_buffer, softcap=None, logit_scale=1.0, grad_norm=0.25):
    return smoothed_ga_torch.rows_forward(
        logits, labels, weights, torch.tensor(grad_norm), grad_buffer, 0.1, -1.0, -100, softcap, logit_scale
    )


@pytest.mark.parametrize("softcap, logit_scale", [(None, 1.0), (None, 0.7), (5.0, 1.5)])
@pytest.mark.parametrize("in_place", [False, True])
def test_compiled_float32_matches_float64_oracle(compiled_only, softcap, logit_scale, in_place):
    logits, labels = make_inputs((13,), 5003, seed=30)
    weights = torch.randn(13, generator=torch.Generator().manual_seed(31))
    options = dict(smoothing=0.1, token_weights=weights, reduction="sum", softcap=softcap, logit_scale=logit_scale)
    exact_loss, exact_grad = truth(logits, labels, **options)
    if in_place:
        working = logits.clone()
        row_loss = rows_forward(working, labels, weights, working, softcap, logit_scale, grad_norm=1.0)
        grad = working
    else:
        grad = torch.empty_like(logits)
        row_loss = rows_forward(logits, labels, weights, grad, softcap, logit_scale, grad_norm=1.0)
    torch.testing.assert_close(row_loss.sum().double(), exact_loss, atol=1e-4, rtol=2e-5)
    torch.testing.assert_close(grad.double(), exact_grad, **FP32_TOL)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_compiled_low_precision_no_worse_than_fp32_arithmetic(compiled_only, softcap):
    logits, labels = make_inputs((3, 5), 5003, dtype=torch.bfloat16, seed=32)
    options = dict(smoothing=-0.4, reduction="mean", softcap=softcap)
    loss, grad = loss_and_grad(smoothed_ga_loss, logits, labels, backend="torch", **options)
    assert_low_precision_rule(loss, grad, logits, labels, **options)


def test_compiles_once_per_variant_across_shapes(compiled_only):
    """Dynamic shapes: new N, V and chunk sizes reuse the graph; only dtype / softcap / in-place make new ones."""
    from torch._dynamo.utils import counters

    def call(num_rows, vocab_size):
        logits, labels = make_inputs((num_rows,), vocab_size, seed=num_rows)
        rows_forward(logits, labels, None, torch.empty_like(logits))

    call(9, 5000)  # compiles (or finds) the float32 / no softcap / not in-place variant
    graphs_before = counters["stats"]["unique_graphs"]
    for num_rows, vocab_size in [(5, 4097), (64, 4099), (3, 9000), (17, 70001)]:
        call(num_rows, vocab_size)
    assert counters["stats"]["unique_graphs"] == graphs_before


def test_chunks_are_near_equal_and_never_one_row():
    for num_rows, vocab_size in [(2, 10), (3, 1 << 20), (17, 1 << 19), (1000, 32000), (1025, 128256)]:
        bounds = compiled_rows.chunk_bounds(num_rows, vocab_size)
        sizes = [stop - start for start, stop in bounds]
        assert bounds[0][0] == 0 and bounds[-1][1] == num_rows
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert min(sizes) >= 2 and max(sizes) - min(sizes) <= max(2, compiled_rows.CHUNK_ELEMENTS // vocab_size)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("fail_at_call", [0, 2])
def test_compile_failure_falls_back_to_eager_once(monkeypatch, in_place, fail_at_call):
    """A compile error (say, no C++ compiler) warns once and the eager loop finishes the rows from the failed
    chunk on, with the same result (in place too: the failed chunk was not written)."""
    monkeypatch.setattr(compiled_rows, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(compiled_rows, "CHUNK_ELEMENTS", 4 * 4500)  # 4-row chunks
    monkeypatch.setattr(compiled_rows, "_failure", None)
    logits, labels = make_inputs((23,), 4500, seed=33)
    expected_grad = torch.empty_like(logits)
    monkeypatch.setattr(compiled_rows, "ENABLED_BY_ENVIRONMENT", False)
    expected_loss = rows_forward(logits, labels, None, expected_grad, softcap=4.0)
    monkeypatch.setattr(compiled_rows, "ENABLED_BY_ENVIRONMENT", True)
    calls = []

    def flaky(capped):
        real = compiled_rows._COMPILED.get(capped) or torch.compile(compiled_rows._capped, dynamic=True)

        def run(*args):
            calls.append(1)
            if len(calls) > fail_at_call:
                raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")
            return real(*args)

        return run

    monkeypatch.setattr(compiled_rows, "compiled_chunk_function", flaky)
    working = logits.clone()
    grad = working if in_place else torch.empty_like(logits)
    with pytest.warns(RuntimeWarning, match=r"no working C\+\+ compiler found\); the torch backend runs eager"):
        loss = rows_forward(working, labels, None, grad, softcap=4.0)
    torch.testing.assert_close(loss, expected_loss, **FP32_TOL)
    torch.testing.assert_close(grad, expected_grad, **FP32_TOL)
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows_forward(logits, labels, None, torch.empty_like(logits), softcap=4.0)
    assert calls == []  # off for the rest of the process


def test_small_inputs_float64_and_small_vocabularies_stay_eager(monkeypatch):
    def compile_must_not_run(capped):
        raise AssertionError("compiled")

    monkeypatch.setattr(compiled_rows, "compiled_chunk_function", compile_must_not_run)
    logits, labels = make_inputs((40,), 5000, seed=34)
    assert logits.numel() < compiled_rows.COMPILE_MIN_ELEMENTS
    rows_forward(logits, labels, None, torch.empty_like(logits))
    monkeypatch.setattr(compiled_rows, "COMPILE_MIN_ELEMENTS", 0)
    rows_forward(logits.double(), labels, None, torch.empty_like(logits.double()))  # gradcheck dtype
    rows_forward(logits[:, :4096], labels.clamp_max(4095), None, torch.empty(40, 4096))  # small vocabulary
    rows_forward(logits[:1], labels[:1], None, torch.empty_like(logits[:1]))  # one row
    rows_forward(logits, labels, None, None)  # no gradient to write: the eager loop's loss-only passes


def test_compiled_path_inside_an_outer_torch_compile(compiled_only):
    logits, labels = make_inputs((2, 3), 4500, seed=35)

    def caller(z, y):
        return smoothed_ga_loss(z * 1.5, y, smoothing=0.1, softcap=3.0, backend="torch", validate=False)

    exact_loss, exact_grad = truth(logits * 1.5, labels, smoothing=0.1, softcap=3.0)
    loss, grad = loss_and_grad(torch.compile(caller, fullgraph=True), logits, labels)
    torch.testing.assert_close(loss.double(), exact_loss, **FP32_TOL)
    torch.testing.assert_close(grad.double(), exact_grad * 1.5, **FP32_TOL)



@pytest.mark.parametrize("in_place", [False, True])
def test_float32_without_softcap_takes_the_two_function_form(compiled_only, monkeypatch, in_place):
    """float32 logits and buffer, no softcap: e = exp(z - m) written by the first function, turned into the gradient
    by the second (one exp per element); the single-function form is not called."""
    def single_function_must_not_run(capped):
        raise AssertionError("the single-function form ran")

    monkeypatch.setattr(compiled_rows, "compiled_chunk_function", single_function_must_not_run)
    logits, labels = make_inputs((11,), 4500, seed=36)
    labels[3] = -100
    exact_loss, exact_grad = truth(logits, labels, smoothing=0.1, reduction="sum")
    working = logits.clone()
    grad = working if in_place else torch.empty_like(logits)
    row_loss = rows_forward(working, labels, None, grad, grad_norm=1.0)
    torch.testing.assert_close(row_loss.sum().double(), exact_loss, atol=1e-4, rtol=2e-5)
    torch.testing.assert_close(grad.double(), exact_grad, **FP32_TOL)


@pytest.mark.parametrize("in_place", [False, True])
def test_a_compile_failure_of_the_second_function_leaves_in_place_logits_intact(monkeypatch, in_place):
    """The two-function form compiles both functions on a dummy chunk first: when the second one fails, the first
    has overwritten only the dummy, and the eager loop computes the real chunk from the untouched logits."""
    monkeypatch.setattr(compiled_rows, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(compiled_rows, "_failure", None)
    monkeypatch.setattr(compiled_rows, "_WARMED_UP", set())
    logits, labels = make_inputs((9,), 4500, seed=37)
    monkeypatch.setattr(compiled_rows, "ENABLED_BY_ENVIRONMENT", False)
    expected_grad = torch.empty_like(logits)
    expected_loss = rows_forward(logits, labels, None, expected_grad)
    monkeypatch.setattr(compiled_rows, "ENABLED_BY_ENVIRONMENT", True)
    first, _ = compiled_rows.compiled_two_sweeps()

    def second(*args):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(compiled_rows, "compiled_two_sweeps", lambda: (first, second))
    working = logits.clone()
    grad = working if in_place else torch.empty_like(logits)
    with pytest.warns(RuntimeWarning, match=r"no working C\+\+ compiler found\); the torch backend runs eager"):
        loss = rows_forward(working, labels, None, grad)
    torch.testing.assert_close(loss, expected_loss, **FP32_TOL)
    torch.testing.assert_close(grad, expected_grad, **FP32_TOL)


def test_in_place_on_logits_that_autograd_records(compiled_only):
    """The fused linear benchmark's materialized path: logits = h @ W^T (recorded by autograd), then the loss with
    inplace_backward=True; the chunk views are written in place by both compiled functions."""
    generator = torch.Generator().manual_seed(38)
    hidden = torch.randn(6, 8, generator=generator, requires_grad=True)
    weight = torch.randn(4500, 8, generator=generator, requires_grad=True)
    labels = torch.randint(0, 4500, (6,), generator=generator)
    logits = hidden @ weight.t()
    exact_loss, exact_grad = truth(logits.detach(), labels, smoothing=0.1)  # dL/dlogits in float64
    loss = smoothed_ga_loss(logits, labels, smoothing=0.1, inplace_backward=True, backend="torch")
    loss.backward()
    torch.testing.assert_close(loss.double(), exact_loss, **FP32_TOL)
    torch.testing.assert_close(hidden.grad.double(), exact_grad @ weight.detach().double(), **FP32_TOL)
