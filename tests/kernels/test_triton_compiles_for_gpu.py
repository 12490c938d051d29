"""The Triton kernels lower to cubins for sm_80 and sm_90 without a GPU, which the CPU
interpreter alone would not prove: every dtype and option flag, and every variant bench/gpu_sweep.py times."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the cuda-marked tests compile and run the kernels")
def test_kernels_compile_for_nvidia_targets():
    from compile_kernels_for_gpu import all_kernels

    expected = len(all_kernels())
    assert expected >= 70  # flag variants x dtypes, the scale kernel, the sweep's variants with and without softcap
    script = Path(__file__).with_name("compile_kernels_for_gpu.py")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("ok ") == expected
    assert f"compiled {expected} kernels" in result.stdout
