"""Checkpoints: written atomically, resumable exactly, and the final model in safetensors.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00000042`` holding what
``accelerate.Accelerator.save_state`` writes (model weights as safetensors, optimizer and scheduler
state, every process's RNG states; sharded correctly under FSDP and DeepSpeed), plus
``trainer_state.json`` (step, rate, run settings) and ``trainer_tensors.safetensors`` (tensors the
trainer needs, e.g. NPO's reference log-likelihoods). It is first written to a ``.tmp-`` folder and
renamed into place once complete, so a crash or a kill while saving never leaves a half-written
checkpoint under a real name.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "trainer_tensors.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    """The folder holding a run's checkpoints."""
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    tensors: Optional[dict[str, torch.Tensor]] = None,
    *,
    keep: int = 2,
) -> Path:
    """Write the checkpoint of ``step`` atomically and keep only the ``keep`` newest. Call on every
    process (accelerate gathers sharded states); returns the checkpoint folder."""
    from safetensors.torch import save_file

    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        save_file({k: v.detach().contiguous().cpu() for k, v in (tensors or {}).items()}, str(tmp / TENSORS_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore model, optimizer, scheduler and RNG states from ``path`` into the prepared objects of
    ``accelerator``; return the trainer state and tensors."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{path} is not a complete sga checkpoint (no {STATE_FILE})")
    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    tensors = load_file(str(path / TENSORS_FILE)) if (path / TENSORS_FILE).is_file() else {}
    return state, tensors


@contextlib.contextmanager
def _as_plain_model(model: torch.nn.Module) -> Iterator[None]:
    """A model loaded from a GGUF file and dequantized on load (plain floating-point weights) still carries
    transformers' GGUF quantizer, whose ``save_pretrained`` refuses to serialize; within the block it is
    an ordinary model (no quantizer, no ``quantization_config`` in its config.json). Other models are left
    as they are."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    plain = all(p.is_floating_point() for p in model.parameters())
    if quantizer is None or str(getattr(method, "value", method)) != "gguf" or not plain or "hf_quantizer" not in vars(model):
        yield
        return
    config_entry = vars(model.config).pop("quantization_config", None)
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if config_entry is not None:
            model.config.quantization_config = config_entry


def save_final_model(
    accelerator, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], tokenizer, path: str | os.PathLike
) -> Path:
    """``save_pretrained`` (safetensors) of the unwrapped ``model`` with ``state_dict`` (gathered by
    ``accelerator.get_state_dict``) and its tokenizer, written to a temporary folder and renamed. A peft
    model saves its adapter only (load it with peft on top of the base model)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        with _as_plain_model(model):
            model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()
    return path
