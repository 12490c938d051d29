"""The robustness section of ``sga study``: it leaves the trajectories' digest alone (the committed default study
stays valid), its one-line config errors, and the replay of a run: the model attacked at a step is the model the
trajectory evaluated there (a rule-selected middle step and the final step)."""
import json
from pathlib import Path

import pytest
import yaml

from sga.experiments import robustness, robustness_summary, study
from sga.experiments.study_config import (
    BASELINES_CONFIG,
    DEFAULT_CONFIG,
    QUICK_CONFIG,
    config_from_dict,
    load_study_config,
)

REPO = Path(__file__).resolve().parents[2]


def test_robustness_section_keeps_the_default_study_valid():
    config = load_study_config(DEFAULT_CONFIG)
    committed = json.loads((REPO / "bench/study_default/study.json").read_text())
    assert config.robustness is not None and config.digest() == committed["config_hash"]
    assert config.to_dict() == committed["config"]  # the protocol the 154 committed rows were computed with
    without = config_from_dict({k: v for k, v in yaml.safe_load(DEFAULT_CONFIG.read_text()).items() if k != "robustness"})
    assert without.digest() == config.digest() and without.robustness_digest() is None
    changed = load_study_config(DEFAULT_CONFIG)
    changed.robustness.relearn_lr = 1e-4
    assert changed.digest() == config.digest() and changed.robustness_digest() != config.robustness_digest()
    headline = {"ga", "sga_K3_r0.8", "sga_K4_r0.8", "sga_K2_r-adaptive5", "grad_diff_K2", "npo", "simnpo"}
    assert set(config.robustness.settings) == headline and config.robustness.points == ["final", "selected"]


def _quick(**robustness_changes):
    data = yaml.safe_load(QUICK_CONFIG.read_text())
    data["robustness"].update(robustness_changes)
    return config_from_dict(data)


@pytest.mark.parametrize("change, message", [
    ({"settings": ["sga_K9_r0.1"]}, "robustness.settings: unknown settings sga_K9_r0.1; the grid's settings are ga,"),
    ({"settings": []}, "robustness.settings: empty"),
    ({"points": ["best"]}, "robustness.points must be a non-empty list of final, selected"),
    ({"attacks": ["quantize_int3"]}, "robustness.attacks: unknown quantize_int3; choose from relearn_forget"),
    ({"attacks": "some"}, "robustness.attacks must be a list of names, got 'some'"),
    ({"related_records": 99}, "robustness.related_records must be in [1, data.retain_records = 8], got 99"),
    ({"relearn_lr": 0}, "relearn lr must be a positive number"),
    ({"quantize_with": "gptq"}, "quantize_with must be one of load, weights"),
    ({"relearn_seeds": 3}, "unknown key(s) ['relearn_seeds'] in section 'robustness'"),
])
def test_bad_robustness_sections(change, message):
    with pytest.raises(study.ConfigError) as err:
        _quick(**change).validate()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_folder_holds_the_attacks_of_one_section(tmp_path):
    config = _quick().validate()
    (tmp_path / robustness.ROBUSTNESS_FILE).write_text(json.dumps({"robustness_hash": "0123456789abcdef"}))
    with pytest.raises(study.ConfigError, match="holds attacks of another robustness section"):
        robustness.check_robustness_folder(tmp_path, config)
    (tmp_path / robustness.ROBUSTNESS_FILE).write_text(json.dumps({"robustness_hash": config.robustness_digest()}))
    robustness.check_robustness_folder(tmp_path, config)


def test_attack_points_follow_the_selection_rule():
    config = _quick().validate()
    steps = config.eval_steps(config.data.forget_questions)
    target = {"run": "target", "label": "target", "seed": None, "step": 0, "model_utility": 0.5}

    def rows(*utilities):
        return [target] + [{"run": "ga/seed0", "label": "ga", "seed": 0, "step": s, "model_utility": u} for s, u in zip(steps, utilities)]

    assert robustness.attack_points(rows(0.5, 0.1), "ga/seed0", config) == {"final": steps[-1], "selected": steps[0]}
    assert robustness.attack_points(rows(0.5, 0.5), "ga/seed0", config) == {"final": steps[-1]}  # selected = final
    assert robustness.attack_points(rows(0.1, 0.1), "ga/seed0", config) == {"final": steps[-1]}  # selected = the target
    assert robustness.attack_points(rows(0.5), "ga/seed0", config) == {}  # the trajectory is not complete yet


