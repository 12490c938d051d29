"""Which Hugging Face model families the fused loss supports, and how their logits come from the LM head.

Only architectures whose logits are exactly ``softcap(a * lm_head(last_hidden_state))`` are accepted, each checked
by the tests against the model's own loss and gradients (``VERIFIED_MODEL_TYPES``); the head must be a plain
``nn.Linear`` (no quantized, LoRA-wrapped or hooked head). Anything else raises NotImplementedError rather than
return a silently different loss; the message names the escape hatch (:func:`register_model_type`, or logits and
:func:`sga.kernels.smoothed_ga_loss`). :func:`resolve_head` turns a model into the :class:`Head` the loss needs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

from sga.hf import distributed


@dataclasses.dataclass(frozen=True)
class LogitRule:
    """How a family's logits come from its head: z = softcap(a * (h @ W^T + b)), h = ``model.get_decoder()(...)``'s
    ``last_hidden_state``, with the cap c * tanh(x / c) read from the config attribute ``softcap_attribute``
    (None: no cap, or the attribute is None) and the scale a = ``logit_scale(config)`` (None: a = 1)."""

    softcap_attribute: Optional[str] = None
    scale: Optional[Callable[[Any], float]] = None

    def softcap(self, config: Any) -> Optional[float]:
        return None if self.softcap_attribute is None else getattr(config, self.softcap_attribute, None)

    def logit_scale(self, config: Any) -> float:
        return 1.0 if self.scale is None else float(self.scale(config))


_PLAIN = LogitRule()
_FINAL_SOFTCAP = LogitRule(softcap_attribute="final_logit_softcapping")
# Granite: logits = lm_head(h) / config.logits_scaling; Cohere: logits = lm_head(h) * config.logit_scale
_DIVIDED_BY_LOGITS_SCALING = LogitRule(scale=lambda config: 1.0 / config.logits_scaling)
_TIMES_LOGIT_SCALE = LogitRule(scale=lambda config: config.logit_scale)

# model_type -> how its logits are made; every entry is checked against the model's own loss and gradients in
# tests/hf/test_causal_lm_loss.py (the first block) or tests/hf/test_model_families.py (the rest), each read from transformers'
# modeling code (the *ForCausalLM forward: logits = lm_head(last_hidden_state), then the rule's cap if any).
# llama, qwen2, qwen3, mistral, phi3: model.get_decoder() is the base model, which ends with its final norm.
# gemma, gemma2: the same; gemma2 adds config.final_logit_softcapping (tanh cap) on the logits.
# phi: the base model ends with final_layernorm; the head has a bias.
# opt: get_decoder() is model.decoder, which applies final_layer_norm and project_out itself.
# gpt2: get_decoder() is the transformer, which applies ln_f; the head is tied to the token embedding.
# gemma3_text (Gemma3ForCausalLM): final_logit_softcapping when set (None in Gemma 3's released configs); the
#   embedding scale sqrt(D) and query_pre_attn_scalar act inside the decoder, not on the logits.
# granite, granitemoe, granitemoeshared (the last two mixtures of experts): logits divided by
#   config.logits_scaling (a = 1 / logits_scaling).
# cohere, cohere2: logits multiplied by config.logit_scale (a = logit_scale).
# Mixture-of-experts families (mixtral, qwen2_moe, qwen3_moe, olmoe, phimoe, gpt_oss): a plain head; the router
#   load-balancing loss is not part of causal_lm_loss (see its docstring); fused_causal_lm_loss adds it as the
#   model does.
MODEL_FAMILIES: dict[str, LogitRule] = {
    **dict.fromkeys(("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "phi", "opt", "gpt2"), _PLAIN),
    "gemma2": _FINAL_SOFTCAP,
    "gemma3_text": _FINAL_SOFTCAP,
    **dict.fromkeys(
        (
            "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "gpt_oss",
            "olmo", "olmo2", "olmo3", "smollm3", "ministral", "starcoder2", "stablelm", "gpt_neox", "glm", "glm4",
            "helium", "exaone4", "seed_oss", "ernie4_5", "arcee", "apertus", "nemotron",
        ),
        _PLAIN,
    ),
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared"), _DIVIDED_BY_LOGITS_SCALING),
    **dict.fromkeys(("cohere", "cohere2"), _TIMES_LOGIT_SCALE),
}
VERIFIED_MODEL_TYPES = frozenset(MODEL_FAMILIES)

# model types a user declared with register_model_type (not verified by us)
_USER_FAMILIES: dict[str, LogitRule] = {}


def register_model_type(
    model_type: str, *, softcap_attribute: Optional[str] = None, logit_scale: Optional[Callable[[Any], float]] = None
) -> None:
    """Declare, on your own responsibility, that ``model_type``'s logits are ``softcap(a * lm_head(h))`` with h the
    ``last_hidden_state`` of ``model.get_decoder()``, the cap read from ``config.<softcap_attribute>`` (None: no
    cap) and a = ``logit_scale(config)`` (None: a = 1).

    This is the escape hatch for a family that is not in :data:`VERIFIED_MODEL_TYPES` (including remote-code
    models): check it first, e.g. ``causal_lm_loss(model, ids, labels, ascent=False)`` against
    ``model(ids, labels=labels).loss`` on a few batches. A family whose logits are anything else (an extra
    projection, a per-token transform) must not be registered: compute its logits and use
    :func:`sga.kernels.smoothed_ga_loss`.
    """
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type must be a non-empty string, got {model_type!r}")
    if softcap_attribute is not None and not isinstance(softcap_attribute, str):
        raise TypeError(f"softcap_attribute must be a config attribute name or None, got {softcap_attribute!r}")
    if logit_scale is not None and not callable(logit_scale):
        raise TypeError(f"logit_scale must be a function of the config or None, got {logit_scale!r}")
    _USER_FAMILIES[model_type] = LogitRule(softcap_attribute=softcap_attribute, scale=logit_scale)


@dataclasses.dataclass(frozen=True)
class Head:
    """What the fused loss needs from a model: the module producing the head's input, and the head itself.

    The logits are softcap(logit_scale * (h @ weight^T + bias)). ``sharded`` is the head module when a framework
    (FSDP2 with the head in a group of its own, ZeRO-3) holds its parameters: they are whole only inside its call,
    so the loss is computed there (:func:`_gathers_a_sharded_head`)."""

    decoder: torch.nn.Module
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float]
    logit_scale: float = 1.0
    sharded: Optional[torch.nn.Module] = None


def is_plain_linear(module: Any, framework: Optional[str] = None) -> bool:
    """An nn.Linear whose forward is nn.Linear's own, with no hooks but those of the sharding ``framework`` that
    holds its parameters (they gather and release them, and leave the output alone): its output is h @ W^T + b."""
    return (
        isinstance(module, torch.nn.Linear)
        and type(module).forward is torch.nn.Linear.forward
        and "forward" not in vars(module)
        and distributed.only_framework_hooks(module, framework)
    )


def check_whole_head(weight: torch.Tensor, vocab_size: Optional[int]) -> None:
    """Refuse a head weight that is not the whole [V, D] matrix (a shard, a placeholder) with a clear error."""
    if distributed.is_dtensor(weight):
        raise NotImplementedError(
            f"the LM head weight is a DTensor ({weight.placements}) outside any FSDP2 module's call (tensor "
            "parallelism?): the fused loss needs the whole [V, D] head; shard the model with fully_shard (FSDP2) "
            "or DeepSpeed ZeRO-3, or compute the logits and use sga.kernels.smoothed_ga_loss"
        )
    if weight.dim() != 2 or weight.numel() == 0 or (vocab_size is not None and weight.shape[0] < vocab_size):
        raise NotImplementedError(
            f"the LM head weight has shape {tuple(weight.shape)}, not the whole [vocab_size={vocab_size}, D] matrix: "
            "a shard or placeholder of a sharded model (FSDP1 / a wrapper the fused loss cannot see through). "
            "Use FSDP2 (fully_shard) or DeepSpeed ZeRO-3, whose heads are gathered, or compute the logits and use "
            "sga.kernels.smoothed_ga_loss"
        )


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def own_class(model: torch.nn.Module) -> type:
    """The model's own class: FSDP2 and DeepSpeed put classes of their own in front of it."""
    return next(c for c in type(model).__mro__ if not c.__module__.startswith(("torch.distributed.", "deepspeed.")))


