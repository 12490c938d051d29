"""Prompt formatting: turn a question/answer pair or a text into token ids and labels.

Conventions (Hugging Face): ``labels`` is aligned with ``input_ids`` (same length, no shift), holds
-100 on every token that is not scored (the prompt, BOS, padding) and the token id elsewhere; the
shift by one happens in the loss. ``prompt_length`` is the number of leading tokens that form the
generation prompt, so ``input_ids[:prompt_length]`` is what a model is asked to continue.

QA pairs use the tokenizer's chat template when it has one (a user turn holding the question, an
assistant turn holding the answer; the scored tokens are everything the template renders after the
prompt, end-of-turn tokens included), else the plain format "Question: ...\\nAnswer: " with the
tokenizer's EOS appended to the answer. The prompt/answer boundary is found on one tokenization of the
whole text through character offsets (a fast tokenizer is required), so the answer is tokenized
exactly as it would be in running text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sga.kernels.checks import IGNORE_INDEX

QUESTION_PREFIX = "Question: "
ANSWER_PREFIX = "\nAnswer: "
FEW_SHOT_SEPARATOR = "\n\n"
# Where a plain-format generation stops: the model starting a new question (as MUSE cuts them).
PLAIN_STOP_STRINGS = ("\n\n", "\nQuestion", "Question:")


@dataclass(frozen=True)
class EncodedExample:
    """One tokenized sequence: ``input_ids``, aligned ``labels`` (-100 where not scored) and the length
    of its generation prompt."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int

    @property
    def prompt_ids(self) -> list[int]:
        """The tokens a model is asked to continue."""
        return self.input_ids[: self.prompt_length]


def resolve_chat_template(tokenizer, use_chat_template: bool | None) -> bool:
    """Whether QA prompts use the chat template: ``None`` means "when the tokenizer has one"."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if use_chat_template is None:
        return has_template
    if use_chat_template and not has_template:
        raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
    return bool(use_chat_template)


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "a fast tokenizer (PreTrainedTokenizerFast) is required: prompt/answer boundaries are found "
            "through character offsets"
        )


def _split_at(
    tokenizer, prompt_text: str, full_text: str, *, add_special_tokens: bool, append_eos: bool
) -> EncodedExample:
    """Tokenize ``full_text`` once; tokens ending after ``len(prompt_text)`` characters are scored."""
    _require_fast(tokenizer)
    if not full_text.startswith(prompt_text):
        raise ValueError("the prompt text is not a prefix of the full text")
    encoding = tokenizer(full_text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    boundary = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt_text)), len(ids))
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id to end the answer with")
        ids.append(tokenizer.eos_token_id)
    if boundary == len(ids):
        raise ValueError(f"nothing to score after the prompt in {full_text!r}")
    if boundary == 0:
        raise ValueError(f"empty prompt in {full_text!r}: the first token cannot be scored")
    labels = [IGNORE_INDEX] * boundary + ids[boundary:]
    return EncodedExample(input_ids=ids, labels=labels, prompt_length=boundary)


def encode_qa(
    tokenizer,
    question: str,
    answer: str,
    *,
    few_shot: Sequence[tuple[str, str]] = (),
    use_chat_template: bool | None = None,
    answer_prefix: str = "",
) -> EncodedExample:
    """Encode a question and its answer; only the answer tokens are labelled.

    ``few_shot`` holds in-context (question, answer) examples placed before the question: earlier turns
    of the conversation with a chat template, "Question: q\\nAnswer: a\\n\\n" blocks without one.
    ``answer_prefix`` opens the answer turn and belongs to the prompt (unscored, and what a generation
    continues): "Question: q\\nAnswer: <prefix> a" (a space joins a prefix and the answer).
    """
    if not answer.strip():
        raise ValueError(f"empty answer for question {question!r}")
    lead = f"{answer_prefix} " if answer_prefix and not answer_prefix.endswith(" ") else answer_prefix
    if resolve_chat_template(tokenizer, use_chat_template):
        messages = []
        for shot_q, shot_a in few_shot:
            messages += [{"role": "user", "content": shot_q}, {"role": "assistant", "content": shot_a}]
        messages.append({"role": "user", "content": question})
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_text += lead
        full_text = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": lead + answer}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise ValueError(
                "the chat template does not render the prompt as a prefix of the full conversation; "
                "pass use_chat_template=False"
            )
        return _split_at(tokenizer, prompt_text, full_text, add_special_tokens=False, append_eos=False)
    shots = "".join(f"{QUESTION_PREFIX}{q}{ANSWER_PREFIX}{a}{FEW_SHOT_SEPARATOR}" for q, a in few_shot)
    prompt_text = f"{shots}{QUESTION_PREFIX}{question}{ANSWER_PREFIX}{lead}"
    return _split_at(tokenizer, prompt_text, prompt_text + answer, add_special_tokens=True, append_eos=True)


def encode_continuation(tokenizer, prefix: str, continuation: str) -> EncodedExample:
    """Encode raw text (no template): ``prefix`` is the prompt, ``continuation`` the scored part."""
    if not prefix or not continuation:
        raise ValueError("prefix and continuation must both be non-empty")
    return _split_at(tokenizer, prefix, prefix + continuation, add_special_tokens=True, append_eos=False)


def _text_example(ids: list[int]) -> EncodedExample:
    # Every token but the first is scored; the first (BOS when the tokenizer adds one) has no context.
    return EncodedExample(input_ids=ids, labels=[IGNORE_INDEX] + ids[1:], prompt_length=1)


def encode_text(tokenizer, text: str, *, max_length: int | None = None) -> EncodedExample:
    """Encode a whole text for likelihood scoring, truncated to ``max_length`` tokens (BOS included)."""
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    truncate = max_length is not None
    ids = tokenizer(text, add_special_tokens=True, truncation=truncate, max_length=max_length)["input_ids"]
    if len(ids) < 2:
        raise ValueError(f"text too short to score: {text!r}")
    return _text_example(list(ids))


def encode_text_windows(tokenizer, text: str, *, window: int) -> list[EncodedExample]:
    """Split a long text into consecutive windows of ``window`` text tokens (each preceded by BOS when the
    tokenizer uses one) for perplexity. Every text token is scored once, except the first token of each
    window when the tokenizer has no BOS (it has no context)."""
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    windows = [_text_example(bos + ids[start : start + window]) for start in range(0, len(ids), window)]
    windows = [w for w in windows if len(w.input_ids) >= 2]
    if not windows:
        raise ValueError("text too short to score")
    return windows


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
