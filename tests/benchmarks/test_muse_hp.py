"""MUSE-News and the Harry Potter completion protocol on small hand-written data and tiny models.

A tiny Llama trained to memorize the forget texts must look exposed (high VerbMem, MIA AUC 1, high
completion BLEU / ROUGE); an untrained one must not."""
import json
import math

import numpy as np
import pytest
import torch

from muse_data import FORGET_TEXTS, HOLDOUT_TEXTS, write_muse
from sga.benchmarks import (
    evaluate_harry_potter,
    evaluate_muse,
    load_muse_split,
    make_completion_pairs,
    metrics,
)
from sga.benchmarks.prompts import encode_text, encode_text_windows
from sga.models import tiny_random_model

BOOK = (
    "Mira climbed the narrow stairs of the clock tower, counting each step under her breath. "
    "At the top the great brass wheels turned slowly, and the whole room smelled of oil and dust. "
    "She pressed her ear to the cold wall and listened for the hidden bell that nobody had rung in years. "
    "Far below, the lamplighter crossed the square, and his lantern swung like a small yellow moon."
)
HELDOUT = (
    "The orchard behind the school was full of apples that autumn, and the children filled baskets every afternoon."
)




def memorize(tokenizer, texts, *, steps=200, seed=0):
    """A tiny Llama trained until it reproduces each of ``texts`` from its beginning: BOS + text + EOS,
    so a greedy continuation stops where the text ends."""
    model = tiny_random_model("llama", tokenizer, seed=seed)
    rows = [encode_text(tokenizer, text).input_ids + [tokenizer.eos_token_id] for text in texts]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item()


# ---------------------------------------------------------------------------------------------- MUSE


def test_load_muse_split(tmp_path):
    root = write_muse(tmp_path)
    assert load_muse_split("verbmem", "forget", root)[0]["prompt"] == FORGET_TEXTS[0][:40]
    assert [r["text"] for r in load_muse_split("privleak", "holdout", root)] == HOLDOUT_TEXTS
    with pytest.raises(ValueError, match="unknown MUSE subset 'books'"):
        load_muse_split("books", "forget", root)
    with pytest.raises(ValueError, match="unknown split 'retain' of MUSE subset 'verbmem'"):
        load_muse_split("verbmem", "retain", root)
    with pytest.raises(ValueError, match="not found"):
        load_muse_split("raw", "forget", root)
    (root / "knowmem" / "retain_qa.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match=r"lacks text fields \['answer'\]"):
        load_muse_split("knowmem", "retain_qa", root)


def test_evaluate_muse_on_a_random_model(tmp_path, tokenizer):
    root = write_muse(tmp_path)
    model = tiny_random_model("llama", tokenizer)
    results = evaluate_muse(model, tokenizer, root, knowmem_max_new_tokens=4, verbmem_max_new_tokens=8)
    for key in ("verbmem_f", "knowmem_f", "knowmem_r", "mia_min_k_auc"):
        assert 0.0 <= results[key] <= 1.0
    assert results["privleak"] is None

    # The AUC from an independent forward pass per text, Min-40% Prob over every scored token but the
    # last (open-unlearning's token set), and pairwise counting.
    def min_k(text):
        example = encode_text(tokenizer, text)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([example.input_ids])).logits[0].double(), -1)
        token_lp = sorted(logprobs[t - 1, i].item() for t, i in enumerate(example.input_ids[:-1]) if t > 0)
        m = max(1, math.floor(0.4 * len(token_lp)))
        return np.mean(token_lp[:m])

    members, nonmembers = [min_k(t) for t in FORGET_TEXTS], [min_k(t) for t in HOLDOUT_TEXTS]
    pairs = [(a > b) + 0.5 * (a == b) for a in members for b in nonmembers]
    assert results["mia_min_k_auc"] == pytest.approx(np.mean(pairs))

    only = evaluate_muse(model, tokenizer, root, metrics_to_run=["privleak"], retain_auc=0.5, max_samples=3)
    assert set(only) == {"mia_loss_auc", "mia_zlib_auc", "mia_min_k_auc", "mia_min_k_plus_plus_auc", "privleak",
                         "per_item", "settings"}
    assert set(only["per_item"]) == {"mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"}
    assert only["privleak"] == pytest.approx(metrics.privleak(only["mia_min_k_auc"], 0.5))


