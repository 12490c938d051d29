"""`sga eval --attacks`: the attacks end to end on tiny models saved to disk (results in --output, open-unlearning logs
per attack), and bad attack options stopped in one line with exit status 2 before any model loads."""
import json
from unittest import mock

import pytest

from sga import cli
from sga.benchmarks.openunlearning_log import read_openunlearning_log
from sga.benchmarks.synthetic import write_synthetic_tofu
from sga.models import tiny_random_model, tiny_tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-attacks")
    tok = tiny_tokenizer()
    for name, seed in (("model", 0), ("retain", 1)):
        tiny_random_model("llama", tok, seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root, write_synthetic_tofu(root / "tofu", 4, n_perturbed=2)


def _eval(assets, *extra):
    root, data_dir = assets
    return ["eval", "--model", str(root / "model"), "--benchmark", "tofu", "--data-dir", str(data_dir), "--tofu-split", "forget10",
            "--max-samples", "2", "--max-new-tokens", "3", "--no-mia", *map(str, extra)]


def test_eval_with_attacks_end_to_end(assets, tmp_path, capsys):
    root, _ = assets
    argv = _eval(assets, "--attacks", "relearn_split,quantize_nf4,probe_answer_prefix", "--retain-model", root / "retain",
                 "--relearn-lr", "1e-3", "--related-records", "2", "--openunlearning-dir", tmp_path / "logs", "--output", tmp_path / "out.json")
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "out.json").read_text())
    attacks = {a["attack"]: a for a in results["attacks"]}
    assert list(attacks) == ["relearn_split", "quantize_nf4", "probe_answer_prefix"]
    assert attacks["relearn_split"]["score"] == "R" and attacks["relearn_split"]["measured"] == [1]  # 2 questions: 1 relearned, 1 measured
    assert attacks["relearn_split"]["settings"]["relearn"]["lr"] == 1e-3
    assert attacks["quantize_nf4"]["score"] == "Q" and attacks["quantize_nf4"]["settings"]["quantize_with"] == "load"
    for attack in attacks.values():
        assert all(s is None or 0.0 <= s <= 1.0 for s in attack["scores"].values())
        assert f"{attack['attack']}: forget_prob" in printed
    log = read_openunlearning_log(tmp_path / "logs/attacks/quantize_nf4/after/TOFU_EVAL.json")
    assert log["forget_Q_A_Prob"]["agg_value"] == pytest.approx(attacks["quantize_nf4"]["after"]["forget_prob"])
    assert (tmp_path / "logs/TOFU_EVAL.json").is_file()  # the evaluation's own log beside the attacks'


@pytest.mark.parametrize("extra, message", [
    (["--attacks", "melt"], "unknown or no attacks ['melt']"),
    (["--attacks", "all"], "--attacks needs --retain-model"),
    (["--attacks", "all", "--retain-model", "RETAIN", "--relearn-lr", "0"], "relearn lr must be a positive number"),
    (["--attacks", "all", "--retain-model", "RETAIN", "--relearn-epochs", "0"], "relearn epochs must be >= 1"),
    (["--attacks", "all", "--retain-model", "RETAIN", "--related-records", "0"], "--related-records must be >= 1"),
    (["--attacks", "quantize_nf4", "--retain-model", "RETAIN", "--gguf-file", "m.gguf"], "for a GGUF file or a LoRA adapter use --quantize-with weights"),
])
def test_bad_attack_options_stop_before_any_model_loads(assets, capsys, extra, message):
    root, _ = assets
    extra = [str(root / "retain") if e == "RETAIN" else e for e in extra]
    with mock.patch("sga.models.load_model", side_effect=AssertionError("a model was loaded")):
        assert cli.main(_eval(assets, *extra)) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_attacks_need_the_tofu_benchmark(assets, capsys):
    root, data_dir = assets
    argv = ["eval", "--model", str(root / "model"), "--benchmark", "muse", "--data-dir", str(data_dir), "--attacks", "all",
            "--retain-model", str(root / "retain")]
    with mock.patch("sga.models.load_model", side_effect=AssertionError("a model was loaded")):
        assert cli.main(argv) == cli.EXIT_BAD_INPUT
    assert "--attacks runs on the TOFU forget set: use --benchmark tofu" in capsys.readouterr().err
