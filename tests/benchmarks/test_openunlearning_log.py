"""open-unlearning's evaluation-log layout: names, round trip, retain references of both formats, the
TOFU MIA / memorization metrics on the real forget01 / holdout01 files, and `sga eval` writing and
reading the logs. The TOFU tests read the real files from ../shared/data/tofu and skip only without them."""
import json

import numpy as np
import pytest
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

from sga.benchmarks import mia, save_results
from sga.benchmarks import openunlearning_log as oul
from sga.benchmarks.prompts import encode_qa
from sga.benchmarks.scoring import token_statistics
from sga.benchmarks.tofu import evaluate_tofu, load_tofu_split
from sga.cli import DEFAULT_MIA_ATTACKS, MIA_ATTACKS, main
from sga.models import tiny_random_model, tiny_tokenizer
from tofu_data import TOFU_DIR

needs_tofu = pytest.mark.skipif(
    not (TOFU_DIR / "holdout01.json").is_file(),
    reason=f"TOFU data (with holdout01.json) not found in {TOFU_DIR} (set SGA_TOFU_DIR)",
)
# The metric names of open-unlearning's TOFU EVAL log (its configs/eval/tofu_metrics), for the default
# metrics and their pre-computed inputs plus the optional memorization and MIA metrics.
OPEN_UNLEARNING_TOFU_NAMES = {
    "forget_quality", "forget_truth_ratio", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_Q_A_PARA_Prob",
    "forget_Q_A_PERT_Prob", "model_utility", "retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
    "retain_Q_A_PARA_Prob", "retain_Q_A_PERT_Prob", "ra_Q_A_Prob", "ra_Q_A_PERT_Prob", "ra_Q_A_Prob_normalised",
    "ra_Q_A_ROUGE", "ra_Truth_Ratio", "wf_Q_A_Prob", "wf_Q_A_PERT_Prob", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE",
    "wf_Truth_Ratio", "privleak", "extraction_strength", "exact_memorization", "mia_loss", "mia_zlib", "mia_min_k",
    "mia_min_k_plus_plus", "mia_reference", "mia_gradnorm",
}
ATTACKS = ("loss", "zlib", "min_k", "min_k++")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def models(tokenizer):
    return tiny_random_model("llama", tokenizer, seed=0), tiny_random_model("llama", tokenizer, seed=1)


@pytest.fixture(scope="module")
def tofu_runs(models, tokenizer):
    """(unlearned results, retain results) on the first 4 questions of forget01 / holdout01."""
    if not (TOFU_DIR / "holdout01.json").is_file():
        pytest.skip(f"TOFU data not found in {TOFU_DIR}")
    kwargs = dict(max_samples=4, max_new_tokens=2, mia_attacks=ATTACKS)
    return tuple(evaluate_tofu(model, tokenizer, TOFU_DIR, **kwargs) for model in models)


def test_cli_attack_lists_match_the_module():
    assert MIA_ATTACKS == mia.ATTACKS and DEFAULT_MIA_ATTACKS == mia.DEFAULT_ATTACKS