_ESCAPE_HATCH = (
    "compute the logits and use sga.kernels.smoothed_ga_loss, or, once you have checked that its logits are "
    "softcap(lm_head(last_hidden_state)), declare it with sga.hf.register_model_type"
)


def logit_rule(model: torch.nn.Module) -> LogitRule:
    """The family's rule; refuses unverified types and remote-code classes that reuse a verified type's name."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _USER_FAMILIES:
        return _USER_FAMILIES[model_type]
    if model_type not in MODEL_FAMILIES:
        raise NotImplementedError(
            f"the fused causal-LM loss is verified only for model types {sorted(VERIFIED_MODEL_TYPES)}, "
            f"got {model_type!r}: {_ESCAPE_HATCH}"
        )
    own = own_class(base_model(model))
    if not own.__module__.startswith("transformers."):
        raise NotImplementedError(
            f"{own.__module__}.{own.__qualname__} is not transformers' own {model_type!r} class "
            f"(remote code?), so its verification does not apply: {_ESCAPE_HATCH}"
        )
    return MODEL_FAMILIES[model_type]


def resolve_head(model: torch.nn.Module) -> Head:
    rule = logit_rule(model)
    head = model.get_output_embeddings()
    framework = distributed.sharding_framework(head) if isinstance(head, torch.nn.Module) else None
    if not is_plain_linear(head, framework):
        raise NotImplementedError(
            f"the LM head must be a plain torch.nn.Linear without hooks (got {type(head).__module__}."
            f"{type(head).__qualname__}); a wrapped, quantized or hooked head does not compute h @ W^T + b"
        )
    if framework is None:
        check_whole_head(head.weight, getattr(model.config, "vocab_size", None))
    return Head(
        decoder=model.get_decoder(), weight=head.weight, bias=head.bias, softcap=rule.softcap(model.config),
        logit_scale=rule.logit_scale(model.config), sharded=head if framework is not None else None,
    )
