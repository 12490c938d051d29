"""The CPU path of the fused linear loss: its chunk GEMMs (kernels/sga_kernels/linear_gemms.py: the oneDNN float32 path in
vocabulary blocks and its fallback), the reused chunk workspace and the 16-bit chunk-row floor.

The oneDNN path runs only for GEMMs of at least ONEDNN_MIN_FLOPS and where the route says so; the tests lower that
threshold and force a oneDNN route with tiny blocks, so that small cases take it with several blocks, a partial last
one included. The route's measurement and cache: test_cpu_routes.py.
"""
import pytest
import torch

from sga.kernels import cpu_routes, linear_gemms, linear_smoothed_ga_loss
from sga.kernels.bounds import near_equal_bounds
from sga.kernels.linear import MIN_CHUNK_ROWS, MIN_CHUNK_ROWS_CPU_16BIT, min_chunk_rows
from test_linear_smoothed_ga import FP32_TOL, RecordOps, assert_matches_truth, make_case, ours, truth

needs_onednn = pytest.mark.skipif(not linear_gemms.onednn_works(), reason="oneDNN float32 linear unavailable")


TINY_BLOCKS = linear_gemms.GemmRoute("onednn", "onednn", "onednn", block_bytes=160)


@pytest.fixture
def onednn_calls(monkeypatch):
    """Every GEMM on oneDNN, in blocks of 40 float32 elements; returns the list of oneDNN product shapes."""
    monkeypatch.setattr(linear_gemms, "ONEDNN_MIN_FLOPS", 0)
    monkeypatch.setattr(cpu_routes, "forced_route", lambda: TINY_BLOCKS)
    calls = []
    original = linear_gemms.onednn_linear

    def recorded(x, weight, bias=None):
        out = original(x, weight, bias)
        calls.append(tuple(out.shape))
        return out

    monkeypatch.setattr(linear_gemms, "onednn_linear", recorded)
    return calls