def test_replayed_models_are_the_models_the_trajectory_evaluated(tmp_path, monkeypatch):
    """One ga run whose selection rule is made to pick its first evaluation: the replay snapshots that step, and the
    forget metrics measured before the attacks, at the selected and at the final step, equal the trajectory's."""
    data = yaml.safe_load(QUICK_CONFIG.read_text())
    data.update(grid=[{"method": "ga"}], seeds=[0])
    data["robustness"].update(settings=["ga"], attacks=["probe_answer_prefix"])
    config = config_from_dict(data).validate()
    first = config.eval_steps(config.data.forget_questions)[0]
    monkeypatch.setattr(robustness, "selected", lambda trajectory, utility, fraction: next(r for r in trajectory if r["step"] == first))
    out = tmp_path / "out"
    study.run_study(study.StudyOptions(config=config, out=out, cache_dir=tmp_path / "cache", threads=1, quiet=True))
    evaluated = {row["step"]: row for row in map(json.loads, (out / study.RESULTS_FILE).read_text().splitlines())}
    attacked = [json.loads(line) for line in (out / robustness.ROBUSTNESS_ROWS).read_text().splitlines()]
    points = {(row["run"], row["point"]): row for row in attacked}
    assert set(points) == {("target", "target"), ("ga/seed0", "final"), ("ga/seed0", "selected")}
    for (_run, point), row in points.items():
        trajectory = evaluated[row["step"]]
        assert row["step"] == {"target": 0, "final": max(evaluated), "selected": first}[point]
        for key in ("forget_prob", "forget_rouge", "forget_truth_ratio", "forget_quality"):
            assert row["before"][key] == pytest.approx(trajectory[key], rel=1e-9, abs=1e-12), (point, key)
    assert row["robustness_hash"] == config.robustness_digest() and row["config_hash"] == config.digest()
    summary = json.loads((out / "robustness_summary.json").read_text())
    assert summary["settings"]["ga"]["selected"]["sources"] == {"selected": 1}
    assert (out / "robustness/logs/ga/seed0/selected/probe_answer_prefix/TOFU_EVAL.json").is_file()
    assert not list((out / "robustness").glob("replay/*/*"))  # replays leave no weights behind


def test_grid_extension_shares_the_default_protocol():
    default, extension = load_study_config(DEFAULT_CONFIG), load_study_config(BASELINES_CONFIG)
    protocol = {k: v for k, v in default.to_dict().items() if k != "grid"}
    assert {k: v for k, v in extension.to_dict().items() if k != "grid"} == protocol
    labels = [s.label for s in extension.settings()]
    assert labels == ["idk_dpo", "wga", "satimp", "ce_u", "ihl", "undial", "rmu", "pdu"]
    assert not set(labels) & {s.label for s in default.settings()}  # the two grids rank together, no label twice


def test_summary_counts_the_runs_whose_selected_model_is_the_target(monkeypatch):
    """Two seeds of ga: seed 0's rule picks its last step (its final rows stand in), seed 1's the untouched target
    (the target's rows stand in); a seed with an attack missing is left out. The Markdown says which borrowed."""
    data = yaml.safe_load(QUICK_CONFIG.read_text())
    data.update(grid=[{"method": "ga"}], seeds=[0, 1, 2])
    data["robustness"].update(settings=["ga"], points=["final", "selected"], attacks=["quantize_nf4"])
    config = config_from_dict(data).validate()
    last = config.eval_steps(config.data.forget_questions)[-1]
    monkeypatch.setattr(robustness_summary, "selected_step", lambda rows, run, cfg: {"ga/seed0": last, "ga/seed1": 0}.get(run))
    trajectory = [{"run": f"ga/seed{seed}", "label": "ga", "seed": seed, "step": last} for seed in (0, 1, 2)]

    def metrics(prob):
        return {"forget_prob": prob, "forget_rouge": 0.5, "forget_truth_ratio": 0.5, "forget_quality": 0.5}

    def row(run, seed, point, prob):
        return {"run": run, "label": "ga", "seed": seed, "point": point, "attack": "quantize_nf4",
                "before": metrics(prob), "after": metrics(prob / 2), "deltas": metrics(-prob / 2), "scores": metrics(1 / 3),
                "retain_before": metrics(0.2), "retain_after": metrics(0.1)}

    rows = [row("target", None, "target", 0.6), row("ga/seed0", 0, "final", 0.1), row("ga/seed1", 1, "final", 0.3)]
    summary = robustness_summary.summarize_robustness(rows, trajectory, config)
    final, selected = summary["settings"]["ga"]["final"], summary["settings"]["ga"]["selected"]
    assert final["seeds"] == [0, 1] and final["sources"] == {"final": 2}
    assert final["attacks"]["quantize_nf4"]["before"]["forget_prob"]["mean"] == pytest.approx(0.2)
    assert selected["seeds"] == [0, 1] and selected["sources"] == {"final": 1, "target": 1}
    assert selected["attacks"]["quantize_nf4"]["before"]["forget_prob"]["mean"] == pytest.approx(0.35)  # 0.1 and 0.6
    table = robustness_summary.format_robustness(summary)
    assert "| ga | 2 | 0.200" in table and "| ga | 2 (1 = final, 1 = target) | 0.350" in table


@pytest.mark.parametrize("folder, config_file", [("bench/study_default", DEFAULT_CONFIG),
                                                 ("bench/study_baselines", BASELINES_CONFIG)])
def test_committed_attacks_are_of_their_protocol_and_their_summary_is_current(folder, config_file):
    """Each committed study's attack rows carry its config's digests, and robustness_summary.md is what the summary
    code writes from them (the docs quote it)."""
    config = load_study_config(config_file)
    folder = REPO / folder
    attacks = [json.loads(line) for line in (folder / robustness.ROBUSTNESS_ROWS).read_text().splitlines()]
    assert attacks and {(r["config_hash"], r["robustness_hash"]) for r in attacks} == {(config.digest(), config.robustness_digest())}
    trajectories = [json.loads(line) for line in (folder / study.RESULTS_FILE).read_text().splitlines()]
    summary = robustness_summary.summarize_robustness(attacks, trajectories, config)
    assert (folder / "robustness_summary.md").read_text() == robustness_summary.format_robustness(summary)
