"""What a run shows while it trains: a line per evaluation, why no best model was kept, plain lines in a log
file, the evaluation time outside the remaining-time estimate, the learning rate of the step, the pairing, and no
notice about tied weights."""
import json
import logging
import time

import pytest

from engine_helpers import make_config, tokenizer, unlearning_data
from sga.engine import build_trainer
from sga.engine.progress import RunLog
from sga.engine.trainer import UnlearningTrainer
from sga.models import tiny_random_model


def _evaluator(utilities):
    """A fake benchmark: forget quality rises, model utility follows ``utilities`` (step 0 first)."""

    def evaluate(model, tokenizer, step):
        return {"forget_quality": 0.1 * (step + 1), "model_utility": utilities[step], "forget_rouge": 0.5}

    return evaluate


def _train(tmp_path, evaluator, **settings):
    tok = tokenizer()
    config = make_config(tmp_path, "sga", **settings)
    config.evaluation.eval_every = 1
    config.evaluation.benchmark = "tofu"
    config.evaluation.best_metric = "forget_quality"
    config.evaluation.utility_floor = 0.9
    trainer = UnlearningTrainer(tiny_random_model("llama", tok), tok, unlearning_data(tok), config, evaluator=evaluator)
    return trainer.train()


def test_every_evaluation_prints_its_key_metrics_and_the_missing_best_is_explained(tmp_path, capsys):
    result = _train(tmp_path, _evaluator([1.0, 0.5, 0.4, 0.3]))  # utility falls below 90% of step 0's at once
    out = capsys.readouterr().out
    assert "[sga] eval step 0/3: forget_quality 0.1, model_utility 1, forget_rouge 0.5" in out
    assert "[sga] eval step 3/3: forget_quality 0.4, model_utility 0.3, forget_rouge 0.5" in out
    assert result.best_model is None
    assert result.best_model_reason == (
        "none of the 3 evaluations after step 0 kept model_utility >= 0.9 x step 0's (1.0); the highest was 0.5x"
    )
    assert f"no best model kept: {result.best_model_reason}" in out


def test_the_best_evaluation_is_marked(tmp_path, capsys):
    result = _train(tmp_path, _evaluator([1.0, 0.95, 0.92, 0.5]))
    out = capsys.readouterr().out
    assert "eval step 2/3: forget_quality 0.3, model_utility 0.92, forget_rouge 0.5 (best so far)" in out
    assert result.best_model is not None and result.best_model_reason is None


def test_a_log_file_gets_plain_lines_not_a_bar(tmp_path, capsys):
    tok = tokenizer()
    config = make_config(tmp_path, "ga", progress=True, max_steps=3)
    UnlearningTrainer(tiny_random_model("llama", tok), tok, unlearning_data(tok), config).train()
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out  # pytest's capture is no terminal: no carriage-return bar
    assert "[sga] step 3/3 (100%): forget_nll" in captured.out and "left" in captured.out


def test_evaluation_time_is_not_training_time_in_the_bar(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    log = RunLog(10, 0, "training", progress=True)
    assert log.mode == "bar"
    started, printed = log.bar.start_t, log.bar.last_print_t
    with log.paused():
        time.sleep(0.2)
    assert log.bar.start_t - started >= 0.2 and log.bar.last_print_t - printed >= 0.2
    log.close()


def test_the_logged_learning_rate_is_the_one_the_step_used(tmp_path):
    """With the linear schedule over 3 steps at 1e-3, the steps run at 1e-3, 6.7e-4, 3.3e-4: step 1 logged the
    rate after the scheduler had moved (6.7e-4)."""
    tok = tokenizer()
    result = UnlearningTrainer(tiny_random_model("llama", tok), tok, unlearning_data(tok), make_config(tmp_path, "ga", max_steps=3)).train()
    assert [round(r["lr"], 7) for r in result.history] == [1e-3, round(2e-3 / 3, 7), round(1e-3 / 3, 7)]


def test_the_pairing_is_printed_and_recorded(tmp_path, capsys):
    tok = tokenizer()
    config = make_config(tmp_path / "run", "sga", max_steps=1)
    config.data.dataset, config.data.forget_file, config.data.retain_file = "json", str(tmp_path / "f.jsonl"), str(tmp_path / "r.jsonl")
    for name, texts in (("f.jsonl", ["forget one", "forget two"]), ("r.jsonl", ["retain one", "retain two", "retain three"])):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    build_trainer(tiny_random_model("llama", tok), tok, config).train()
    assert "normal-data pairing: tfidf" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "run.json").read_text())["pairing"] == "tfidf"


def test_checkpoints_of_a_tied_model_print_no_shared_tensor_notice(tmp_path, caplog):
    tok = tokenizer()
    model = tiny_random_model("gpt2", tok)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    with caplog.at_level(logging.WARNING):
        UnlearningTrainer(model, tok, unlearning_data(tok), make_config(tmp_path, "ga", max_steps=2, save_every=1)).train()
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]
    assert (tmp_path / "checkpoints").is_dir()


@pytest.mark.parametrize("progress", [True, False])
def test_the_progress_flag_keeps_evaluation_lines(tmp_path, capsys, progress):
    _train(tmp_path, _evaluator([1.0, 1.0, 1.0, 1.0]), progress=progress)
    out = capsys.readouterr().out
    assert out.count("[sga] eval step") == 4
    assert ("[sga] step 3/3" in out) == progress


def test_benchmark_scoring_and_model_loading_draw_no_bar_in_a_log_file(tmp_path, capsys, monkeypatch):
    """In a log file the evaluation's scoring bars and transformers' loading bars were carriage-return lines."""
    from sga.benchmarks.prompts import encode_qa
    from sga.benchmarks.scoring import token_logprobs
    from sga.models import load_model

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    tok = tokenizer()
    tiny_random_model("llama", tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    capsys.readouterr()  # the setup's own output
    model, _ = load_model(tmp_path / "model")
    token_logprobs(model, [encode_qa(tok, "Who?", "Me.", use_chat_template=False)] * 3, batch_size=1)
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out
