"""Where the tests find the real TOFU files: $SGA_TOFU_DIR (the variable ``sga study`` reads too), else the folder
``shared/data/tofu`` beside the checkout. Tests that need them skip, naming the folder, only when it lacks them."""
from pathlib import Path

from sga.experiments.study import default_data_dir

TOFU_DIR = default_data_dir() or Path(__file__).resolve().parents[3] / "shared" / "data" / "tofu"
