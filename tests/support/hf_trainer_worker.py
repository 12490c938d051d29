"""HFUnlearningTrainer under torchrun, for tests/engine/test_hf_trainer.py.

    torchrun --nproc_per_node P tests/hf_trainer_worker.py OUT_DIR

Two SGD steps of sga (K = 3) on a tiny Llama, each a window of 2 forget samples per micro-batch over all processes
(2 / P per process) x accumulation 2: with the Trainer's sampler sharding, P = 1 and P = 2 see the same 4 samples
per window. Process 0 writes OUT_DIR/result.json with every parameter's values and the logged losses.
"""
import json
import os
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))

from engine_helpers import tokenizer, unlearning_data  # noqa: E402
from sga.config import MethodConfig  # noqa: E402
from sga.engine.hf_trainer import HFUnlearningTrainer  # noqa: E402
from sga.models import tiny_random_model  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tok = tokenizer()
    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=2 // world, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    )
    model = tiny_random_model("llama", tok)
    method = MethodConfig(name="sga", rate=0.4, num_classes=3)
    data = unlearning_data(tok, num_classes=3)
    trainer = HFUnlearningTrainer(model, args, data=data, method=method, pad_token_id=tok.pad_token_id, backend="torch")
    trainer.train()
    if trainer.is_world_process_zero():
        result = {
            "world": world,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "params": {name: p.detach().flatten().tolist() for name, p in model.named_parameters()},
        }
        (Path(out_dir) / "result.json").write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
