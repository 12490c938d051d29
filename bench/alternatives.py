"""The loss implementations a user could pick instead of ours, each as ``loss(logits, labels)`` (logits kernel)
or ``loss(hidden, weight, labels, softcap)`` (fused linear), with the ascent sign applied outside where the
library has none. A factory returns None when its package is not importable or cannot run on the device; why is
in :func:`unavailable_reason` (the import error itself), and ``python bench/alternatives.py`` prints every
alternative's package version or import error (bench/gpu_check.sh writes it to device.txt).

The dictionaries are in the order the benchmarks run them: ``torch_compile`` last, since its first call compiles
(tens of seconds with a cold inductor cache) and must not keep the others from running inside a time limit.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from sga.kernels import smoothed_ga_loss

SMOOTHING = 0.1


def eager_logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What users write by hand: float32 logits, label-smoothed cross-entropy, the ascent sign."""
    return -F.cross_entropy(logits.float(), labels, label_smoothing=SMOOTHING)


_compiled_eager_logits_loss = torch.compile(eager_logits_loss, dynamic=True)  # one compile for all shapes


def ours(device: str) -> Callable:
    return lambda logits, labels: smoothed_ga_loss(logits, labels, smoothing=SMOOTHING, validate=False)


def ours_inplace(device: str) -> Callable:
    return lambda logits, labels: smoothed_ga_loss(
        logits, labels, smoothing=SMOOTHING, validate=False, inplace_backward=True
    )


def torch_eager(device: str) -> Callable:
    return eager_logits_loss


def torch_compile(device: str) -> Callable:
    return _compiled_eager_logits_loss


IMPORT_ERRORS: dict[str, str] = {}  # module -> the error its import raised


def _cuda_only(device: str, module: str, name: str) -> Optional[Any]:
    """module.name on CUDA when the package imports, else None (the other libraries' kernels are CUDA only); an
    import that fails, with any exception (a version mismatch can raise more than ImportError), is recorded in
    IMPORT_ERRORS."""
    if device != "cuda":
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as error:  # noqa: BLE001 - the reason is reported, not hidden
        IMPORT_ERRORS[module] = f"{type(error).__name__}: {error}"
        return None


_MODULES = {"liger": "liger_kernel.ops", "liger_fused_linear": "liger_kernel.ops",
            "cut_cross_entropy": "cut_cross_entropy"}  # fmt: skip


def unavailable_reason(implementation: str, device: str) -> str:
    """Why an implementation's factory returned None on this device (for a skip message)."""
    if implementation == "torch_linear_cross_entropy":
        return f"this torch ({torch.__version__}) has no torch.nn.functional.linear_cross_entropy"
    module = _MODULES.get(implementation)
    if device != "cuda":
        return f"{implementation} runs on CUDA only"
    if module in IMPORT_ERRORS:
        return f"import {module} failed: {IMPORT_ERRORS[module]}"
    return f"{implementation} is not available on {device}"


def liger(device: str) -> Optional[Callable]:
    """Liger-Kernel's cross-entropy Function (CUDA only; it writes its gradient into the logits in forward), from
    liger_kernel.ops (no transformers import), with the argument list of the version bench/fetch_wheels.sh pins."""
    function = _cuda_only(device, "liger_kernel.ops", "LigerCrossEntropyFunction")
    if function is None:
        return None
    # (input, target, weight, ignore_index, lse_square_scale, label_smoothing, reduction) -> (loss, z_loss, ...)
    return lambda logits, labels: -function.apply(logits, labels, None, -100, 0.0, SMOOTHING, "mean")[0]


LOGITS_IMPLEMENTATIONS = {
    "ours": ours,
    "ours_inplace": ours_inplace,
    "torch_eager": torch_eager,
    "liger": liger,
    "torch_compile": torch_compile,  # last: its first call compiles
}


def materialized_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    logits = hidden @ weight.t()
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def eager_linear_loss(hidden, weight, labels, softcap):
    """Materialized logits, upcast to float32, label-smoothed cross-entropy, the ascent sign."""
    return -F.cross_entropy(materialized_logits(hidden, weight, softcap).float(), labels, label_smoothing=SMOOTHING)


