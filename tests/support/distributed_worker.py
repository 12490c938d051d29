"""One SGA run under torchrun, for tests/engine/test_multi_process_training.py.

    torchrun --nproc_per_node P tests/distributed_worker.py OUT_DIR

Trains a tiny random Llama with sga (adaptive rate on, so the estimator's all-reduce is exercised too)
on the synthetic TOFU data with a fixed global batch, then process 0 writes OUT_DIR/result.json with the
step records and every parameter's sum and a few values. Without a GPU, make_accelerator gives
Accelerator(cpu=True): accelerate's MULTI_CPU mode over gloo.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from engine_helpers import make_config, tokenizer, unlearning_data  # noqa: E402
from sga.engine.trainer import UnlearningTrainer, make_accelerator  # noqa: E402
from sga.models import tiny_random_model  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    tok = tokenizer()
    # global batch 3 over 2 processes: shares of 2 and 1, so the window count really matters
    config = make_config(
        Path(out_dir) / "run", "sga", rate=0.3, num_classes=3, batch_size=3, grad_accum=2, max_steps=4,
        adaptive_rate_every=2, rate_batches=1, rate_min=-1.0, rate_max=1.0, max_grad_norm=1.0,
    )
    accelerator = make_accelerator(config)
    model = tiny_random_model("llama", tok, seed=0)
    data = unlearning_data(tok, num_classes=3)
    result = UnlearningTrainer(model, tok, data, config, accelerator=accelerator).train()
    if accelerator.is_main_process:
        params = {
            name: {"sum": p.detach().double().sum().item(), "head": p.detach().flatten()[:8].tolist()}
            for name, p in model.named_parameters()
        }
        summary = {
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "status": result.status,
            "history": [{k: v for k, v in h.items() if k != "time_s"} for h in result.history],
            "params": params,
        }
        (Path(out_dir) / "result.json").write_text(json.dumps(summary), encoding="utf-8")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
