"""The modules of sga.kernels import in one direction: the layers contract "kernels: one direction" of
pyproject.toml ([tool.importlinter]) holds, function-local imports included.

import-linter finds a package's modules by walking its folder, and sga.kernels is installed from
kernels/sga_kernels/ (outside sga/), so the check runs on sga staged as installed: a folder whose sga/ links to
every entry of the checkout's sga/ and whose sga/kernels links to kernels/sga_kernels/. Skipped where
import-linter is not installed (``pip install import-linter``).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def stage_installed_layout(folder: Path) -> Path:
    """folder/sga laid out as the installed package, made of symlinks into the checkout."""
    staged = folder / "sga"
    staged.mkdir()
    for entry in (ROOT / "sga").iterdir():
        if entry.name != "__pycache__":
            (staged / entry.name).symlink_to(entry)
    (staged / "kernels").symlink_to(ROOT / "kernels" / "sga_kernels")
    return folder


def test_kernel_modules_import_in_one_direction(tmp_path):
    pytest.importorskip("importlinter")
    staged = stage_installed_layout(tmp_path)
    # run from the staged folder: lint-imports puts its working directory first on sys.path, and the checkout's
    # own sga/ (without kernels/) must not be the one it finds
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
               "sys.exit(lint_imports_command())", str(ROOT / "pyproject.toml"), "--no-cache"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(staged))
    result = subprocess.run(command, cwd=staged, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "kernels: one direction KEPT" in result.stdout