_compiled_eager_linear_loss = torch.compile(eager_linear_loss, dynamic=True)


def liger_fused_linear(device: str) -> Optional[Callable]:
    """Liger-Kernel's fused linear cross-entropy Function (CUDA only) from liger_kernel.ops, ascent sign applied
    outside."""
    function = _cuda_only(device, "liger_kernel.ops", "LigerFusedLinearCrossEntropyFunction")
    if function is None:
        return None

    def loss(hidden, weight, labels, softcap):
        # (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap)
        return -function.apply(hidden, weight, labels, None, None, -100, 0.0, SMOOTHING, "mean", softcap)[0]

    return loss


def cut_cross_entropy(device: str) -> Optional[Callable]:
    """Cut Cross-Entropy's linear_cross_entropy (CUDA only), gradient filtering off (filter_eps=None: on random
    logits the filter skips most tiles, which is not comparable). It has no label smoothing: it runs with eps = 0,
    so it does less work than the others."""
    linear_cross_entropy = _cuda_only(device, "cut_cross_entropy", "linear_cross_entropy")
    if linear_cross_entropy is None:
        return None
    return lambda hidden, weight, labels, softcap: -linear_cross_entropy(
        hidden, weight, labels, softcap=softcap, filter_eps=None
    )


def torch_linear_cross_entropy(device: str) -> Optional[Callable]:
    """PyTorch's own ``torch.nn.functional.linear_cross_entropy`` (chunked, label smoothing; torch >= 2.13), ascent
    sign applied outside; None where this torch has none. It has no softcap: the loss refuses one."""
    linear_cross_entropy = getattr(F, "linear_cross_entropy", None)
    if linear_cross_entropy is None:
        return None

    def loss(hidden, weight, labels, softcap):
        if softcap is not None:
            raise NotImplementedError("torch.nn.functional.linear_cross_entropy has no logit softcap")
        return -linear_cross_entropy(hidden, weight, labels, label_smoothing=SMOOTHING, ignore_index=-100)

    return loss


LINEAR_ALTERNATIVES = {
    "torch_eager": lambda device: eager_linear_loss,
    "torch_linear_cross_entropy": torch_linear_cross_entropy,
    "liger_fused_linear": liger_fused_linear,
    "cut_cross_entropy": cut_cross_entropy,
    "torch_compile": lambda device: _compiled_eager_linear_loss,  # last: its first call compiles
}

# the packages behind the alternatives and the engine benchmark, by import name
PACKAGES = ("torch", "triton", "transformers", "accelerate", "peft", "liger_kernel", "cut_cross_entropy")


def describe_packages() -> list[str]:
    """One line per package: its version and where it was imported from, or the error its import raised; then
    the entry points the benchmarks use (Liger's loss Functions and Llama patch, Cut Cross-Entropy's loss,
    torch's linear_cross_entropy)."""
    import importlib.metadata

    lines = []
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - the reason is the report
            lines.append(f"{name}: import failed: {type(error).__name__}: {error}")
            continue
        try:
            version = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            version = getattr(module, "__version__", "unknown version")
        lines.append(f"{name} {version} ({Path(module.__file__).parent if module.__file__ else 'namespace'})")
    entry_points = [("liger_kernel.ops", "LigerCrossEntropyFunction"),
                    ("liger_kernel.ops", "LigerFusedLinearCrossEntropyFunction"),
                    ("liger_kernel.transformers", "apply_liger_kernel_to_llama"),
                    ("cut_cross_entropy", "linear_cross_entropy"),
                    ("torch.nn.functional", "linear_cross_entropy")]  # fmt: skip
    for module, name in entry_points:
        try:
            getattr(importlib.import_module(module), name)
            lines.append(f"{module}.{name}: importable")
        except Exception as error:  # noqa: BLE001
            lines.append(f"{module}.{name}: NOT importable: {type(error).__name__}: {str(error)[:300]}")
    return lines


if __name__ == "__main__":
    print("\n".join(describe_packages()))