@needs_tofu
def test_tofu_log_uses_open_unlearnings_names_and_layout(tofu_runs):
    results, _ = tofu_runs
    log = oul.to_openunlearning_log(results)
    names = set(log)
    assert names <= OPEN_UNLEARNING_TOFU_NAMES, names - OPEN_UNLEARNING_TOFU_NAMES
    assert names == OPEN_UNLEARNING_TOFU_NAMES - {"mia_reference", "mia_gradnorm"}
    assert list(log) == sorted(log)
    assert log["forget_quality"] == {"agg_value": None} and log["model_utility"] == {"agg_value": results["model_utility"]}
    # Per-index records, keyed "0".."n-1", with open-unlearning's fields.
    assert list(log["forget_truth_ratio"]["value_by_index"]) == ["0", "1", "2", "3"]
    assert oul.value_list(log["forget_truth_ratio"]) == pytest.approx(results["forget_truth_ratios"])
    assert log["forget_truth_ratio"]["agg_value"] == results["forget_truth_ratio"]
    first = log["forget_Q_A_Prob"]["value_by_index"]["0"]
    assert set(first) == {"prob", "avg_loss"} and first["prob"] == pytest.approx(np.exp(-first["avg_loss"]))
    assert len(log["forget_Q_A_PERT_Prob"]["value_by_index"]["0"]["prob"]) == 5  # TOFU's five perturbed answers
    assert set(log["forget_Q_A_ROUGE"]["value_by_index"]["0"]) == {
        "rouge1_recall", "rougeL_f1", "rougeL_recall", "input", "ground_truth", "generation"}
    assert log["forget_Q_A_ROUGE"]["agg_value"] == pytest.approx(np.mean(oul.value_list(log["forget_Q_A_ROUGE"], "rougeL_recall")))
    assert log["ra_Q_A_Prob_normalised"]["agg_value"] == results["real_authors_prob"]
    mink = log["mia_min_k"]
    assert set(mink) == {"agg_value", "auc", "forget", "holdout"} and mink["auc"] == results["mia_min_k_auc"]
    assert list(mink["holdout"]["value_by_index"]) == ["0", "1", "2", "3"]
    summary = oul.summarize(log, "tofu")
    assert "forget_Q_A_PARA_Prob" not in summary and "forget_quality" not in summary  # its agg_value is None
    assert summary["mia_min_k"] == results["mia_min_k_auc"] and summary["extraction_strength"] == results["extraction_strength"]


@needs_tofu
def test_round_trip_through_the_files(tofu_runs, tmp_path):
    results, _ = tofu_runs
    eval_path, summary_path = oul.write_openunlearning_logs(results, tmp_path / "logs")
    assert eval_path.name == "TOFU_EVAL.json" and summary_path.name == "TOFU_SUMMARY.json"
    read = oul.read_openunlearning_log(eval_path)
    assert read == json.loads(json.dumps(oul.to_openunlearning_log(results)))
    assert json.loads(summary_path.read_text()) == oul.summarize(read, "tofu")
    assert oul.is_openunlearning_log(read) and not oul.is_openunlearning_log(results)
    with pytest.raises(ValueError, match="not an open-unlearning evaluation log"):
        oul.read_openunlearning_log(save_results({"settings": {}, "forget_prob": 0.1}, tmp_path / "ours.json"))
    with pytest.raises(ValueError, match="per_item"):
        oul.to_openunlearning_log({"settings": {"benchmark": "tofu"}})
    with pytest.raises(ValueError, match="no open-unlearning log layout"):
        oul.to_openunlearning_log({"settings": {"benchmark": "harry-potter"}, "per_item": {}})


@needs_tofu
def test_retain_reference_from_either_format_gives_the_same_scores(tofu_runs, models, tokenizer, tmp_path):
    results, retain = tofu_runs
    ours = save_results(retain, tmp_path / "retain.json")
    theirs, _ = oul.write_openunlearning_logs(retain, tmp_path / "retain_logs")
    a, b = oul.load_retain_reference(ours), oul.load_retain_reference(theirs)
    assert (a.source_format, b.source_format) == ("sga", "open-unlearning")
    assert a.forget_split == "forget01" and b.forget_split is None
    assert a.truth_ratios == pytest.approx(b.truth_ratios) and a.mia_min_k_auc == b.mia_min_k_auc == retain["mia_min_k_auc"]
    scored = [evaluate_tofu(models[0], tokenizer, TOFU_DIR, max_samples=4, max_new_tokens=2, mia_attacks=("min_k",),
                            retain_reference=path) for path in (ours, theirs)]
    for run in scored:
        # open-unlearning's ks_test: the KS p-value of the raw truth ratios against the retain log's.
        assert run["forget_quality"] == pytest.approx(ks_2samp(results["forget_truth_ratios"], retain["forget_truth_ratios"]).pvalue)
        # open-unlearning's privleak: (1 - AUC - (1 - AUC_retain)) / (1 - AUC_retain + 1e-10) * 100.
        expected = ((1 - results["mia_min_k_auc"]) - (1 - retain["mia_min_k_auc"])) / (1 - retain["mia_min_k_auc"] + 1e-10) * 100
        assert run["privleak"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="not both"):
        evaluate_tofu(models[0], tokenizer, TOFU_DIR, max_samples=4, retain_reference=ours, retain_mia_auc=0.5)
    no_ratios = save_results({"mia_min_k": {"agg_value": 0.5}}, tmp_path / "only_mia.json")
    with pytest.raises(ValueError, match="no 'forget_truth_ratio'"):
        evaluate_tofu(models[0], tokenizer, TOFU_DIR, max_samples=4, retain_reference=no_ratios)
    with pytest.raises(ValueError, match="neither"):
        oul.load_retain_reference(save_results([1, 2], tmp_path / "list.json"))


