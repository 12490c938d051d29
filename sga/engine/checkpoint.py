"""Checkpoints: written atomically, resumable exactly, and the final model in safetensors.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00000042`` holding what
``accelerate.Accelerator.save_state`` writes (model weights as safetensors, optimizer and scheduler
state, every process's RNG states; sharded correctly under FSDP and DeepSpeed), plus
``trainer_state.json`` (step, rate, run settings) and ``trainer_tensors.safetensors`` (tensors the
trainer needs, e.g. NPO's reference log-likelihoods). It is first written to a ``.tmp-`` folder and
renamed into place once complete, so a crash or a kill while saving never leaves a half-written
checkpoint under a real name.

Every checkpoint ends with ``manifest.json``: the size and SHA-256 of each file written before it. A
resume reads nothing that :func:`verify_checkpoint` has not checked against it, so a deleted, truncated
or overwritten file (``random_states_0.pkl``, ``model.safetensors``, ...) is detected; ``--resume auto``
then falls back to the newest checkpoint that verifies (:func:`latest_verified_checkpoint`, with a
warning). Checkpoints belong to one run: ``sga.engine.run_folder.check_output_dir`` refuses a fresh run into
a folder that holds another run unless asked to overwrite it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from sga.models import transformers_progress_bars

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "trainer_tensors.safetensors"
MANIFEST_FILE = "manifest.json"
_NAME = re.compile(r"^step-(\d{8})$")
_HASH_BLOCK = 1 << 22  # bytes read per hash update


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, incomplete, corrupted or of another run); one line."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _files_of(folder: Path) -> list[Path]:
    """Every file under ``folder`` except the manifest (FSDP / DeepSpeed write sub-folders), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_FILE)


def _hash_files(folder: Path, files: list[Path]) -> list[str]:
    # hashlib releases the GIL on large updates: the files of a sharded checkpoint hash in parallel
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
        return list(pool.map(_sha256, files))


def write_manifest(folder: str | os.PathLike) -> Path:
    """Record the size and SHA-256 of every file in ``folder`` in its ``manifest.json`` (written last)."""
    folder = Path(folder)
    files = _files_of(folder)
    entries = {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": digest}
        for path, digest in zip(files, _hash_files(folder, files))
    }
    target = folder / MANIFEST_FILE
    target.write_text(json.dumps({"files": entries}, indent=1), encoding="utf-8")
    return target


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming the first file of checkpoint ``path`` that is missing, has
    another size or another SHA-256 than its manifest says (sizes first: no hashing of a truncated file)."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST_FILE} (incomplete, or written by an older sga)")
    try:
        entries = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        expected = {name: (int(e["size"]), str(e["sha256"])) for name, e in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{manifest_path} is not a valid manifest ({type(err).__name__}: {err})") from None
    for required in (STATE_FILE, TENSORS_FILE):
        if required not in expected:
            raise CheckpointError(f"{manifest_path} does not list {required}")
    names = sorted(expected)
    for name in names:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if file.stat().st_size != expected[name][0]:
            raise CheckpointError(f"checkpoint file {file} has {file.stat().st_size} bytes, the manifest says {expected[name][0]}")
    for name, digest in zip(names, _hash_files(path, [path / n for n in names])):
        if digest != expected[name][1]:
            raise CheckpointError(f"checkpoint file {path / name} is corrupted (its SHA-256 differs from {MANIFEST_FILE})")


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
    """The newest complete checkpoint of a run (not verified), or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def latest_verified_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    """The newest checkpoint of a run that passes :func:`verify_checkpoint`, warning about each newer one
    that does not; None when the run has no checkpoint. Raises :class:`CheckpointError` when it has
    checkpoints but none verifies."""
    found = list_checkpoints(output_dir)
    problems = []
    for path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        for problem in problems:
            warnings.warn(f"skipping a checkpoint: {problem}; resuming from {path} instead", stacklevel=2)
        return path
    if problems:
        raise CheckpointError(
            f"no checkpoint in {checkpoint_root(output_dir)} verifies (newest: {problems[0]}): "
            "start over with --overwrite, or use another --output-dir"
        )
    return None


class _TiedWeightNotice(logging.Filter):
    """Drops accelerate's "Removed shared tensor ... This should be OK" notice: a model with tied embeddings
    (GPT-2, SmolLM2) stores the tied matrix once, and loading the checkpoint ties it again."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()  # accelerate prefixes "[RANK 0] "


@contextlib.contextmanager
def _without_tied_weight_notice() -> Iterator[None]:
    logger = logging.getLogger("accelerate.utils.other")
    notice = _TiedWeightNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


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
    with _without_tied_weight_notice():
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every process's shards are on disk before the manifest hashes them
    if accelerator.is_main_process:
        save_file({k: v.detach().contiguous().cpu() for k, v in (tensors or {}).items()}, str(tmp / TENSORS_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2), encoding="utf-8")
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state (``trainer_state.json``) of a checkpoint, read without loading anything else."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not a complete sga checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{file} holds no step number: not an sga trainer state")
    return state


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Restore model, optimizer, scheduler and RNG states from the (verified) checkpoint ``path`` into the
    prepared objects of ``accelerator``; return the trainer tensors. A state that does not fit the
    prepared model (another architecture, LoRA against full weights) is a :class:`CheckpointError`."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this model and optimizer ({first})") from None
    return load_file(str(path / TENSORS_FILE))


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
    accelerator, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], tokenizer, path: str | os.PathLike,
    *, json_files: Optional[dict[str, Any]] = None, manifest: bool = False,
) -> Path:
    """``save_pretrained`` (safetensors) of the unwrapped ``model`` with ``state_dict`` (gathered by
    ``accelerator.get_state_dict``) and its tokenizer, written to a temporary folder and renamed. A peft
    model saves its adapter only (load it with peft on top of the base model). ``json_files`` (name ->
    value) are written beside them and, with ``manifest``, a manifest.json of every file, before the rename."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        with _as_plain_model(model), transformers_progress_bars(False):  # the run's display says what happens
            model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        for name, value in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
        if manifest:
            write_manifest(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()
    return path
