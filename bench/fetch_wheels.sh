#!/usr/bin/env bash
# Download the alternatives the GPU benchmark compares against (Liger-Kernel, Cut Cross-Entropy) as wheels
# into .whl/ (ignored by git), so that bench/gpu_check.sh can install them on a machine without a registry.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    liger-kernel cut-cross-entropy
ls -l .whl
