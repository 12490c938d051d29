"""`sga compare`: one table and one trajectory plot for any set of run folders."""
import json

from engine_helpers import make_config, tokenizer, unlearning_data
from sga.cli import EXIT_BAD_INPUT, main
from sga.engine.trainer import UnlearningTrainer
from sga.models import tiny_random_model


def _run(folder, method, **settings):
    tok = tokenizer()
    config = make_config(folder, method, max_steps=2, **settings)
    config.evaluation.eval_every = 1

    def evaluator(model, tokenizer, step):
        return {"forget_quality": 0.1 * step, "model_utility": 0.6 - 0.05 * step, "forget_rouge": 0.9 - 0.1 * step}

    UnlearningTrainer(tiny_random_model("llama", tok), tok, unlearning_data(tok), config, evaluator=evaluator).train()
    return folder


def test_compare_writes_one_table_and_one_plot(tmp_path, capsys):
    runs = [_run(tmp_path / "ga-run", "ga"), _run(tmp_path / "sga-run", "sga", rate=0.8, num_classes=2)]
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| run | method | steps | finished | forget_nll | normal_nll | eval_step | forget_quality | model_utility" in out
    assert "| ga-run | ga | 2 | True |" in out and "| sga-run | sga (rate 0.8, K 2) | 2 | True |" in out
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["forget_quality"] for r in rows] == [0.2, 0.2] and rows[1]["normal_nll"] is not None
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("| run |")


def test_a_folder_without_a_run_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty"), "--out", str(tmp_path / "cmp")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.strip() == f"sga compare: error: {tmp_path / 'empty'} holds no run: no metrics.jsonl (give folders that sga unlearn wrote)"
    assert not (tmp_path / "cmp").exists()
