"""kernels/ is the package sga.kernels; found as a top-level `kernels` (another PyPI project's name, which
transformers probes for by importing it when the repository root is on sys.path) it must register nothing."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys, torch
from sga.kernels import smoothed_ga_loss, token_loss
import transformers.modeling_utils  # probes for the hub's `kernels` package: finds this repository's folder
assert not any(name.startswith("kernels.") for name in sys.modules), sorted(n for n in sys.modules if n.startswith("kernels"))
logits = torch.randn(6, 45, requires_grad=True)
labels = torch.randint(0, 45, (6,))
for _ in range(3):
    token_loss(logits, labels, rule="wga", backend="torch").backward()
    smoothed_ga_loss(logits, labels, backend="torch").backward()
print("ok")
"""


def test_transformers_probing_the_top_level_kernels_name_registers_no_op_twice():
    # run from the repository root, as `python -m pytest` and scripts in the checkout do (cwd on sys.path)
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
