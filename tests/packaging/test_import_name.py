"""The repository's top-level kernels/ folder must never answer to the import name ``kernels``.

That name belongs to Hugging Face's PyPI package, which transformers requires and imports as soon as a model
module loads. ``python -m pytest`` and any script run from the checkout put the repository root first on
sys.path, so a regular package at ROOT/kernels would win over the installed one and break transformers.
The kernels are installed from kernels/sga_kernels/ as ``sga.kernels`` only.
"""
import importlib.machinery
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_from_root(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` with the repository root as working directory (first on sys.path, as for pytest)."""
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_root_offers_no_regular_package_named_kernels():
    # what the repository root alone offers for the name: at most a namespace portion (no __init__.py), which any
    # regular package of that name elsewhere on sys.path wins over
    spec = importlib.machinery.PathFinder.find_spec("kernels", [str(ROOT)])
    assert spec is None or spec.origin is None, f"ROOT/kernels is a regular package: {spec.origin}"
    assert not (ROOT / "kernels" / "__init__.py").exists()


def hub_kernels_init() -> Path | None:
    """The __init__.py of Hugging Face's installed ``kernels`` distribution, or None where it is not installed."""
    try:
        return Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    except importlib.metadata.PackageNotFoundError:
        return None


def test_kernels_name_resolves_outside_the_repository_from_its_root():
    result = run_from_root(
        "import importlib.util\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else 'absent')\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    origin = result.stdout.strip().splitlines()[-1]
    installed = hub_kernels_init()
    if installed is not None:  # transformers >= 5.25 requires it: the root must not hide it
        assert Path(origin).resolve() == installed, origin
    else:  # nothing installed: at most the folder's namespace portion (origin None), never a module of ours
        assert origin in ("absent", "None"), origin


def test_transformers_model_and_sga_kernels_run_together_from_the_repository_root():
    result = run_from_root(
        "import sys, torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from sga.kernels import smoothed_ga_loss, token_loss\n"
        "config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                     num_attention_heads=2, num_key_value_heads=2)\n"
        "model = LlamaForCausalLM(config)\n"
        "ids = torch.randint(0, 64, (2, 7))\n"
        "logits = model(ids).logits[:, :-1].reshape(-1, 64)\n"
        "labels = ids[:, 1:].reshape(-1)\n"
        "for _ in range(2):\n"
        "    smoothed_ga_loss(logits, labels, backend='torch').backward(retain_graph=True)\n"
        "    token_loss(logits, labels, rule='wga', backend='torch').backward(retain_graph=True)\n"
        "assert not any(name.startswith('kernels.') and 'sga' in name for name in sys.modules)\n"
        "print('ok')\n"
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
