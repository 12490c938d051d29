"""A GA run with evaluation during training under torchrun, for tests/engine/test_evaluation_during_training_distributed.py.

    torchrun --nproc_per_node P tests/support/train_eval_worker.py OUT_DIR TOFU_DIR MODE

Four steps of a tiny random Llama, the TOFU benchmark (synthetic data in TOFU_DIR) after steps 0, 2 and 4, the
best model kept by model utility. Every call of the evaluator appends its process index to
OUT_DIR/evaluated-by-<index>.txt; every process writes its history to OUT_DIR/history-<index>.json. MODE "fail":
the evaluation of step 2 raises on the main process (every process must stop with that error, none wait).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from engine_helpers import make_config, tokenizer, unlearning_data  # noqa: E402
from sga.engine.evaluation import benchmark_evaluator  # noqa: E402
from sga.engine.trainer import UnlearningTrainer, make_accelerator  # noqa: E402
from sga.models import tiny_random_model  # noqa: E402


def main(out_dir: str, tofu_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    tok = tokenizer()
    config = make_config(out / "run", "ga", batch_size=2, max_steps=4, data_dir=tofu_dir, tofu_split="forget10")
    e = config.evaluation
    e.eval_every, e.max_samples, e.max_new_tokens, e.batch_size, e.best_metric = 2, 2, 4, 4, "model_utility"
    config.validate()
    accelerator = make_accelerator(config)
    benchmark = benchmark_evaluator(config)

    def evaluator(model, tok, step):
        with (out / f"evaluated-by-{accelerator.process_index}.txt").open("a") as handle:
            handle.write(f"{step}\n")
        if mode == "fail" and step == 2:
            raise ValueError(f"scripted failure at step {step}")
        return benchmark(model, tok, step)

    trainer = UnlearningTrainer(tiny_random_model("llama", tok, seed=0), tok, unlearning_data(tok, normal=False), config, accelerator=accelerator, evaluator=evaluator)
    result = trainer.train()
    history = [{k: v for k, v in h.items() if k not in ("time_s", "eval_s")} for h in result.history]
    summary = {"status": result.status, "num_processes": accelerator.num_processes, "best_model": str(result.best_model), "history": history}
    (out / f"history-{accelerator.process_index}.json").write_text(json.dumps(summary), encoding="utf-8")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:4])
