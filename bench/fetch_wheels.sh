#!/usr/bin/env bash
# Download the alternatives the GPU benchmark compares against as wheels into .whl/ (ignored by git), so that
# bench/gpu_check.sh can install them on a machine without a registry. Versions pinned: bench/alternatives.py
# calls their autograd Functions / functions with these versions' argument lists.
set -euo pipefail
cd "$(dirname "$0")/.."
LIGER_KERNEL_VERSION=0.8.5       # liger_kernel.ops.LigerCrossEntropyFunction / LigerFusedLinearCrossEntropyFunction
CUT_CROSS_ENTROPY_VERSION=25.1.1  # cut_cross_entropy.linear_cross_entropy(..., filter_eps=None)
rm -f .whl/liger_kernel-*.whl .whl/cut_cross_entropy-*.whl  # one version of each: two stop the install
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    "liger-kernel==$LIGER_KERNEL_VERSION" "cut-cross-entropy==$CUT_CROSS_ENTROPY_VERSION"
ls -l .whl
