"""The attack suite: scores from measurements computed by hand, the standard measurement equal to the TOFU
evaluation's forget metrics, every attack end to end on tiny models with its open-unlearning logs, and one-line
errors for bad input."""
import numpy as np
import pytest
import torch

from sga.attacks.measure import Measurement, measure, measurement_from_dict, measurement_to_dict
from sga.attacks.results import score_attack, write_attack_logs
from sga.attacks.suite import ATTACKS, AttackData, AttackRunner, AttackSuite, attack_models, parse_attacks
from sga.benchmarks.openunlearning_log import read_openunlearning_log
from sga.benchmarks.report import load_results
from sga.benchmarks.synthetic import write_synthetic_tofu
from sga.benchmarks.tofu import evaluate_tofu, load_tofu_split
from sga.config import ConfigError
from sga.models import tiny_random_model, tiny_tokenizer


def _measurement(prob, ratios=None, rouge=None, style="standard"):
    prob = np.asarray(prob, dtype=np.float64)
    rouge = rouge if rouge is not None else [0.0] * len(prob)
    records = [{"rougeL_recall": r, "rouge1_recall": r, "rougeL_f1": r, "input": "q", "ground_truth": "a", "generation": "g"} for r in rouge]
    return Measurement(prob, -np.log(prob), records, None if ratios is None else np.asarray(ratios, dtype=np.float64), style)


def test_relearning_score_from_hand_measurements():
    before = _measurement([0.1, 0.2, 0.3, 0.4], rouge=[0.0, 0.5, 0.5, 1.0])
    retain_before = _measurement([0.1, 0.1, 0.1, 0.1], rouge=[0.2, 0.2, 0.2, 0.2])
    # a split: questions 1 and 3 measured after relearning
    after, retain_after = _measurement([0.6, 0.8], rouge=[0.5, 1.0]), _measurement([0.2, 0.2], rouge=[0.2, 0.2])
    result = score_attack("relearn_split", "relearn", before, after, [1, 3], retain_before=retain_before, retain_after=retain_after)
    assert result.before["forget_prob"] == pytest.approx(0.3) and result.after["forget_prob"] == pytest.approx(0.7)
    assert result.deltas["forget_prob"] == pytest.approx(0.4)
    assert result.retain_before["forget_prob"] == pytest.approx(0.1) and result.retain_after["forget_prob"] == pytest.approx(0.2)
    assert result.scores["forget_prob"] == pytest.approx(1 - 0.3 / 0.5)          # |0.4 - 0.1| / (0.4 + 0.1)
    assert result.scores["forget_rouge"] == 1.0  # ROUGE moved for neither: 0 / eps, R = 1
    assert result.score == "R" and result.measured == [1, 3]
    assert result.scores["forget_quality"] is None  # no truth ratios measured


def test_quantization_and_probe_scores_and_their_forget_quality_reference():
    ratios = [0.5, 0.6, 0.7, 0.8, 0.9]
    before = _measurement([0.2] * 5, ratios=ratios)
    retain = _measurement([0.1] * 5, ratios=[2.0, 2.1, 2.2, 2.3, 2.4])
    quantized = _measurement([0.6] * 5, ratios=[2.0, 2.1, 2.2, 2.3, 2.4])
    result = score_attack("quantize_nf4", "quantize", before, quantized, range(5), retain_before=retain)
    assert result.scores["forget_prob"] == pytest.approx(1 - 0.4 / 0.8) and result.score == "Q"
    # forget quality against the untouched retain model: disjoint ratios -> low before, identical ratios -> 1 after
    assert result.before["forget_quality"] < 0.05 and result.after["forget_quality"] == pytest.approx(1.0)
    # a probe compares with the retain model under the same probe
    probed_retain = _measurement([0.1] * 5, ratios=ratios)
    probe = score_attack("probe_answer_prefix", "probe", before, _measurement([0.2] * 5, ratios=ratios), range(5),
                         retain_before=retain, retain_after=probed_retain)
    assert probe.after["forget_quality"] == pytest.approx(1.0) and probe.scores["forget_prob"] == pytest.approx(1.0)
    assert probe.retain_before["forget_quality"] == pytest.approx(1.0)  # the retain model against itself


