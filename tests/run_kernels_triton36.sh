#!/usr/bin/env bash
# The kernel tests again under the GPU machine's Triton (3.6; its interpreter needs numpy < 2.4), in a venv that
# sees every other package of the main environment. The main run (python -m pytest -q) uses the newest Triton.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SGA_TRITON36_VENV:-/tmp/venv-triton36}"
[ -x "$venv/bin/python" ] || python -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -q -e ".[triton36]"
"$venv/bin/python" -m pytest -q tests/test_smoothed_ga.py tests/test_smoothed_ga_variants.py \
    tests/test_smoothed_ga_inputs.py tests/test_smoothed_ga_oracle.py tests/test_row_softcap.py \
    tests/test_token_loss.py tests/test_linear.py tests/test_triton_compiles_for_gpu.py