@needs_onednn
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("softcap, logit_scale", [(None, 1.0), (None, 0.5), (4.0, 1.0)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_onednn_blocks_match_float64_oracle(onednn_calls, has_bias, softcap, logit_scale, reduction):
    """V = 97 in near-equal blocks of at most 40 // R columns (Z) and 40 // D rows (dW): every block boundary."""
    hidden, weight, bias, labels = make_case(29, 5, 97, bias=has_bias, seed=50)
    grad_output = torch.randn(29, generator=torch.Generator().manual_seed(51)) if reduction == "none" else None
    options = dict(softcap=softcap, logit_scale=logit_scale, smoothing=0.1, reduction=reduction)
    result = ours(hidden, weight, bias, labels, grad_output, chunk_size=4, backend="torch", **options)
    # Z: 10 blocks of 9-10 of at most 40 // 4 columns; dW: 13 blocks of 7-8 of at most 40 // 5 rows
    assert {(4, 9), (4, 10), (7, 5), (8, 5)} <= set(onednn_calls)
    assert (4, 5) in onednn_calls  # dH_c = G W
    assert_matches_truth(result, truth(hidden, weight, bias, labels, grad_output, **options))


@pytest.mark.parametrize("total, most", [(97, 10), (97, 97), (97, 200), (1, 1), (128256, 8192), (10, 3)])
def test_even_blocks_cover_the_range_in_near_equal_sizes(total, most):
    blocks = linear_gemms.even_blocks(total, most)
    assert blocks[0][0] == 0 and blocks[-1][1] == total
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(blocks, blocks[1:]))
    sizes = [stop - start for start, stop in blocks]
    assert len(blocks) == -(-total // most) and max(sizes) <= most and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("total, count", [(97, 10), (10, 10), (5, 1), (7, 3)])
def test_near_equal_bounds_sizes_differ_by_at_most_one(total, count):
    sizes = [stop - start for start, stop in near_equal_bounds(total, count)]
    assert len(sizes) == count and sum(sizes) == total and max(sizes) - min(sizes) <= 1


def test_near_equal_bounds_rejects_no_parts():
    with pytest.raises(ValueError, match="count must be at least 1"):
        near_equal_bounds(10, 0)


@needs_onednn
def test_onednn_gemms_equal_torch_mm(onednn_calls):
    generator = torch.Generator().manual_seed(52)
    hidden, weight = torch.randn(6, 7, generator=generator), torch.randn(53, 7, generator=generator)
    bias, grad = torch.randn(53, generator=generator), torch.randn(6, 53, generator=generator)
    logits = torch.empty(6, 53)
    linear_gemms.logits_into(logits, hidden, weight, bias, 0.3, TINY_BLOCKS)
    torch.testing.assert_close(logits, 0.3 * (hidden @ weight.t() + bias), **FP32_TOL)
    torch.testing.assert_close(linear_gemms.hidden_grad(grad, weight, TINY_BLOCKS), grad @ weight, **FP32_TOL)
    accumulator = torch.randn(53, 7, generator=generator)
    expected = accumulator + grad.t() @ hidden
    linear_gemms.accumulate_weight_grad(accumulator, grad, hidden, TINY_BLOCKS)
    torch.testing.assert_close(accumulator, expected, **FP32_TOL)
    assert onednn_calls


def test_a_failing_probe_falls_back_to_torch_mm(monkeypatch):
    """Where oneDNN's op is missing or wrong the probe says no and torch.mm computes the same loss."""
    def broken(*args, **kwargs):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(linear_gemms, "onednn_linear", broken)
    monkeypatch.setattr(linear_gemms, "_ONEDNN_WORKS", None)
    monkeypatch.setattr(linear_gemms, "ONEDNN_MIN_FLOPS", 0)
    monkeypatch.setattr(cpu_routes, "forced_route", lambda: TINY_BLOCKS)  # a route that asks for oneDNN
    assert not linear_gemms.onednn_works()
    hidden, weight, bias, labels = make_case(21, 6, 40, seed=53)
    assert_matches_truth(ours(hidden, weight, bias, labels, chunk_size=8, backend="torch", smoothing=0.1),
                         truth(hidden, weight, bias, labels, smoothing=0.1))


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_every_chunk_reuses_one_workspace(softcap):
    """The [R, V] products of all chunks are written into the same buffer (allocated once per call): a fresh
    buffer per chunk would pay its page faults every chunk on the CPU. The generic row kernel path (a row
    kernel without with_softcap) has a second, capped buffer, also reused."""
    from sga.kernels.linear import fused_linear_rows
    from sga.kernels.smoothed_ga import SmoothedGARowKernel

    hidden, weight, _, labels = make_case(40, 6, 33, bias=False, seed=54)
    weight.requires_grad_(True)
    kept = int((labels != -100).sum())
    storages = []
    original = linear_gemms.logits_into

    def recorded(out, *args):
        storages.append(out.untyped_storage().data_ptr())
        return original(out, *args)

    row_kernel = SmoothedGARowKernel(0.1, -1.0, -100, "torch")
    plain_kernel = lambda *args: row_kernel(*args)  # noqa: E731  no with_softcap: the loop caps the logits
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linear_gemms, "logits_into", recorded)
        loss = fused_linear_rows(hidden, weight, labels, row_kernel=plain_kernel, softcap=softcap, chunk_size=8)
        loss.backward()
    assert len(storages) == -(-kept // 8) > 1 and len(set(storages)) == 1
    expected = linear_smoothed_ga_loss(hidden, weight.detach(), labels, softcap=softcap, smoothing=0.1)
    torch.testing.assert_close(loss.detach(), expected, **FP32_TOL)


def test_16_bit_chunks_on_the_cpu_have_at_least_256_rows():
    """bf16 on the CPU: the default budget (600 / 16 = 38 rows) is raised to 256 rows; float32 and GPUs keep 128."""
    assert min_chunk_rows(torch.bfloat16, torch.device("cpu")) == MIN_CHUNK_ROWS_CPU_16BIT == 256
    assert min_chunk_rows(torch.float16, torch.device("cpu")) == 256
    assert min_chunk_rows(torch.float32, torch.device("cpu")) == MIN_CHUNK_ROWS == 128
    assert min_chunk_rows(torch.bfloat16, torch.device("cuda")) == 128
    hidden, weight, _, labels = make_case(600, 4, 50, bias=False, seed=55)
    for dtype, rows in ((torch.bfloat16, [256, 256, 88]), (torch.float32, [128] * 4 + [88])):
        with RecordOps() as record:
            linear_smoothed_ga_loss(hidden.to(dtype), weight.to(dtype), labels, skip_ignored=False)
        assert [shape[0] for shape in record.gemms()] == rows


def test_scaled_cast_in_row_blocks(monkeypatch):
    """dW = (a / D) * accumulator in the weight's dtype, in row blocks on the CPU (a whole-tensor mixed-dtype out=
    would first compute a float32 temporary of the accumulator's size); a partial last block included."""
    from sga.kernels import linear

    monkeypatch.setattr(linear, "CAST_BLOCK_BYTES", 3 * 7 * 4)  # blocks of 3 rows of 7 float32
    accumulator = torch.randn(10, 7, generator=torch.Generator().manual_seed(56))
    factor = torch.tensor(0.37)
    result = linear._scaled_cast(accumulator, factor, torch.bfloat16)
    assert result.dtype == torch.bfloat16
    assert torch.equal(result, (accumulator * factor).to(torch.bfloat16))


@needs_onednn
def test_onednn_blocks_take_non_contiguous_operands(onednn_calls):
    """A head stored transposed (weight a [D, V] tensor's .t()) and strided hidden states: same result."""
    generator = torch.Generator().manual_seed(57)
    weight = torch.randn(7, 53, generator=generator).t()
    hidden = torch.randn(7, 20, generator=generator).t()
    labels = torch.randint(0, 53, (20,), generator=generator)
    assert not weight.is_contiguous() and not hidden.is_contiguous()
    result = ours(hidden, weight, None, labels, chunk_size=6, smoothing=0.1)
    assert onednn_calls
    assert_matches_truth(result, truth(hidden, weight, None, labels, smoothing=0.1))
