"""``sga study --quick`` end to end (tiny random Llama, built-in authors), killed part-way and resumed; its
results rows, summary and plots; the selection rule; the config's one-line errors."""
import json
import math
import os
import signal
from pathlib import Path

import pytest

from sga.cli import main
from sga.experiments import robustness, study
from sga.experiments.study_config import (
    DEFAULT_CONFIG,
    QUICK_CONFIG,
    config_from_dict,
    load_study_config,
)
from sga.experiments.study_summary import selected, summarize

TERM_AT = 5  # evaluation during which the first session gets SIGTERM (the trainer checkpoints and stops)
KILL_AFTER = 7  # evaluations of the second session before a hard kill (an exception, no checkpoint)


@pytest.fixture(scope="module")
def resumed_study(tmp_path_factory):
    """The quick study in three sessions: SIGTERM during evaluation TERM_AT (the trainer finishes the step,
    writes a checkpoint, the study exits 130); a rerun killed outright after KILL_AFTER evaluations (a
    KeyboardInterrupt out of an evaluation, no checkpoint) with a torn half-written row left behind; a rerun
    to the end. Returns the folders, what each session did and the rows after the first two."""
    root = tmp_path_factory.mktemp("study")
    out, cache = root / "out", root / "cache"
    args = ["study", "--quick", "--threads", "1", "--out", str(out), "--cache-dir", str(cache)]
    session = {"n": 0, "sft": 0, "first_step": {}}
    evaluate, trainer = study.evaluate, study.evaluating_trainer

    def counting_evaluate(*a, **k):
        session["n"] += 1
        if session["n"] == session.get("term_at"):
            os.kill(os.getpid(), signal.SIGTERM)
        if session["n"] > session.get("kill_after", math.inf):
            raise KeyboardInterrupt
        return evaluate(*a, **k)

    def counting_trainer(model, tokenizer, config, on_step=None):
        session["sft"] += config.method.name == "sft"

        def hook(step, objective):
            session["first_step"].setdefault(config.train.output_dir, step)
            return on_step(step, objective) if on_step else None

        return trainer(model, tokenizer, config, hook)

    sessions = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study, "evaluate", counting_evaluate)
        mp.setattr(study, "evaluating_trainer", counting_trainer)
        for limits, status in (({"term_at": TERM_AT}, 130), ({"kill_after": KILL_AFTER}, 130), ({}, 0)):
            session.update({"n": 0, "sft": 0, "first_step": {}, "term_at": None, "kill_after": math.inf, **limits})
            checkpoints = sorted(str(p.relative_to(out)) for p in out.glob("runs/*/*/checkpoints/step-*")) if out.exists() else []
            assert main(args) == status
            sessions.append({**session, "first_step": dict(session["first_step"]), "checkpoints_before": checkpoints,
                             "rows": (out / study.RESULTS_FILE).read_text().splitlines()})
            if len(sessions) == 2:
                with (out / study.RESULTS_FILE).open("a") as handle:
                    handle.write('{"run": "ga/seed0", "ste')  # a write torn by the kill
    return {"out": out, "cache": cache, "sessions": sessions}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / study.RESULTS_FILE).read_text().splitlines()]