@needs_tofu
def test_tofu_mia_and_memorization_by_hand(tofu_runs, models, tokenizer):
    results, _ = tofu_runs
    model = models[0]
    forget = [encode_qa(tokenizer, r["question"], r["answer"]) for r in load_tofu_split("forget01_perturbed", TOFU_DIR)[:4]]
    holdout = [encode_qa(tokenizer, r["question"], r["answer"]) for r in load_tofu_split("holdout01", TOFU_DIR)[:4]]
    stats_f, stats_h = token_statistics(model, forget), token_statistics(model, holdout)
    # Min-K (k = 0.4) on every labelled token but the last, loss-like; AUC with forget = 0, holdout = 1.
    def min_k(s):
        kept = np.sort(s.logprobs[:-1])
        return -kept[: max(1, int(0.4 * kept.size))].mean()

    scores = [min_k(s) for s in stats_f] + [min_k(s) for s in stats_h]
    assert results["mia_min_k_auc"] == pytest.approx(roc_auc_score([0] * 4 + [1] * 4, scores))
    losses = [-s.logprobs.mean() for s in stats_f + stats_h]
    assert results["mia_loss_auc"] == pytest.approx(roc_auc_score([0] * 4 + [1] * 4, losses))
    em = [np.mean(s.predictions[:-1] == s.labels[:-1]) for s in stats_f]
    assert results["exact_memorization"] == pytest.approx(np.mean(em))
    assert results["settings"]["holdout_split"] == "holdout01" and results["settings"]["n_questions"]["holdout"] == 4
    # The holdout split is optional: without it (or with membership_inference=False) no MIA metric.
    off = evaluate_tofu(model, tokenizer, TOFU_DIR, max_samples=2, max_new_tokens=2, membership_inference=False)
    assert "mia_min_k_auc" not in off and off["privleak"] is None and off["settings"]["holdout_split"] is None
    assert off["extraction_strength"] is not None


@needs_tofu
def test_sga_eval_writes_and_reads_open_unlearning_logs(models, tokenizer, tmp_path, capsys):
    for name, model in zip(("unlearned", "retain"), models):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    common = ["eval", "--benchmark", "tofu", "--data-dir", str(TOFU_DIR), "--max-samples", "3", "--max-new-tokens", "2",
              "--mia-attacks", "min_k,loss"]
    assert main([*common, "--model", str(tmp_path / "retain"), "--openunlearning-dir", str(tmp_path / "retain_logs")]) == 0
    retain_log = tmp_path / "retain_logs" / "TOFU_EVAL.json"
    assert (tmp_path / "retain_logs" / "TOFU_SUMMARY.json").is_file()
    assert main([*common, "--model", str(tmp_path / "unlearned"), "--retain-reference", str(retain_log),
                 "--output", str(tmp_path / "ours.json"), "--openunlearning-dir", str(tmp_path / "logs")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())
    theirs = oul.read_openunlearning_log(tmp_path / "logs" / "TOFU_EVAL.json")
    assert ours["forget_quality"] is not None and theirs["forget_quality"]["agg_value"] == ours["forget_quality"]
    assert theirs["privleak"]["agg_value"] == pytest.approx(ours["privleak"])
    assert set(theirs) >= {"mia_min_k", "mia_loss"} and "mia_zlib" not in theirs
    assert "per_item" not in capsys.readouterr().out  # the printed table leaves the per-index values out
    code = main([*common, "--model", str(tmp_path / "unlearned"), "--mia-attacks", "min-k"])
    assert code == 2 and "--mia-attacks: unknown" in capsys.readouterr().err
    code = main([*common, "--model", str(tmp_path / "unlearned"), "--mia-attacks", "reference"])
    assert code == 2 and "--reference-model" in capsys.readouterr().err
