"""Quantization attacks (Zhang et al., arXiv 2410.16454): reload an unlearned model in 4-bit or 8-bit through
bitsandbytes and measure the forget set again. Unlearning moves weights by small steps; rounding to a coarse
grid can undo them.

Two ways to the same 4-bit weights (``QUANTIZATIONS``: "nf4" and "int8"):

- :func:`load_quantized`: what a deployer does: ``from_pretrained`` of the model folder with transformers'
  ``BitsAndBytesConfig`` (4-bit: NF4, blocksize 64, fp32 compute, no double quantization; 8-bit: LLM.int8 with its
  default outlier threshold 6.0, which also rounds the activations of every linear layer, in fp16). Every
  ``nn.Linear`` but the LM head is replaced (transformers keeps the output layer, and with it tied embeddings, in
  full precision).
- :func:`fake_quantized`: a copy whose same linear weights are rounded through bitsandbytes' own functional
  round trip (:func:`quantize_dequantize`) and kept in fp32: the rounding of the weights alone.

For NF4 the two give the same logits to the bit on CPU (bitsandbytes' CPU backend dequantizes to the compute
dtype and multiplies in fp32; checked in tests/attacks). Both run on an x86-64 CPU with AVX2 and no AVX-512 with
bitsandbytes 0.50.2, the version checked. It is imported only here (``pip install 'sga[robustness]'``).

The rounding, per block of 64 consecutive weights w_1..w_64 (NF4) or per output row (int8):

    NF4:   w' = absmax * c[argmin_k |w / absmax - c_k|],  absmax = max_i |w_i|, c the 16 NF4 levels
    int8:  w' = round(127 * w / absmax_row) * absmax_row / 127
"""
from __future__ import annotations

import copy
import importlib.util
import os
from typing import Optional

import torch

QUANTIZATIONS = ("nf4", "int8")
NF4_BLOCKSIZE = 64


def bitsandbytes_installed() -> bool:
    """Whether bitsandbytes can be imported (checked before an attack suite runs, without importing it)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def _bitsandbytes():
    try:
        from bitsandbytes import functional
    except ImportError:
        raise ValueError("the quantization attack needs bitsandbytes: pip install 'sga[robustness]' (or bitsandbytes)") from None
    return functional


def check_quantization(name: str) -> str:
    """``name`` if it is one of ``QUANTIZATIONS``, else a one-line ValueError."""
    if name not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {name!r}; choose from {', '.join(QUANTIZATIONS)}")
    return name


def quantize_dequantize(weight: torch.Tensor, quantization: str) -> torch.Tensor:
    """``weight`` rounded as bitsandbytes stores it (module docstring), back in ``weight``'s dtype: NF4 with
    blocksize 64 (``quantize_4bit`` / ``dequantize_4bit``), or row-wise int8 (``int8_vectorwise_quant`` /
    ``int8_vectorwise_dequant``, no outlier columns)."""
    functional = _bitsandbytes()
    check_quantization(quantization)
    if weight.dim() != 2:
        raise ValueError(f"quantize_dequantize takes a 2-D weight matrix, got shape {tuple(weight.shape)}")
    data = weight.detach()
    if quantization == "nf4":
        packed, state = functional.quantize_4bit(data, blocksize=NF4_BLOCKSIZE, quant_type="nf4")
        return functional.dequantize_4bit(packed, state).to(weight.dtype)
    rows, stats, _ = functional.int8_vectorwise_quant(data.to(torch.float16))
    return functional.int8_vectorwise_dequant(rows, stats).to(weight.dtype)


def _quantized_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers bitsandbytes quantizes on load: every ``nn.Linear`` but the output embeddings."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and module is not head]


def fake_quantized(model: torch.nn.Module, quantization: str) -> torch.nn.Module:
    """A copy of ``model`` whose linear weights (all but the LM head) went through :func:`quantize_dequantize`."""
    check_quantization(quantization)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for _, module in _quantized_linears(rounded):
            module.weight.copy_(quantize_dequantize(module.weight, quantization))
    return rounded.eval()


def bitsandbytes_config(quantization: str):
    """transformers' ``BitsAndBytesConfig`` of ``quantization`` (module docstring)."""
    _bitsandbytes()
    from transformers import BitsAndBytesConfig

    if check_quantization(quantization) == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=False,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_quantized(path: str | os.PathLike, quantization: str, *, device: Optional[str] = None):
    """The model in folder ``path`` loaded quantized by bitsandbytes (module docstring), in eval mode, on ``device``
    (default: the GPU when there is one, else the CPU)."""
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        os.fspath(path), quantization_config=bitsandbytes_config(quantization), device_map=device, dtype=torch.float32,
    )
    return model.eval()