def test_quick_study_end_to_end(resumed_study):
    out = resumed_study["out"]
    config = load_study_config(QUICK_CONFIG)
    settings, seeds = config.settings(), config.seeds
    steps = config.eval_steps(config.data.forget_questions)
    rows = _rows(out)
    assert len(rows) == 1 + len(settings) * len(seeds) * len(steps)
    assert len({(r["run"], r["step"]) for r in rows}) == len(rows)  # nothing evaluated twice
    target = rows[0]
    assert target["run"] == "target" and target["step"] == 0 and target["retain_model"]["mia_min_k_auc"] is not None
    expected = {f"{s.label}/seed{seed}": s for s in settings for seed in seeds}
    assert {r["run"] for r in rows[1:]} == set(expected)
    # run order: seed-major, and within a seed the settings by K (single-pass methods, then K = 2, ...)
    by_cost = sorted(settings, key=lambda s: s.method.get("num_classes", 1))
    assert list(dict.fromkeys(r["run"] for r in rows[1:])) == [f"{s.label}/seed{seed}" for seed in seeds for s in by_cost]
    assert [s.method["name"] for s in by_cost][:2] == ["ga", "npo"]  # npo (no K) moved before the K = 2 runs
    for row in rows:
        assert 0.0 <= row["forget_quality"] <= 1.0 and 0.0 <= row["model_utility"] <= 1.0
        assert 0.0 <= row["mia_min_k_auc"] <= 1.0 and row["privleak"] is not None
        assert len(row["forget_truth_ratios"]) == config.data.forget_questions
        assert row["config_hash"] == config.digest() and row["config"] == config.to_dict()
        assert {"sga", "torch", "transformers", "python"} <= set(row["versions"])
        assert row["torch_threads"] == 1  # the fixture's --threads 1
    for row in rows[1:]:
        assert row["method"] == expected[row["run"]].method and row["step"] in steps
    # the rate modes: r* estimated once per K and used; the adaptive rate re-estimated during the run
    rates = json.loads((out / study.RATES_FILE).read_text())
    star = [r for r in rows if r["label"] == "sga_K2_r*"]
    assert star and all(r["rate"] == r["rate_estimate"] == rates["sga-K2"]["rate"] for r in star)
    adaptive = [r for r in rows if r["label"].startswith("sga_K2_r-adaptive")]
    assert adaptive and all(-1.0 <= r["rate"] <= 1.0 for r in adaptive)
    fixed = [r for r in rows if r["label"] == "sga_K2_r0.2"]
    assert all(r["rate"] == 0.2 for r in fixed)
    # summary and plots
    summary = json.loads((out / study.SUMMARY_JSON).read_text())
    assert set(summary["settings"]) == {s.label for s in settings}
    for label, entry in summary["settings"].items():
        assert entry["seeds"] == seeds, label
        for point in ("selected", "final"):
            assert entry[point]["forget_quality"]["std"] is not None
    for label, entry in summary["settings"].items():
        trajectory = entry["trajectory"]
        assert list(trajectory) == [str(step) for step in [0, *steps]], label
        final = trajectory[str(steps[-1])]
        assert final["model_utility"] == entry["final"]["model_utility"] and final["forget_quality"] == entry["final"]["forget_quality"]
        utilities = [r["model_utility"] for r in rows if r["label"] == label and r["step"] == steps[0]]
        assert trajectory[str(steps[0])]["model_utility"]["mean"] == pytest.approx(sum(utilities) / len(utilities))
    markdown = (out / study.SUMMARY_MD).read_text()
    assert "### Trajectory: model utility" in markdown and "| step 0 |" in markdown
    assert "Selection rule" in markdown and all(f"| {s.label} | {len(seeds)} |" in markdown for s in settings)
    for name in ("forget_quality_vs_utility.png", "utility_and_rouge_vs_epoch.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # weights are not kept per run
    assert not list((out / "runs").glob("*/*/final"))


def test_resume_redoes_nothing(resumed_study):
    out = resumed_study["out"]
    term, kill, last = resumed_study["sessions"]
    rows = _rows(out)
    # session 1: the retain and target evaluations, then runs; SIGTERM came during evaluation TERM_AT, whose
    # row was still written; the trainer ran one more step and wrote a checkpoint there
    assert term["n"] == TERM_AT and len(term["rows"]) == TERM_AT - 1 and term["sft"] == 2
    stopped = json.loads(term["rows"][-1])
    run_dir = f"runs/{stopped['label']}/seed{stopped['seed']}"
    assert kill["checkpoints_before"] == [f"{run_dir}/checkpoints/step-{stopped['step'] + 1:08d}"]
    # session 2 continued that run from its checkpoint (first step seen: the one after it), not from step 0
    assert kill["first_step"][str(out / run_dir)] == stopped["step"] + 2
    assert kill["sft"] == 0 and last["sft"] == 0  # target and retain fine-tunes come from the cache
    # sessions 2 and 3 evaluated exactly the rows that were missing; the torn line was dropped, nothing else
    assert kill["n"] == KILL_AFTER + 1 and len(kill["rows"]) == len(term["rows"]) + KILL_AFTER
    assert last["n"] == len(rows) - len(kill["rows"])
    assert [json.loads(line) for line in kill["rows"]] == rows[: len(kill["rows"])]
    assert not list(out.glob("runs/*/*/checkpoints/step-*"))  # finished runs leave no checkpoint behind


def test_fine_tunes_are_reused_by_another_study(resumed_study, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a cached fine-tune was trained again")

    monkeypatch.setattr(study, "evaluating_trainer", no_training)
    config = load_study_config(QUICK_CONFIG)
    options = study.StudyOptions(config=config, out=tmp_path / "other", cache_dir=resumed_study["cache"], quiet=True)
    options.validate()
    run = study._Study(options)
    target, reference = run.references()
    assert (target / "config.json").is_file() and len(reference["forget_truth_ratios"]) == config.data.forget_questions


def test_selection_rule_and_summary():
    config = load_study_config(QUICK_CONFIG)
    steps = config.eval_steps(config.data.forget_questions)
    target = {"run": "target", "label": "target", "seed": None, "step": 0, "epoch": 0.0, "model_utility": 0.5, "forget_quality": 0.01}

    def row(seed, step, utility, quality):
        return {"run": f"ga/seed{seed}", "label": "ga", "seed": seed, "step": step, "epoch": step / 2, "model_utility": utility, "forget_quality": quality}

    rows = [target, row(0, steps[0], 0.46, 0.2), row(0, steps[1], 0.30, 0.9), row(1, steps[0], 0.44, 0.4), row(1, steps[1], 0.46, 0.6)]
    trajectory = [target, rows[1], rows[2]]
    assert selected(trajectory, 0.5, 0.9) is rows[1]  # 0.46 >= 0.45; the last epoch (0.30) is below
    assert selected([target, row(0, 1, 0.1, 0.5)], 0.5, 0.9) is target  # nothing qualifies: the target itself
    summary = summarize(rows, config)
    ga = summary["settings"]["ga"]
    # seed 0 selects its first epoch (0.2), seed 1 its last (0.6): mean 0.4; final epochs: 0.9 and 0.6
    assert ga["selected"]["forget_quality"]["mean"] == pytest.approx(0.4)
    assert ga["final"]["forget_quality"]["mean"] == pytest.approx(0.75)
    assert ga["final"]["model_utility"]["std"] == pytest.approx(0.11313708, rel=1e-6)
    # an unfinished run is left out of the summary
    assert summarize(rows[:-1], config)["settings"]["ga"]["seeds"] == [0]


def test_default_protocol_grid():
    config = load_study_config(DEFAULT_CONFIG)
    labels = [s.label for s in config.settings()]
    assert config.model == "smollm2" and config.seeds == [0, 1, 2]
    assert labels[0] == "ga" and {"grad_diff_K2", "npo", "simnpo", "sga_K2_r*", "sga_token_r0.5"} <= set(labels)
    assert {f"sga_K{k}_r{r}" for k in (2, 3, 4) for r in (0.2, 0.5, 0.8)} <= set(labels)
    assert any(label.startswith("sga_K2_r-adaptive") for label in labels) and any(label.startswith("sga_gls") for label in labels)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"grid": [{"method": "ga", "rate": "estimate"}]}, "rate: estimate applies to sga and sga_gls, not ga"),
        ({"grid": [{"method": "sga", "rate": "adaptive"}]}, "needs adaptive_rate_every"),
        ({"grid": [{"method": "sga", "K": 2}]}, "unknown key(s) ['K']"),
        ({"grid": [{"method": "nope"}]}, "method must be one of ga, sga"),
        ({"grid": [{"method": "sft"}]}, "got 'sft'"),
        ({"grid": [{"method": "sga", "num_classes": 1}]}, "num_classes (K) must be >= 2"),
        ({"grid": [{"method": "ga"}, {"method": "ga"}]}, "appear twice"),
        ({"unlearn": {"epochs": 0}}, "unlearn.epochs must be >= 1"),
        ({"unlearn": {"lr": "fast"}}, "unlearn.lr must be a float"),
        ({"data": {"eval_questions": 100}}, "exceeds data.retain_records"),
        ({"seeds": [0, 0]}, "distinct integers"),
        ({"selection": {"utility_fraction": 1.5}}, "utility_fraction must be in (0, 1]"),
        ({"extra": 1}, "unknown study config key(s) ['extra']"),
    ],
)
def test_bad_configs_give_one_line_errors(tmp_path, capsys, change, message):
    import yaml

    data = yaml.safe_load(QUICK_CONFIG.read_text())
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["study", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sga study: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_bad_options_give_one_line_errors(tmp_path, capsys, resumed_study):
    cases = [
        (["--quick", "--config", str(DEFAULT_CONFIG)], "drop --config or --quick"),
        (["--config", str(DEFAULT_CONFIG), "--data-dir", str(tmp_path / "none")], "--data-dir: no such folder"),
        (["--config", str(DEFAULT_CONFIG), "--data-dir", str(tmp_path)], "lacks forget01_perturbed.json"),
        (["--config", str(tmp_path / "missing.yaml")], "--config: no such file"),
        (["--quick", "--first", "ga,sga_K9_r0.5", "--out", str(tmp_path / "first")], "--first: no setting sga_K9_r0.5 in the grid"),
        # a folder holding another config's study is not mixed with this one
        (["--config", str(DEFAULT_CONFIG), "--data-dir", str(resumed_study["out"] / "synthetic"), "--out", str(resumed_study["out"])], "holds a study with another config"),
    ]
    for args, message in cases:
        assert main(["study", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("sga study: error: ") and message in err and err.count("\n") == 1, err


def test_report_summarizes_a_partial_study_and_only_reads_it(resumed_study, tmp_path, capsys):
    """--report on a study stopped after its first seed, with a line being written: the summary and plots of
    what is there, results.jsonl unchanged, and a one-line error for a folder without a study or of another
    config."""
    rows = _rows(resumed_study["out"])
    first_seed = [row for row in rows if row["seed"] in (None, 0)]
    assert len(first_seed) < len(rows)
    out = tmp_path / "partial"
    out.mkdir()
    (out / study.STUDY_FILE).write_bytes((resumed_study["out"] / study.STUDY_FILE).read_bytes())
    written = "".join(json.dumps(row) + "\n" for row in first_seed) + '{"run": "ga/seed1", "st'
    (out / study.RESULTS_FILE).write_text(written)
    assert main(["study", "--quick", "--report", "--out", str(out)]) == 0
    assert (out / study.RESULTS_FILE).read_text() == written  # read, not repaired: a study may be writing it
    summary = json.loads((out / study.SUMMARY_JSON).read_text())
    config = load_study_config(QUICK_CONFIG)
    assert summary == summarize(first_seed, config)
    assert all(entry["seeds"] == [0] for entry in summary["settings"].values())
    assert all((out / name).stat().st_size > 10_000 for name in ("forget_quality_vs_utility.png", "utility_and_rouge_vs_epoch.png"))
    capsys.readouterr()
    for args, message in (
        (["--quick", "--out", str(tmp_path / "none")], "holds no study results"),
        (["--config", str(DEFAULT_CONFIG), "--out", str(out)], "holds a study with another config"),
    ):
        assert main(["study", "--report", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("sga study: error: --report: ") and message in err and err.count("\n") == 1, err


def test_schedule_runs_the_first_settings_for_every_seed_then_the_rest_by_cost():
    config = load_study_config(DEFAULT_CONFIG)
    settings, seeds = config.settings(), config.seeds
    order = [(setting.label, seed) for setting, seed in study.schedule(settings, seeds, ("sga_K4_r0.8", "ga"))]
    assert sorted(order) == sorted((s.label, seed) for s in settings for seed in seeds)  # every run once
    leading = [(label, seed) for seed in seeds for label in ("sga_K4_r0.8", "ga")]
    assert order[: len(leading)] == leading
    rest = order[len(leading):]
    assert [seed for _, seed in rest] == sorted(seed for _, seed in rest)  # seed-major
    cost = {s.label: s.method.get("num_classes", 1) for s in settings}
    for seed in seeds:
        within = [cost[label] for label, s in rest if s == seed]
        assert within == sorted(within) and len(within) == len(settings) - 2
    assert study.schedule(settings, seeds) == [(s, seed) for seed in seeds for s in sorted(settings, key=lambda s: cost[s.label])]


def test_config_from_dict_expands_lists():
    config = config_from_dict({"grid": [{"method": "sga", "num_classes": [2, 3], "rate": [0.1, 0.9]}], "seeds": [3]})
    assert [s.label for s in config.settings()] == ["sga_K2_r0.1", "sga_K2_r0.9", "sga_K3_r0.1", "sga_K3_r0.9"]


def test_robustness_of_the_resumed_study(resumed_study):
    """The quick config's robustness section: after the three sessions, every attack on the target and on each
    attacked run's models is recorded exactly once, the retain model's reference is complete, with a summary."""
    out = resumed_study["out"]
    config = load_study_config(QUICK_CONFIG)
    attacks = config.robustness.attacks
    rows = [json.loads(line) for line in (out / "robustness.jsonl").read_text().splitlines()]
    keys = [(r["run"], r["point"], r["attack"]) for r in rows]
    assert len(keys) == len(set(keys))  # nothing attacked twice across the sessions
    trajectories = _rows(out)
    expected = {("target", "target")} | {
        (f"{label}/seed{seed}", point) for label in config.robustness.settings for seed in config.seeds
        for point in robustness.attack_points(trajectories, f"{label}/seed{seed}", config)
    }
    assert {(run, point) for run, point, _ in keys} == expected
    assert all(sorted(a for r, p, a in keys if (r, p) == model) == sorted(attacks) for model in expected)
    for row in rows:
        assert row["config_hash"] == config.digest() and row["robustness_hash"] == config.robustness_digest()
        assert all(s is None or 0.0 <= s <= 1.0 for s in row["scores"].values()) and row["retain_after"] is not None
    reference = json.loads((out / "robustness/reference.json").read_text())
    assert sorted(reference["attacks"]) == sorted(attacks) and reference["robustness_hash"] == config.robustness_digest()
    summary = json.loads((out / "robustness_summary.json").read_text())
    assert set(summary["settings"]) == set(config.robustness.settings) and summary["attacks"] == attacks
    assert all(entry["final"]["seeds"] == config.seeds for entry in summary["settings"].values())
    assert "### relearn_forget, final models" in (out / "robustness_summary.md").read_text()
