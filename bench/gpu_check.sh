#!/usr/bin/env bash
# One GPU session's checks, in one run (about 7 minutes at most: 120 + 150 + 120 s of limits plus installs):
# the CUDA correctness tests at real sizes, then the benchmark suite, with results, logs and the plot written to $OUT.
#   here:   bash bench/fetch_wheels.sh            (once; puts Liger-Kernel and Cut Cross-Entropy into .whl/)
#   device: bash bench/gpu_check.sh               (carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sga_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SGA_BENCH_RESULTS="$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 || cat "$OUT/install.log"
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } \
    > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
timeout 120 python3 -m pytest -q -m cuda tests/ 2>&1 | tee "$OUT/cuda_tests.log" | tail -5
cd bench
# one time limit per file, so that the fused linear suite runs even if the logits one is cut short; rows are
# written as each case finishes (the goals' shapes and phase come first in each file)
timeout 150 python3 -m pytest -q --benchmark-only --benchmark-columns=median,min,rounds \
    test_bench_smoothed_ga.py 2>&1 | tee "$OUT/bench_logits.log" | tail -40
timeout 120 python3 -m pytest -q --benchmark-only --benchmark-columns=median,min,rounds \
    test_bench_linear.py 2>&1 | tee "$OUT/bench_linear.log" | tail -40
for results in "$OUT"/*.jsonl; do
    python3 report.py "$results" > "${results%.jsonl}_table.txt"
done
[ -f "$OUT/logits.jsonl" ] && python3 report.py "$OUT/logits.jsonl" --plot "$OUT/logits_vs_vocab.png" > /dev/null
ls -l "$OUT"
