"""Sequence-level NLLs of a Hugging Face causal LM through the fused loss: the building blocks of the objectives.

For a sequence x with answer (scored) tokens y, l(x) is the token-mean NLL of the answer,
l(x) = -(1/|y|) sum_t log p_theta(y_t | x, y_<t), computed by :func:`sga.hf.causal_lm_loss` from the last hidden
state through the fused linear loss (no logits are materialized).

Forget and normal sequences of one sample go through ONE forward and ONE fused kernel call. Losses linear in the
sequence NLLs (:func:`weighted_sequence_loss`) give that call signed per-token weights c_seq / n_seq (n_seq the
sequence's answer-token count, c_seq its coefficient in L) with reduction "mean" over the normalizer N: the loss
is a scalar, so the fused loss builds the whole gradient in its forward pass (3 GEMMs per token, backward only
hands it over). The per-sequence NLLs for logging come from the per-token losses of that same call:
sum_t (c / n) l_t = c * l(x). Losses nonlinear in l(x) (npo, simnpo) need one differentiable value per sequence
(:func:`joint_sequence_nll`): their call has weights 1 / n_seq and reduction "none", and backward re-runs the
chunked pass with the sequence-level grad_output as token weights (4 GEMMs per token).

Labels are checked against the model's vocabulary once, when the run starts
(``sga.data.UnlearningData.check_labels``), so the training calls pass validate=False, and the rows that reach the
LM head's GEMMs come with the batch (``{prefix}_answer_positions``, built on the host): a training step makes no
host sync in the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from sga.benchmarks.prompts import IGNORE_INDEX, EncodedExample
from sga.data.unlearning import pad_examples
from sga.hf import causal_lm_loss


def answer_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """n_seq: the scored tokens of each row (labels [B, T]; position t predicts labels[:, t+1])."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def sequence_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    smoothing: float = 0.0,
    backend: str = "auto",
    kept_rows: Optional[torch.Tensor] = None,
    validate: bool = True,
) -> torch.Tensor:
    """l(x) of each row [B]: the token-mean (smoothed, for smoothing != 0) NLL of the scored tokens,
    differentiable. One fused kernel call with weights 1 / n_seq and reduction "none" (its backward recomputes
    the chunked pass: use :func:`weighted_sequence_loss` for losses linear in l(x)). kept_rows: as in
    ``sga.hf.causal_lm_loss``."""
    counts = answer_token_counts(labels)
    weights = _inverse_counts(counts).unsqueeze(1).expand(labels.shape)
    per_token = causal_lm_loss(
        model,
        input_ids,
        labels,
        attention_mask=attention_mask,
        token_weights=weights,
        smoothing=smoothing,
        ascent=False,
        reduction="none",
        backend=backend,
        kept_rows=kept_rows,
        validate=validate,
    )
    return per_token.sum(dim=1)


def _inverse_counts(counts: torch.Tensor) -> torch.Tensor:
    """1 / n_seq, and 0 for a sequence without scored tokens (float32, on the counts' device)."""
    return torch.where(counts > 0, 1.0 / counts.clamp(min=1).float(), torch.zeros_like(counts, dtype=torch.float32))


