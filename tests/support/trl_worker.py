"""TRL's SFTTrainer and sga.hf.trl.FusedSFTTrainer under torchrun, for tests/hf/test_trl.py.

    torchrun --nproc_per_node P tests/trl_worker.py OUT_DIR

Both train the same tiny Llama on prompt-completion data (completion-only loss, SFTTrainer's default there) for three
SGD steps of 2 samples per window over all processes (2 / P per process) x accumulation 2. Under P processes the
Trainer counts num_items_in_batch over every process and scales the loss by P (DDP averages the gradients), so the
fused loss must follow the same rule. Process 0 writes OUT_DIR/result.json with each trainer's losses and weights.
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import trl  # noqa: E402

from sga.hf.trl import FusedSFTTrainer  # noqa: E402
from trl_helpers import sft_config, train  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    result = {"world": world}
    for trainer_class in (trl.SFTTrainer, FusedSFTTrainer):
        config = {"per_device_train_batch_size": 2 // world}
        trainer, weights, losses = train(trainer_class, "prompt_completion", Path(out_dir) / trainer_class.__name__, config=config)
        assert sft_config(out_dir, **config).average_tokens_across_devices  # SFTConfig's default: the rule above
        result[trainer_class.__name__] = {
            "world_size": trainer.args.world_size,
            "losses": losses,
            "params": {name: value.flatten().tolist() for name, value in weights.items()},
        }
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(out_dir) / "result.json").write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
