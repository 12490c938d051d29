"""Where the tests find the real TOFU files: $SGA_TOFU_DIR, else the library's own default
(``sga.study.default_data_dir``: /work/shared/data/tofu, or ../shared/data/tofu beside the working directory).
Tests that need them skip, naming the folder, only when neither holds the files."""
import os
from pathlib import Path

from sga.study import default_data_dir

_BESIDE_CHECKOUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"

TOFU_DIR = Path(os.environ["SGA_TOFU_DIR"]) if "SGA_TOFU_DIR" in os.environ else (default_data_dir() or _BESIDE_CHECKOUT)
