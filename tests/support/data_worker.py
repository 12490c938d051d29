"""Which samples each process draws in a multi-process run, for tests/data/test_rank_aware_data.py.

    torchrun --nproc_per_node P tests/data_worker.py OUT_DIR

Runs two SGA steps of a tiny Llama with batch 5 x accumulation 2 and records, per process, the forget indices of
every micro-batch it collated and the normal indices paired with them; process 0 writes OUT_DIR/draws.json.
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
    config = make_config(Path(out_dir) / "run", "sga", rate=0.3, num_classes=3, batch_size=5, grad_accum=2, max_steps=2)
    accelerator = make_accelerator(config)
    data = unlearning_data(tok, num_classes=3)
    draws = []
    collate = data.batch

    def recording(indices, pad_token_id):
        draws.append({"forget": list(indices), "normal": [j for i in indices for j in data.pairs[i]]})
        return collate(indices, pad_token_id)

    data.batch = recording
    UnlearningTrainer(tiny_random_model("llama", tok), tok, data, config, accelerator=accelerator).train()
    gathered = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, draws)
    if accelerator.is_main_process:
        (Path(out_dir) / "draws.json").write_text(json.dumps({"per_process": gathered}), encoding="utf-8")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
