#!/usr/bin/env bash
# A GPU machine's checks in one short run (limits 120 + 45 + 200 + 60 + 60 s: 8 minutes at most, ~6 expected):
#   1. the CUDA tests, named by file;
#   2. the same CUDA logits tests once more with SGA_PLANTED_DEFECT=halve_gradient: they must fail;
#   3. bench/gpu_sweep.py: every variant of the logits kernel beside the copy floor, and the tuning table;
#   4. the logits and fused linear benchmarks (ours first in each file, then the alternatives).
# $OUT receives 4 files (the device returns at most 8): results.tar.gz (every log, JSON row file and table),
# summary.txt (device, test verdicts, sweep and ratio tables), tuning_table.py and logits_vs_vocab.png.
#   here:   bash bench/fetch_wheels.sh            (once; puts Liger-Kernel and Cut Cross-Entropy into .whl/)
#   device: bash bench/gpu_check.sh               (carry [".whl"])
#   CPU dry run (tests/bench/test_bench_suite.py): SGA_BENCH_SMOKE=1 OUT=DIR bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-/tmp/sga_gpu_check}
SMOKE=${SGA_BENCH_SMOKE:-0}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SGA_BENCH_RESULTS="$WORK"
CUDA_TESTS="tests/kernels/test_smoothed_ga_cuda.py tests/kernels/test_linear_smoothed_ga.py"
BENCH_SELECT=${SGA_BENCH_SELECT:-}
TIME_SCALE=1
if [ "$SMOKE" = 1 ]; then
    TIME_SCALE=${SGA_GPU_CHECK_TIME_SCALE:-6}  # the interpreter and spawned memory probes on a shared CPU
    # the CPU dry run: nothing installed, kernels in Triton's interpreter, tiny shapes, the alternatives that run here
    export TRITON_INTERPRET=1
    BENCH_SELECT=${BENCH_SELECT:-"ours or eager or materialized"}
    SWEEP_ARGS="--smoke --budget-s 600"
else
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
            > "$WORK/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    # the project: an editable install (needs setuptools >= 64 there); else a staging folder that lays the package
    # out as installed (sga/ with kernels/sga_kernels/ as sga/kernels), first on PYTHONPATH
    if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$WORK/install.log" 2>&1; then
        mkdir -p "$WORK/staged/sga"
        ln -s "$ROOT"/sga/* "$WORK/staged/sga/" && ln -s "$ROOT/kernels/sga_kernels" "$WORK/staged/sga/kernels"
        export PYTHONPATH="$WORK/staged${PYTHONPATH:+:$PYTHONPATH}"
        echo "editable install failed (above); using the staged package in $WORK/staged" >> "$WORK/install.log"
    fi
    SWEEP_ARGS="--budget-s ${SGA_SWEEP_BUDGET_S:-150}"
fi
if ! python3 -c "import sga.kernels" >> "$WORK/install.log" 2>&1 \
        || ! (cd bench && python3 -c "import sga.kernels") >> "$WORK/install.log" 2>&1; then
    { echo "== STOPPED: import sga.kernels fails after the install; install.log:"; cat "$WORK/install.log"; } \
        | tee "$OUT/summary.txt"
    exit 1
fi
limit() { echo $(( $1 * TIME_SCALE )); }
last_line() { grep -v '^\s*$' "$1" | tail -1; }

{ nvidia-smi 2>&1 | head -15 || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"; } > "$WORK/device.txt" 2>&1
cat "$WORK/device.txt"

timeout $(limit 120) python3 -m pytest -q -m cuda $CUDA_TESTS > "$WORK/cuda_tests.log" 2>&1
CUDA_STATUS=$?
echo "CUDA tests (exit $CUDA_STATUS): $(last_line "$WORK/cuda_tests.log")"

SGA_PLANTED_DEFECT=halve_gradient timeout $(limit 45) python3 -m pytest -q -m cuda tests/kernels/test_smoothed_ga_cuda.py \
    > "$WORK/cuda_tests_planted_defect.log" 2>&1
PLANTED_STATUS=$?
PLANTED_SUMMARY=$(last_line "$WORK/cuda_tests_planted_defect.log")
if [ $PLANTED_STATUS -eq 1 ] && echo "$PLANTED_SUMMARY" | grep -q failed; then
    PLANTED="caught: $PLANTED_SUMMARY"
elif echo "$PLANTED_SUMMARY" | grep -q "skipped" && ! echo "$PLANTED_SUMMARY" | grep -q passed; then
    PLANTED="not run (no CUDA device): $PLANTED_SUMMARY"
else
    PLANTED="NOT CAUGHT (exit $PLANTED_STATUS): $PLANTED_SUMMARY"
fi
echo "CUDA tests against a halved gradient: $PLANTED"

timeout $(limit 200) python3 bench/gpu_sweep.py --out "$WORK" $SWEEP_ARGS > "$WORK/sweep.log" 2>&1
SWEEP_STATUS=$?
tail -15 "$WORK/sweep.log"

cd bench
# one time limit per file, so that the fused linear suite runs even if the logits one is cut short; rows are
# written as each case finishes (the goals' shapes and phase first, ours first)
timeout $(limit 60) python3 -m pytest -q --benchmark-only --benchmark-columns=median,min,rounds ${BENCH_SELECT:+-k "$BENCH_SELECT"} \
    test_bench_smoothed_ga.py > "$WORK/bench_logits.log" 2>&1
LOGITS_STATUS=$?
timeout $(limit 60) python3 -m pytest -q --benchmark-only --benchmark-columns=median,min,rounds ${BENCH_SELECT:+-k "$BENCH_SELECT"} \
    test_bench_linear.py > "$WORK/bench_linear.log" 2>&1
LINEAR_STATUS=$?
for results in "$WORK"/logits.jsonl "$WORK"/linear.jsonl; do
    [ -f "$results" ] && python3 report.py "$results" > "${results%.jsonl}_table.txt" 2>&1
done
[ -f "$WORK/logits.jsonl" ] && python3 report.py "$WORK/logits.jsonl" --plot "$OUT/logits_vs_vocab.png" > /dev/null 2>&1
cd "$ROOT"

{
    echo "== device"; cat "$WORK/device.txt"
    echo "== CUDA tests (exit $CUDA_STATUS): $(last_line "$WORK/cuda_tests.log")"
    grep -E "^(FAILED|ERROR)" "$WORK/cuda_tests.log" | head -20
    echo "== CUDA logits tests against a halved gradient: $PLANTED"
    echo "== kernel sweep (exit $SWEEP_STATUS)"; cat "$WORK/sweep_table.txt" 2>/dev/null || tail -5 "$WORK/sweep.log"
    echo "== logits benchmark (exit $LOGITS_STATUS)"; cat "$WORK/logits_table.txt" 2>/dev/null || tail -5 "$WORK/bench_logits.log"
    echo "== fused linear benchmark (exit $LINEAR_STATUS)"; cat "$WORK/linear_table.txt" 2>/dev/null || tail -5 "$WORK/bench_linear.log"
} > "$OUT/summary.txt"
[ -f "$WORK/tuning_table.py" ] && cp "$WORK/tuning_table.py" "$OUT/tuning_table.py"
tar -czf "$OUT/results.tar.gz" -C "$WORK" .
rm -rf "$WORK"
cat "$OUT/summary.txt"
ls -l "$OUT"
