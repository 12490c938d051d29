"""Prompt probes: the forget questions asked another way, with no change to the model (``PROBES``).

- ``answer_prefix`` (jailbreak ROUGE): the answer turn opens with "Sure, here is the answer:" and the model continues
  it: "Question: q\\nAnswer: Sure, here is the answer: a".
- ``paraphrased_question``: TOFU's ``paraphrased_question`` of each forget record (in ``forget01_perturbed.json``)
  instead of its question.
- ``retain_context``: the forget question joined to a retain author's question, after that question's answer, as
  Thaker et al. (arXiv 2410.02879) pair forget and retain queries: forget question i is asked with retain record
  j = i mod m of the m given, "Question: q_ret q_i\\nAnswer: a_ret a_i".

Each probe scores the same answers as the standard prompt (``sga.attacks.measure``): their probability and the ROUGE-L
of the greedy answer (what a probe extracts; no truth ratio, whose paraphrased and perturbed answers would take 7x the
scoring), and its change from the standard measurement is scored like a quantization: Q of ``sga.attacks.scores``.
"""
from __future__ import annotations

from typing import Sequence

from sga.attacks.measure import PromptStyle

PROBES = ("answer_prefix", "paraphrased_question", "retain_context")
JAILBREAK_PREFIX = "Sure, here is the answer:"


def probe_style(name: str, context: Sequence[dict] = ()) -> PromptStyle:
    """The ``PromptStyle`` of probe ``name``; ``retain_context`` needs ``context``, retain QA records."""
    if name == "answer_prefix":
        return PromptStyle(name, answer_prefix=JAILBREAK_PREFIX)
    if name == "paraphrased_question":
        return PromptStyle(name, question_key="paraphrased_question")
    if name == "retain_context":
        if not context:
            raise ValueError("the retain_context probe needs retain QA records to pair the forget questions with")
        return PromptStyle(name, pairs=tuple((r["question"], r["answer"]) for r in context))
    raise ValueError(f"unknown probe {name!r}; choose from {', '.join(PROBES)}")
