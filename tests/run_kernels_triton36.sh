#!/usr/bin/env bash
# The kernel tests again under the GPU machine's Triton (3.6; its interpreter needs numpy < 2.4), in a venv that
# sees every other package of the calling environment (a .pth file naming its site-packages; Triton 3.6 and numpy
# installed in the venv win over them). The main run (python -m pytest -q) uses the newest Triton.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SGA_TRITON36_VENV:-/tmp/venv-triton36}"
caller_site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
[ -x "$venv/bin/python" ] || python -m venv "$venv"
venv_site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$caller_site" > "$venv_site/caller_env.pth"
"$venv/bin/pip" install -q -e ".[triton36]"
"$venv/bin/python" -c "import sga.kernels, triton; print('sga.kernels from', sga.kernels.__file__, 'triton', triton.__version__)" \
    || { echo "run_kernels_triton36.sh: import sga.kernels failed in $venv after the install" >&2; exit 1; }
"$venv/bin/python" -m pytest -q tests/kernels
