"""A run folder is never overwritten by accident: finished and started runs are refused without --overwrite, a
finished run is not resumed, the model's own folder is never an output folder, and runs get folders of their own."""
import json
import os
import time

import pytest

from sga.cli import EXIT_BAD_INPUT, main
from sga.engine.checkpoint import CheckpointError
from sga.engine.run_folder import check_output_dir, default_output_dir
from sga.models import tiny_random_model, tiny_tokenizer


def _finished_run(folder):
    """What a finished run leaves: config.yaml, metrics.jsonl and final/ (a loadable model)."""
    tok = tiny_tokenizer()
    tiny_random_model("llama", tok).save_pretrained(folder / "final")
    tok.save_pretrained(folder / "final")
    (folder / "config.yaml").write_text("train: {}\n")
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    return folder


def test_a_finished_run_is_refused_and_only_overwrite_passes(tmp_path):
    run = _finished_run(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"holds a finished run \(config.yaml, metrics.jsonl, final\).*--overwrite"):
        check_output_dir(run, resume=None, overwrite=False)
    with pytest.raises(CheckpointError, match="holds a finished run .*nothing to resume"):
        check_output_dir(run, resume="auto", overwrite=False)
    assert check_output_dir(run, resume=None, overwrite=True) == run


@pytest.mark.parametrize("entry", ["metrics.jsonl", "config.yaml", "run.json"])
def test_a_started_run_without_checkpoints_is_refused(tmp_path, entry):
    (tmp_path / entry).write_text("{}\n")
    with pytest.raises(CheckpointError, match=rf"holds a started run \({entry}\): continue it with --resume auto"):
        check_output_dir(tmp_path, resume=None, overwrite=False)


def test_an_output_folder_holding_the_model_is_always_refused(tmp_path):
    run = _finished_run(tmp_path / "run")
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="lies inside --output-dir .*would overwrite the model it loads"):
            check_output_dir(run, resume=None, overwrite=overwrite, model_path=str(run / "final"))


def test_unlearn_into_the_folder_of_its_own_finished_model_changes_nothing(tmp_path, capsys):
    """`sga unlearn --model RUN/final --output-dir RUN` overwrote the finished run it loaded, with exit 0."""
    run = _finished_run(tmp_path / "run")
    forget = tmp_path / "forget.jsonl"
    forget.write_text(json.dumps({"question": "Q?", "answer": "A."}) + "\n")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    code = main(["unlearn", "--model", str(run / "final"), "--output-dir", str(run), "--overwrite", "--dataset", "json",
                 "--forget-file", str(forget), "--method", "ga"])
    assert code == EXIT_BAD_INPUT
    assert "would overwrite the model it loads" in capsys.readouterr().err
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()} == before


def test_default_output_folders_are_one_per_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    now = time.mktime((2026, 12, 7, 10, 11, 12, 0, 0, -1))
    first = default_output_dir("sga", now=now)
    assert first.as_posix() == "sga-runs/sga-20261207-101112"
    first.mkdir(parents=True)
    assert default_output_dir("sga", now=now).as_posix() == "sga-runs/sga-20261207-101112-2"


def test_unlearn_without_output_dir_writes_a_new_folder_and_says_where(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    forget = tmp_path / "forget.jsonl"
    forget.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"answer {i}"}) + "\n" for i in range(4)))
    argv = ["unlearn", "--model", "tiny", "--method", "ga", "--dataset", "json", "--forget-file", str(forget),
            "--max-steps", "1", "--batch-size", "2", "--backend", "torch", "--no-progress"]
    assert main(argv) == 0
    assert main(argv) == 0  # a second run gets its own folder: nothing refused, nothing overwritten
    out, _ = capsys.readouterr()
    runs = sorted(p.name for p in (tmp_path / "sga-runs").iterdir())
    assert len(runs) == 2 and all(name.startswith("ga-") for name in runs)
    summaries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert sorted(os.path.basename(s["output_dir"]) for s in summaries) == runs
    assert all(f"run folder: sga-runs{os.sep}{name}" in out for name in runs)
