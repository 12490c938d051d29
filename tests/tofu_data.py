"""Where the tests find the real TOFU files: $SGA_TOFU_DIR, else ../shared/data/tofu beside the checkout,
else /work/shared/data/tofu (a clone elsewhere, such as a clean-clone CI check in /tmp). Tests that need
them skip, naming the folder, only when none of these holds the files."""
import os
from pathlib import Path

_BESIDE_CHECKOUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
_CANDIDATES = [Path(os.environ["SGA_TOFU_DIR"])] if "SGA_TOFU_DIR" in os.environ else [_BESIDE_CHECKOUT, Path("/work/shared/data/tofu")]

TOFU_DIR = next((folder for folder in _CANDIDATES if (folder / "forget01_perturbed.json").is_file()), _CANDIDATES[0])
