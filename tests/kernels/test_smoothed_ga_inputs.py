"""Bad input to smoothed_ga_loss: a clear error naming the problem, raised before any kernel runs."""
from unittest import mock

import pytest
import torch

from sga.kernels import SmoothedGALoss, ops, smoothed_ga_loss


def good_inputs():
    return torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(logits=torch.randint(0, 5, (2, 3, 10))), TypeError, "logits must be float"),
        (dict(logits=[[0.0]]), TypeError, "logits must be a torch.Tensor"),
        (dict(labels=torch.zeros(2, 3)), TypeError, "labels must be int32 or int64"),
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels shape"),
        (dict(logits=torch.randn(2, 3, 0), labels=torch.zeros(2, 3, dtype=torch.long)), ValueError, "V = 0"),
        (dict(logits=torch.tensor(1.0), labels=torch.tensor(0)), ValueError, "at least one dimension"),
        (dict(smoothing=1.5), ValueError, "smoothing must be <= 1"),
        (dict(smoothing=float("nan")), ValueError, "smoothing must be finite"),
        (dict(smoothing=float("-inf")), ValueError, "smoothing must be finite"),
        (dict(smoothing="0.1"), TypeError, "smoothing must be a real number"),
        (dict(token_weights=torch.ones(2, 4)), ValueError, "token_weights shape"),
        (dict(token_weights=torch.ones(2, 3, dtype=torch.long)), TypeError, "token_weights must be a float"),
        (dict(reduction="avg"), ValueError, "unknown reduction 'avg'"),
        (dict(backend="cuda"), ValueError, "unknown backend 'cuda'"),
        (dict(normalizer=-1.0), ValueError, "normalizer must be finite and >= 0"),
        (dict(normalizer=torch.ones(2)), ValueError, "0-dim tensor"),
        (dict(normalizer=3.0, reduction="sum"), ValueError, "normalizer applies to reduction='mean'"),
        (dict(ascent="yes"), TypeError, "ascent must be a bool"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_arguments_raise_before_any_kernel(change, error, message):
    logits, labels = good_inputs()
    kwargs = dict(logits=logits, labels=labels)
    kwargs.update(change)
    logits, labels = kwargs.pop("logits"), kwargs.pop("labels")
    with mock.patch.object(ops, "smoothed_ga_rows", side_effect=AssertionError("kernel ran")):
        with pytest.raises(error, match=message):
            smoothed_ga_loss(logits, labels, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad_label", [10, 11, -1, -101])
def test_out_of_range_labels_raise_index_error(backend, bad_label):
    logits, labels = good_inputs()
    labels[1, 2] = bad_label
    with pytest.raises(IndexError, match=rf"labels must lie in \[0, 10\).*\[{bad_label}\]"):
        smoothed_ga_loss(logits, labels, backend=backend)


def test_validate_false_skips_the_label_check():
    logits, labels = good_inputs()
    with mock.patch("sga.kernels.smoothed_ga.check_labels_in_range", side_effect=AssertionError("checked")):
        loss = smoothed_ga_loss(logits, labels, validate=False)
    assert torch.isfinite(loss)


def test_triton_backend_without_cuda_or_interpreter_is_refused(monkeypatch):
    """The interpreter is Triton's own setting when sga.kernels was imported (not the environment later on)."""
    from sga.kernels import triton_launch

    monkeypatch.setattr(triton_launch, "_INTERPRETED", False)
    logits, labels = good_inputs()
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        smoothed_ga_loss(logits, labels, backend="triton")


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="smoothing must be <= 1"):
        SmoothedGALoss(smoothing=2.0)
    with pytest.raises(ValueError, match="unknown reduction"):
        SmoothedGALoss(reduction="batchmean")
