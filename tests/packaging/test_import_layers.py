"""The import-linter contracts of pyproject.toml hold: the library's packages import in one direction, the
kernels import nothing of the library, the method registry is assembled top-down, and the kernel modules import
in one direction, function-local imports included. Run as CI does: ``PYTHONPATH=kernels lint-imports``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_import_contract_is_kept():
    pytest.importorskip("importlinter")
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
               "sys.exit(lint_imports_command())", "--no-cache"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT / "kernels"))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    for contract in ("sga: one direction", "kernels: the bottom layer", "methods: the registry", "kernels: one direction"):
        assert contract in result.stdout
    assert "BROKEN" not in result.stdout and "4 kept, 0 broken" in result.stdout
