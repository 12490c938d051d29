"""Ranking studies of one protocol: ranks and SGA's place among the baselines computed by hand on crafted rows, the
durability composite, and the refusals to rank studies of different protocols or targets."""
from pathlib import Path

import pytest

from sga.config import ConfigError
from sga.experiments.ranking import StudyRecords, format_ranking, load_study, rank_studies
from sga.experiments.study_config import QUICK_CONFIG, config_from_dict, load_study_config


def _config(grid, attacks=("relearn_forget", "quantize_nf4")):
    config = load_study_config(QUICK_CONFIG)
    data = {**config.to_dict(), "grid": grid, "seeds": [0, 1]}
    labels = [s.label for s in config_from_dict(data).settings()]
    data["robustness"] = {**config.robustness_dict(), "settings": labels, "points": ["final"], "attacks": list(attacks)}
    return config_from_dict(data).validate()


def _rows(config, label, method, finals):
    """A target row and, per seed, a two-step trajectory whose last row has the given metrics."""
    steps = config.eval_steps(config.data.forget_questions)
    target = {"run": "target", "label": "target", "seed": None, "step": 0, "model_utility": 0.5, "forget_quality": 0.01,
              "privleak": -90.0, "forget_truth_ratios": [0.1, 0.2]}
    rows = [target]
    for seed, (fq, mu, leak) in enumerate(finals):
        for step in steps:
            last = step == steps[-1]
            rows.append({"run": f"{label}/seed{seed}", "label": label, "method": {"name": method}, "seed": seed, "step": step,
                         "forget_quality": fq if last else 0.02, "model_utility": mu if last else 0.5, "privleak": leak if last else -80.0})
    return rows


def _attacks(label, scores):
    """Robustness rows of the final models: per seed, the forget P and ROUGE-L scores of each attack."""
    return [{"run": f"{label}/seed{seed}", "point": "final", "attack": attack, "scores": {"forget_prob": s, "forget_rouge": s}}
            for seed, per_attack in enumerate(scores) for attack, s in per_attack.items()]


def test_ranks_by_hand():
    default = _config([{"method": "ga"}, {"method": "sga", "num_classes": 2, "rate": 0.2}])
    extension = _config([{"method": "npo"}], attacks=("relearn_forget",))
    rows = _rows(default, "ga", "ga", [(0.1, 0.0, 100.0), (0.3, 0.0, 120.0)]) + _rows(default, "sga_K2_r0.2", "sga", [(0.2, 0.3, 10.0), (0.2, 0.2, -30.0)])[1:]
    studies = [
        StudyRecords(Path("a"), default, rows, _attacks("ga", [{"relearn_forget": 0.2, "quantize_nf4": 1.0}] * 2)
                     + _attacks("sga_K2_r0.2", [{"relearn_forget": 0.6, "quantize_nf4": 0.0}, {"relearn_forget": 0.8, "quantize_nf4": 0.0}])),
        StudyRecords(Path("b"), extension, _rows(extension, "npo", "npo", [(0.5, 0.1, 200.0), (0.7, 0.1, 220.0)]),
                     _attacks("npo", [{"relearn_forget": 0.1}, {"relearn_forget": 0.3}])),
    ]
    ranking = rank_studies(studies)
    assert ranking["durability_attacks"] == ["relearn_forget"]  # the attacks every study has rows for
    assert ranking["baselines"] == ["ga", "npo"]
    settings = ranking["settings"]
    assert settings["ga"]["final"]["forget_quality"]["mean"] == pytest.approx(0.2)
    assert settings["sga_K2_r0.2"]["final"]["durability"]["mean"] == pytest.approx(0.7)  # mean of 0.6 and 0.8
    assert settings["npo"]["final"]["durability"]["std"] == pytest.approx(0.14142136)
    overall = ranking["ranks"]["final"]["overall"]
    assert overall["forget_quality"] == {"npo": 1, "ga": 2, "sga_K2_r0.2": 2}  # 0.6 > 0.2 = 0.2: ties share a rank
    assert overall["model_utility"] == {"sga_K2_r0.2": 1, "npo": 2, "ga": 3}
    assert overall["privleak"] == {"sga_K2_r0.2": 1, "ga": 2, "npo": 3}   # |-10| < 110 < 210
    assert overall["durability"] == {"sga_K2_r0.2": 1, "npo": 2, "ga": 2}
    assert ranking["ranks"]["final"]["sga_among_baselines"] == {
        "sga_K2_r0.2": {"forget_quality": 2, "model_utility": 1, "privleak": 1, "durability": 1}}
    markdown = format_ranking(ranking)
    assert "| sga_K2_r0.2 | 1 | 1 | 1 | 1 |" not in markdown and "| sga_K2_r0.2 | 2 | 1 | 1 | 1 |" in markdown


def test_studies_of_another_protocol_or_target_do_not_rank_together():
    config = _config([{"method": "ga"}])
    rows = _rows(config, "ga", "ga", [(0.1, 0.1, 1.0)])
    other = _config([{"method": "npo"}])
    other.unlearn.lr = 1.0
    with pytest.raises(ConfigError, match="ran different protocols"):
        rank_studies([StudyRecords(Path("a"), config, rows, []), StudyRecords(Path("b"), other, rows, [])])
    moved = [dict(r, forget_truth_ratios=[0.3, 0.3]) if r["run"] == "target" else r for r in rows]
    with pytest.raises(ConfigError, match="evaluated different target models"):
        rank_studies([StudyRecords(Path("a"), config, rows, []), StudyRecords(Path("b"), config, moved, [])])
    shorter = [dict(r, forget_truth_ratios=r["forget_truth_ratios"][:1]) if r["run"] == "target" else r for r in rows]
    with pytest.raises(ConfigError, match="evaluated different target models"):
        rank_studies([StudyRecords(Path("a"), config, rows, []), StudyRecords(Path("b"), config, shorter, [])])


def test_one_target_evaluated_on_another_cpu_ranks_together():
    """The same target's float32 evaluation moves by ~1e-4 between machines: that is not a different model."""
    config = _config([{"method": "ga"}])
    rows = _rows(config, "ga", "ga", [(0.1, 0.1, 1.0)])
    target = next(r for r in rows if r["run"] == "target")
    noisy = [dict(r, forget_truth_ratios=[t * (1 + 1e-4) for t in target["forget_truth_ratios"]]) if r["run"] == "target" else r
             for r in rows]
    ranking = rank_studies([StudyRecords(Path("a"), config, rows, []), StudyRecords(Path("b"), config, noisy, [])])
    assert "ga" in ranking["settings"]


def test_load_study_of_an_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="holds no study results"):
        load_study(tmp_path)


def test_durability_of_fewer_seeds_than_the_trajectories_is_marked():
    """A robustness run stopped after seed 0: the durability mean is of 1 seed of 2, and the table says so."""
    config = _config([{"method": "ga"}])
    rows = _rows(config, "ga", "ga", [(0.1, 0.0, 100.0), (0.3, 0.0, 120.0)])
    ranking = rank_studies([StudyRecords(Path("a"), config, rows, _attacks("ga", [{"relearn_forget": 0.4, "quantize_nf4": 0.6}]))])
    durability = ranking["settings"]["ga"]["final"]["durability"]
    assert durability["mean"] == pytest.approx(0.5) and durability["seeds"] == 1 and ranking["settings"]["ga"]["seeds"] == 2
    assert "0.500 ± 0.000 (1) [1 of 2 seeds]" in format_ranking(ranking)