def test_score_attack_bad_input():
    m = _measurement([0.1, 0.2])
    with pytest.raises(ValueError, match="retain_after"):
        score_attack("relearn_forget", "relearn", m, m, [0, 1], retain_before=m)
    with pytest.raises(ValueError, match="after has 2 questions, the attack measured 1"):
        score_attack("quantize_nf4", "quantize", m, m, [0], retain_before=m)
    with pytest.raises(ValueError, match="subset indices"):
        m.subset([2])


@pytest.fixture(scope="module")
def tofu(tmp_path_factory):
    return write_synthetic_tofu(tmp_path_factory.mktemp("tofu"), 4, seed=0)


def test_standard_measurement_is_the_tofu_evaluation_of_the_forget_set(tofu):
    tok = tiny_tokenizer()
    model = tiny_random_model("llama", tok, seed=2)
    retain_ratios = np.linspace(0.5, 1.5, 4).tolist()
    expected = evaluate_tofu(model, tok, tofu, "forget01", max_samples=4, batch_size=4, max_new_tokens=5,
                             retain_truth_ratios=retain_ratios, membership_inference=False)
    records = load_tofu_split("forget01_perturbed", tofu)[:4]
    found = measure(model, tok, records, max_new_tokens=5, batch_size=4)
    metrics = found.metrics(retain_ratios)
    for key in ("forget_prob", "forget_rouge", "forget_truth_ratio", "forget_quality"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-6), key
    assert found.truth_ratios.tolist() == pytest.approx(expected["forget_truth_ratios"], rel=1e-6)
    assert measurement_from_dict(measurement_to_dict(found)).metrics(retain_ratios) == metrics


def test_every_attack_end_to_end_with_logs(tofu, tmp_path):
    tok = tiny_tokenizer()
    forget = load_tofu_split("forget01_perturbed", tofu)[:4]
    related = load_tofu_split("retain_perturbed", tofu)[:3]
    suite = AttackSuite(ATTACKS, max_new_tokens=3, batch_size=8)
    runner = AttackRunner(suite, AttackData(forget, related, related), tok, work_dir=tmp_path / "work")
    model, retain = tiny_random_model("llama", tok, seed=0), tiny_random_model("llama", tok, seed=1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    results, measurements = attack_models(runner, model, retain)
    assert [r.attack for r in results] == list(ATTACKS)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # the attacks leave the model alone
    assert not any((tmp_path / "work").iterdir())  # relearning runs and quantized copies are cleaned up
    for result in results:
        assert all(s is None or 0.0 <= s <= 1.0 for s in result.scores.values())
        assert result.retain_after is not None
    split = next(r for r in results if r.attack == "relearn_split")
    assert len(split.measured) == 2
    written = write_attack_logs(split, measurements["relearn_split"], tmp_path / "logs")
    assert {p.relative_to(tmp_path / "logs").as_posix() for p in written} == {
        f"relearn_split/{state}/TOFU_{kind}.json" for state in ("before", "after", "retain_before", "retain_after") for kind in ("EVAL", "SUMMARY")
    } | {"relearn_split/ROBUSTNESS_SUMMARY.json"}
    log = read_openunlearning_log(tmp_path / "logs/relearn_split/after/TOFU_EVAL.json")
    assert len(log["forget_Q_A_Prob"]["value_by_index"]) == 2
    assert log["forget_Q_A_Prob"]["agg_value"] == pytest.approx(split.after["forget_prob"])
    assert load_results(tmp_path / "logs/relearn_split/ROBUSTNESS_SUMMARY.json")["scores"] == split.scores


def test_bad_attack_input(tofu):
    assert parse_attacks("all") == ATTACKS and parse_attacks("probe_answer_prefix, quantize_nf4") == ("probe_answer_prefix", "quantize_nf4")
    with pytest.raises(ConfigError, match="unknown or no attacks \\['melt'\\]"):
        parse_attacks("quantize_nf4,melt")
    forget = load_tofu_split("forget01_perturbed", tofu)[:2]
    with pytest.raises(ConfigError, match="relearn_related needs related records"):
        AttackSuite(("relearn_related",)).validate(AttackData(forget))
    with pytest.raises(ConfigError, match="quantize_with"):
        AttackSuite(quantize_with="gptq").validate()
    with pytest.raises(ValueError, match="lacks \\['paraphrased_answer', 'perturbed_answer'\\]"):
        AttackSuite(("quantize_nf4",)).validate(AttackData([{"question": "q", "answer": "a"}]))