@dataclass
class JointRows:
    """The sequences of several prefixes as one batch: right-padded to a common width T, stacked prefix by
    prefix; ``kept_rows`` are the flattened row * T + t positions whose next label is scored (None when the
    batch carries no ``{prefix}_answer_positions``); ``sizes`` the number of rows of each prefix."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    kept_rows: Optional[torch.Tensor]
    sizes: list[int]


def joint_rows(batch: dict[str, torch.Tensor], prefixes: Sequence[str]) -> JointRows:
    """Stack the sequences under each prefix ("forget", "normal") into one :class:`JointRows` (no host sync)."""
    width = max(batch[f"{p}_input_ids"].shape[1] for p in prefixes)

    def widen(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(tensor, (0, width - tensor.shape[1]), value=value)

    sizes = [batch[f"{p}_input_ids"].shape[0] for p in prefixes]
    kept_rows = None
    if all(f"{p}_answer_positions" in batch for p in prefixes):
        offsets = [sum(sizes[:i]) for i in range(len(prefixes))]
        kept_rows = torch.cat([
            (batch[f"{p}_answer_positions"][:, 0] + offset) * width + batch[f"{p}_answer_positions"][:, 1]
            for p, offset in zip(prefixes, offsets)
        ])
    return JointRows(
        input_ids=torch.cat([widen(batch[f"{p}_input_ids"], 0) for p in prefixes]),
        labels=torch.cat([widen(batch[f"{p}_labels"], IGNORE_INDEX) for p in prefixes]),
        attention_mask=torch.cat([widen(batch[f"{p}_attention_mask"], 0) for p in prefixes]),
        kept_rows=kept_rows,
        sizes=sizes,
    )


def joint_sequence_nll(
    model, batch, prefixes: Sequence[str], *, smoothing: float, backend: str, validate: bool = True
) -> list[torch.Tensor]:
    """l(x) of the sequences under each prefix ("forget", "normal"), differentiable, all rows in one forward
    and one kernel call of reduction "none" (the recompute path of :func:`sequence_nll`)."""
    rows = joint_rows(batch, prefixes)
    nll = sequence_nll(
        model,
        rows.input_ids,
        rows.labels,
        rows.attention_mask,
        smoothing=smoothing,
        backend=backend,
        kept_rows=rows.kept_rows,
        validate=validate,
    )
    return list(torch.split(nll, rows.sizes))


def weighted_sequence_loss(
    model,
    batch: dict[str, torch.Tensor],
    coefficients: Sequence[tuple[str, float]],
    normalizer: torch.Tensor,
    *,
    smoothing: float = 0.0,
    backend: str = "auto",
    validate: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """L = (1 / normalizer) * sum_p c_p * sum_{x under prefix p} l(x), and the detached l(x) of every sequence.

    coefficients: (prefix, c_p) pairs, at least one c_p != 0. One forward and ONE fused call with per-token
    weights c_p / n_seq, reduction "mean" over the normalizer: the gradient is built in the forward pass. l(x)
    is read back from the same call's per-token losses, sum_t (c_p / n_seq) l_t = c_p l(x). A prefix with
    c_p = 0 has no gradient and nothing to read back: its l(x), for the log, comes from a separate no-grad
    call. validate=False: the labels were checked when the data was built (``UnlearningData.check_labels``).
    """
    active = [(prefix, c) for prefix, c in coefficients if c != 0.0]
    if not active:
        raise ValueError(f"at least one coefficient must be non-zero, got {list(coefficients)}")
    loss, active_nll = _linear_sequence_loss(model, batch, active, normalizer, smoothing, backend, validate)
    by_prefix = dict(zip([prefix for prefix, _ in active], active_nll))
    for prefix, c in coefficients:
        if c == 0.0:
            with torch.no_grad():
                (by_prefix[prefix],) = joint_sequence_nll(
                    model, batch, (prefix,), smoothing=smoothing, backend=backend, validate=validate
                )
    return loss, [by_prefix[prefix] for prefix, _ in coefficients]


def _linear_sequence_loss(model, batch, coefficients, normalizer, smoothing, backend, validate):
    """:func:`weighted_sequence_loss` for non-zero coefficients: the one fused call."""
    rows = joint_rows(batch, [prefix for prefix, _ in coefficients])
    device = rows.labels.device
    row_coefficient = torch.cat([
        torch.full((size,), c, dtype=torch.float32, device=device) for size, (_, c) in zip(rows.sizes, coefficients)
    ])
    row_weight = row_coefficient * _inverse_counts(answer_token_counts(rows.labels))  # c_p / n_seq
    loss, token_losses = causal_lm_loss(
        model,
        rows.input_ids,
        rows.labels,
        attention_mask=rows.attention_mask,
        token_weights=row_weight.unsqueeze(1).expand(rows.labels.shape),
        smoothing=smoothing,
        ascent=False,
        reduction="mean",
        normalizer=normalizer,
        backend=backend,
        kept_rows=rows.kept_rows,
        validate=validate,
        return_token_losses=True,
    )
    nll = token_losses.sum(dim=1) / row_coefficient  # c_p l(x) / c_p
    return loss, list(torch.split(nll, rows.sizes))


@torch.no_grad()
def examples_nll(
    model: torch.nn.Module,
    examples: Sequence[EncodedExample],
    *,
    pad_token_id: int,
    batch_size: int = 8,
    backend: str = "auto",
) -> torch.Tensor:
    """l(x) of every example under ``model`` in eval mode [n] (float32, on CPU, in input order). The
    model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        values = []
        for start in range(0, len(examples), batch_size):
            padded = pad_examples(examples[start : start + batch_size], pad_token_id, "x")
            padded = {key: value.to(device) for key, value in padded.items()}
            (nll,) = joint_sequence_nll(model, padded, ("x",), smoothing=0.0, backend=backend)
            values.append(nll.float().cpu())
        return torch.cat(values)
    finally:
        model.train(was_training)


def reference_sequence_nll(model: torch.nn.Module, examples: Sequence[EncodedExample], **kwargs) -> torch.Tensor:
    """S_ref = -log pi_ref(y|x) of every example: l(x) times its answer-token count (for ``npo``)."""
    counts = torch.tensor([sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in examples], dtype=torch.float32)
    return examples_nll(model, examples, **kwargs) * counts