def test_memorized_forget_set_is_exposed(tmp_path, tokenizer):
    root = write_muse(tmp_path)
    model, loss = memorize(tokenizer, FORGET_TEXTS)
    assert loss < 0.05
    results = evaluate_muse(model, tokenizer, root, metrics_to_run=["verbmem_f", "privleak", "memorization"],
                            retain_auc=0.5, verbmem_max_new_tokens=64)
    assert results["verbmem_f"] > 0.9
    assert results["mia_min_k_auc"] == 1.0 and results["mia_loss_auc"] == 1.0
    assert results["exact_memorization"] > 0.9 and results["extraction_strength"] > 0.9
    assert results["privleak"] == pytest.approx(-100.0)
    random_model = tiny_random_model("llama", tokenizer)
    baseline = evaluate_muse(random_model, tokenizer, root, metrics_to_run=["verbmem_f"], verbmem_max_new_tokens=64)
    assert baseline["verbmem_f"] < 0.2


def test_evaluate_muse_rejects_bad_input(tmp_path, tokenizer):
    root = write_muse(tmp_path)
    model = tiny_random_model("llama", tokenizer)
    with pytest.raises(ValueError, match="unknown or no MUSE metrics"):
        evaluate_muse(model, tokenizer, root, metrics_to_run=["verbmem_r"])
    with pytest.raises(ValueError, match="'privleak' is not among"):
        evaluate_muse(model, tokenizer, root, metrics_to_run=["verbmem_f"], retain_auc=0.5)
    with pytest.raises(ValueError, match="retain_auc must be in"):
        evaluate_muse(model, tokenizer, root, retain_auc=1.5)
    with pytest.raises(ValueError, match="not found"):
        evaluate_muse(model, tokenizer, tmp_path / "nowhere", metrics_to_run=["knowmem_r"])


# -------------------------------------------------------------------------------------- Harry Potter


def test_make_completion_pairs(tokenizer):
    # One token per byte: 10-token prompts, 5-token continuations, 6 whole windows in 95 characters.
    text = "".join(chr(ord("a") + i % 26) for i in range(95))
    pairs = make_completion_pairs(text, tokenizer, prompt_tokens=10, continuation_tokens=5, max_pairs=None)
    expected = [(text[s : s + 10], text[s + 10 : s + 15]) for s in range(0, 90, 15)]
    assert [(p.prompt, p.continuation) for p in pairs] == expected
    spaced = make_completion_pairs(text, tokenizer, prompt_tokens=10, continuation_tokens=5, max_pairs=3)
    assert [p.prompt for p in spaced] == [pairs[0].prompt, pairs[2].prompt, pairs[5].prompt]
    with pytest.raises(ValueError, match="fewer than one window"):
        make_completion_pairs("short", tokenizer, prompt_tokens=10, continuation_tokens=5)


def test_harry_potter_protocol(tmp_path, tokenizer):
    book, heldout = tmp_path / "book.txt", tmp_path / "heldout.txt"
    book.write_text(BOOK)
    heldout.write_text(HELDOUT)
    kwargs = dict(prompt_tokens=60, continuation_tokens=30, max_pairs=None, ppl_window=40)
    pairs = make_completion_pairs(BOOK, tokenizer, prompt_tokens=60, continuation_tokens=30, max_pairs=None)
    model, loss = memorize(tokenizer, [p.prompt + p.continuation for p in pairs])
    assert loss < 0.05
    memorized = evaluate_harry_potter(model, tokenizer, book, heldout, **kwargs)
    random_model = tiny_random_model("llama", tokenizer)
    untrained = evaluate_harry_potter(random_model, tokenizer, book, heldout, **kwargs)
    assert memorized["n_pairs"] == len(pairs) == len(BOOK) // 90
    assert memorized["bleu"] > 80 and memorized["rouge_l_recall"] > 0.9
    assert untrained["bleu"] < 5 and untrained["rouge_l_recall"] < 0.2

    # Perplexity from an independent forward pass over the same 40-token windows.
    nll = []
    for window in encode_text_windows(tokenizer, HELDOUT, window=40):
        with torch.no_grad():
            logits = random_model(input_ids=torch.tensor([window.input_ids])).logits[0]
        logprobs = torch.log_softmax(logits.double(), -1)
        nll += [-logprobs[t - 1, i].item() for t, i in enumerate(window.input_ids) if t > 0]
    assert len(nll) == len(HELDOUT.encode())
    assert untrained["perplexity"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    # A random model over 260 tokens is close to uniform.
    assert 200 < untrained["perplexity"] < 330

    with pytest.raises(ValueError, match="book file not found"):
        evaluate_harry_potter(model, tokenizer, tmp_path / "missing.txt", heldout)


def test_muse_rouge_conventions_differ_only_in_the_stemmer(tmp_path, tokenizer, monkeypatch):
    import sga.benchmarks.muse as muse

    root = write_muse(tmp_path)
    # Each "generation" is the reference with every word pluralized: equal after Porter stemming only.
    def pluralized(model, tok, prompts, **kwargs):
        refs = [r["gt"] for r in load_muse_split("verbmem", "forget", root)]
        return [" ".join(word + "s" for word in ref.split()) for ref in refs[: len(prompts)]]

    monkeypatch.setattr(muse, "greedy_generate", pluralized)
    model = tiny_random_model("llama", tokenizer)
    got = {
        convention: evaluate_muse(model, tokenizer, root, metrics_to_run=["verbmem_f"], rouge_convention=convention)
        for convention in ("muse", "open-unlearning")
    }
    refs = [r["gt"] for r in load_muse_split("verbmem", "forget", root)]
    gens = pluralized(None, None, refs)
    for convention, stemmer in (("muse", False), ("open-unlearning", True)):
        expected = np.mean([s["rougeL_f1"] for s in metrics.rouge_scores(gens, refs, use_stemmer=stemmer)])
        assert got[convention]["verbmem_f"] == pytest.approx(expected)
        assert got[convention]["settings"]["rouge_convention"] == convention
    assert got["open-unlearning"]["verbmem_f"] > got["muse"]["verbmem_f"] + 0.2
    with pytest.raises(ValueError, match="rouge_convention"):
        evaluate_muse(model, tokenizer, root, rouge_convention="stemmed")


def test_muse_open_unlearning_log_and_retain_reference(tmp_path, tokenizer):
    from sga.benchmarks import openunlearning_log as oul
    from sga.benchmarks import save_results

    root = write_muse(tmp_path / "data")
    model = tiny_random_model("llama", tokenizer)
    retain = evaluate_muse(tiny_random_model("llama", tokenizer, seed=3), tokenizer, root, knowmem_max_new_tokens=2,
                           verbmem_max_new_tokens=2)
    theirs, summary = oul.write_openunlearning_logs(retain, tmp_path / "retain_logs")
    assert theirs.name == "MUSE_EVAL.json" and summary.name == "MUSE_SUMMARY.json"
    log = oul.read_openunlearning_log(theirs)
    assert set(log) == {"forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "privleak",
                        "extraction_strength", "exact_memorization", "mia_loss", "mia_zlib", "mia_min_k",
                        "mia_min_k_plus_plus"}
    assert log == json.loads(json.dumps(oul.to_openunlearning_log(retain)))
    assert log["forget_verbmem_ROUGE"]["agg_value"] == retain["verbmem_f"]
    assert len(log["extraction_strength"]["value_by_index"]) == len(FORGET_TEXTS)
    ours = save_results(retain, tmp_path / "retain.json")
    for path in (ours, theirs):
        assert oul.load_retain_reference(path).mia_min_k_auc == retain["mia_min_k_auc"]
    results = evaluate_muse(model, tokenizer, root, metrics_to_run=["privleak"],
                            retain_auc=oul.load_retain_reference(theirs).mia_min_k_auc)
    assert results["privleak"] == pytest.approx(metrics.privleak(results["mia_min_k_auc"], retain["mia_min_k_auc"]))
