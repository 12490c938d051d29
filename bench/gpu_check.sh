#!/usr/bin/env bash
# A GPU machine's checks and benchmarks in one run that fits a device lease: 8.5 minutes at most.
#
# TIME BUDGET (seconds of wall clock, each step's Python start included). A step may run until the end of its
# share in the cumulative schedule below: its own share plus whatever the steps before it left unused, never into
# a later step's share. The sweep stops by its own budget (its share less its start-up), so what earlier steps
# leave passes through it to the benchmarks. Each step runs under `timeout -k 10`: TERM at its limit, KILL 10 s
# later (a process stuck in a CUDA call), and the limit already leaves those 10 s inside the share.
#   setup       30  wheels, editable install, the import check, device.txt (versions or import errors)
#   cuda_tests 120  the CUDA tests: logits kernel, fused linear, token rules, no host sync, the engine under bf16
#   planted     30  the CUDA logits tests again with a halved gradient: they must fail
#   engine      75  one SGA step of a Llama-3.2-1B-shaped model: ours / the model's loss / Liger, full and LoRA
#   sweep       90  bench/gpu_sweep.py: the logits kernel's variants against the copy floor, the tuning table
#   logits      70  test_bench_smoothed_ga.py (forward+backward at every shape first, torch.compile last)
#   linear      65  test_bench_linear.py (same order)
#   pack        10  tables, plot, summary.txt and results.tar.gz (also rewritten after every step)
#   total      490  + 20 s of slack (the last step's kill grace, the final listing) = 510 s = 8.5 minutes
#
# $OUT receives 4 files (the device returns at most 8), rewritten after every step so that a run cut short still
# returns everything up to its last finished step: summary.txt (budget and step times, device and package versions,
# floors, test verdicts, sweep and ratio tables, skip reasons), results.tar.gz (every log and JSON row file),
# tuning_table.py, logits_vs_vocab.png.
#   here, once:   bash bench/fetch_wheels.sh          (Liger-Kernel and Cut Cross-Entropy wheels into .whl/)
#   GPU machine:  OUT=DIR bash bench/gpu_check.sh     (the device tool: carry [".whl"], timeout_s 600)
#   CPU dry run (tests/bench/test_bench_suite.py): SGA_BENCH_SMOKE=1 OUT=DIR bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
START_S=$SECONDS
STEPS=(setup cuda_tests planted engine sweep logits linear pack)
declare -A BUDGET_S=([setup]=30 [cuda_tests]=120 [planted]=30 [engine]=75 [sweep]=90 [logits]=70 [linear]=65 [pack]=10)
BUDGET_TOTAL_S=510
KILL_GRACE_S=10
SWEEP_STARTUP_S=25  # the sweep's Python start, floors and last variant: its own budget is its share less this

OUT=${OUT:-/tmp/sga_gpu_check}
SMOKE=${SGA_BENCH_SMOKE:-0}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SGA_BENCH_RESULTS="$WORK"
CUDA_TESTS="tests/kernels/test_smoothed_ga_cuda.py tests/kernels/test_linear_smoothed_ga.py tests/kernels/test_token_loss.py
    tests/kernels/test_linear_chunk_loop.py tests/engine/test_trainer_cuda.py"
BENCH_SELECT=${SGA_BENCH_SELECT:-}
TIME_SCALE=1
SWEEP_FLAGS="--plant-broken"  # two broken variants in the first case: the summary shows they are caught
if [ "$SMOKE" = 1 ]; then
    # the interpreter and spawned memory probes on a shared CPU; 0 makes every limit the 5 s minimum (a test of the
    # timeouts and of the packing after each step)
    TIME_SCALE=${SGA_GPU_CHECK_TIME_SCALE:-3}
    # the CPU dry run: nothing installed, kernels in Triton's interpreter, tiny shapes, the alternatives that run here
    export TRITON_INTERPRET=1
    BENCH_SELECT=${BENCH_SELECT:-"ours or eager or materialized"}  # the logits and linear benchmarks
    SWEEP_FLAGS="$SWEEP_FLAGS --smoke"
fi
declare -A STEP_NOTE=()
declare -A STEP_EXIT=()
STOPPED=""

step_limit() {  # seconds step $1 may run: to the end of its share in the cumulative schedule, less the kill grace
    local end=0 step
    for step in "${STEPS[@]}"; do
        end=$(( end + BUDGET_S[$step] ))
        [ "$step" = "$1" ] && break
    done
    local left=$(( end * TIME_SCALE - (SECONDS - START_S) - KILL_GRACE_S ))
    echo $(( left < 5 ? 5 : left ))
}

last_line() { grep -v '^\s*$' "$1" 2>/dev/null | tail -1; }

run_step() {  # run_step NAME LOG COMMAND...: the command under its limit, its note recorded, then everything packed
    local name=$1 log=$2 limit began status
    shift 2
    limit=$(step_limit "$name")
    began=$SECONDS
    echo "== $name (limit $limit s)"
    # in the background and waited for, so that a signal to this script is handled at once (on_signal); timeout
    # puts itself and the command into a process group of their own, which on_signal can stop
    CURRENT_STEP=$name
    STEP_RUNNING=1
    timeout -k "$KILL_GRACE_S" "$limit" "$@" > "$log" 2>&1 < /dev/null &
    STEP_PID=$!
    wait "$STEP_PID"
    status=$?
    STEP_RUNNING=0
    STEP_PID=""
    CURRENT_STEP="the pause after $name"
    STEP_EXIT[$name]=$status
    if [ $status -eq 124 ] || [ $status -eq 137 ]; then
        STEP_NOTE[$name]="TIMED OUT after $(( SECONDS - began )) s (limit $limit s, exit $status): later rows missing"
    else
        STEP_NOTE[$name]="exit $status after $(( SECONDS - began )) s (limit $limit s)"
    fi
    echo "   ${STEP_NOTE[$name]}"
    pack
    return $status
}

planted_verdict() {
    local summary status=${STEP_EXIT[planted]:-}
    summary=$(last_line "$WORK/cuda_tests_planted_defect.log")
    if [ -z "$status" ]; then
        echo "not run yet"
    elif [ "$status" -eq 1 ] && echo "$summary" | grep -q failed; then
        echo "caught: $summary"
    elif echo "$summary" | grep -q "skipped" && ! echo "$summary" | grep -q passed; then
        echo "not run (no CUDA device): $summary"
    else
        echo "NOT CAUGHT (exit $status): $summary"
    fi
}

floors_of() {  # floors_of [FILE]: the floors each benchmark process measured (only FILE's with an argument)
    [ -f "$WORK/floors.jsonl" ] && python3 -c "
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if len(sys.argv) < 3 or sys.argv[2] in r['files']:
        print(f\"floors of {' '.join(r['files'])}: copy {r['copy_GBps']:.0f} GB/s (read + write), \"
              f\"bf16 {r['bf16_TFLOPs']:.3g} TFLOP/s, fp32 {r['fp32_TFLOPs']:.3g} TFLOP/s\")
" "$WORK/floors.jsonl" "$@" 2>&1
}

bench_section() {  # bench_section TITLE STEP LOG TABLE [FILE]: exit note, floors, ratio table, skips and failures
    echo "== $1: ${STEP_NOTE[$2]:-not run yet}"
    [ -n "${5:-}" ] && floors_of "$5"
    if [ -s "$4" ]; then cat "$4"; elif [ -f "$3" ]; then tail -5 "$3"; fi
    [ -f "$3" ] && grep -E "^(SKIPPED|FAILED|ERROR)" "$3" | head -20
}

floors_section() {
    echo "== floors (each process measures its own: after a warm-up, the best of 5 batches of 50 operations)"
    [ -f "$WORK/sweep.log" ] && grep -m1 "copy" "$WORK/sweep.log" | sed 's/^/gpu_sweep.py: /'
    floors_of
}

summary() {
    echo "== budget: $(( SECONDS - START_S )) s of $(( BUDGET_TOTAL_S * TIME_SCALE )) s elapsed; shares (s):" \
        "$(for s in "${STEPS[@]}"; do printf '%s %s, ' "$s" $(( BUDGET_S[$s] * TIME_SCALE )); done)"
    for step in "${STEPS[@]}"; do
        [ "$step" = pack ] || echo "   $step: ${STEP_NOTE[$step]:-not run yet}"
    done
    [ -n "$STOPPED" ] && echo "== STOPPED: $STOPPED"
    echo "== device"; cat "$WORK/device.txt" 2>/dev/null
    floors_section
    echo "== CUDA tests: ${STEP_NOTE[cuda_tests]:-not run yet}: $(last_line "$WORK/cuda_tests.log")"
    [ -f "$WORK/cuda_tests.log" ] && grep -E "^(FAILED|ERROR|SKIPPED)" "$WORK/cuda_tests.log" | head -30
    echo "== CUDA logits tests against a halved gradient: $(planted_verdict)"
    echo "== kernel sweep: ${STEP_NOTE[sweep]:-not run yet}"
    [ -f "$WORK/sweep.log" ] && grep -m1 "copy" "$WORK/sweep.log"
    if [ -s "$WORK/sweep_table.txt" ]; then cat "$WORK/sweep_table.txt"; elif [ -f "$WORK/sweep.log" ]; then tail -5 "$WORK/sweep.log"; fi
    bench_section "engine SGA step" engine "$WORK/bench_engine.log" "$WORK/engine_table.txt"
    bench_section "logits benchmark" logits "$WORK/bench_logits.log" "$WORK/logits_table.txt" test_bench_smoothed_ga.py
    bench_section "fused linear benchmark" linear "$WORK/bench_linear.log" "$WORK/linear_table.txt" test_bench_linear.py
}

pack() {  # tables from the rows so far, then tuning_table.py, results.tar.gz and summary.txt, each replaced whole
    local name
    for name in engine logits linear; do
        [ -s "$WORK/$name.jsonl" ] && python3 bench/report.py "$WORK/$name.jsonl" > "$WORK/${name}_table.txt" 2>&1
    done
    [ -f "$WORK/tuning_table.py" ] && cp "$WORK/tuning_table.py" "$OUT/tuning_table.py"
    tar -czf "$OUT/results.tar.gz.part" -C "$WORK" . && mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
    summary > "$OUT/summary.txt.part" 2>&1  # last: a summary that names a step comes with its logs in the tarball
    mv "$OUT/summary.txt.part" "$OUT/summary.txt"
}
STEP_PID=""
STEP_RUNNING=0
CURRENT_STEP=setup
on_signal() {  # TERM / INT: stop the running step's process group, record it, exit (the EXIT trap packs)
    STOPPED="interrupted by a signal during $CURRENT_STEP"
    if [ "$STEP_RUNNING" = 1 ]; then
        local pid=${STEP_PID:-$!}  # $!: the signal came between the step's start and the assignment
        # timeout's own process group (timeout and the command); timeout alone if it has not made its group yet
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
        STEP_NOTE[$CURRENT_STEP]="INTERRUPTED by a signal (the step's processes were sent TERM)"
    fi
    exit 143
}
SITE=""
trap 'pack; rm -rf "$WORK" ${SITE:+"$SITE"}' EXIT
trap on_signal TERM INT

# ---- setup: the alternatives' wheels, the project, the import check, the device and package versions
SETUP_BEGAN=$SECONDS
if [ "$SMOKE" != 1 ]; then
    if compgen -G ".whl/*.whl" > /dev/null; then
        SITE=$(mktemp -d)  # a fresh folder of this run's own (never a shared path such as /tmp/site)
        timeout -k 5 30 python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl \
            > "$WORK/wheels.log" 2>&1 && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "no .whl/*.whl: run bash bench/fetch_wheels.sh here and carry .whl" > "$WORK/wheels.log"
    fi
    # the project: an editable install (needs setuptools >= 64 there); else a staging folder that lays the package
    # out as installed (sga/ with kernels/sga_kernels/ as sga/kernels), first on PYTHONPATH
    if ! timeout -k 5 60 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
            > "$WORK/install.log" 2>&1; then
        mkdir -p "$WORK/staged/sga"
        ln -s "$ROOT"/sga/* "$WORK/staged/sga/" && ln -s "$ROOT/kernels/sga_kernels" "$WORK/staged/sga/kernels"
        export PYTHONPATH="$WORK/staged${PYTHONPATH:+:$PYTHONPATH}"
        echo "editable install failed (above); using the staged package in $WORK/staged" >> "$WORK/install.log"
    fi
fi
# the single point of failure: the package must import from this checkout, also from bench/ (where the source
# folder sga/ is not on the path and only the install can provide sga.kernels); one process also reports the device
IMPORT_CHECK='import os, sys, torch, triton, sga, sga.kernels
print("sga.kernels from", os.path.realpath(sga.kernels.__file__))
print("torch", torch.__version__, "triton", triton.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
for module in (sga, sga.kernels):
    path = os.path.realpath(module.__file__)
    if not path.startswith(os.path.realpath(sys.argv[1]) + os.sep):
        sys.exit(f"{module.__name__} imported from {path}, not from the checkout {sys.argv[1]}")'
if ! (cd bench && timeout -k 5 60 python3 -c "$IMPORT_CHECK" "$ROOT") >> "$WORK/install.log" 2>&1; then
    STOPPED="import sga.kernels fails after the install (or imports another copy); the install log follows"
    STEP_NOTE[setup]="STOPPED after $(( SECONDS - SETUP_BEGAN )) s"
    cp "$WORK/install.log" "$WORK/device.txt"
    cat "$WORK/install.log"
    exit 1
fi
{ if command -v nvidia-smi > /dev/null; then nvidia-smi 2>&1 | head -15; else echo "nvidia-smi: not on this machine"; fi
  grep -E "^(sga.kernels from|torch )" "$WORK/install.log"
  echo "-- packages (bench/alternatives.py: version and path, or the import error)"
  (cd bench && timeout -k 5 45 python3 alternatives.py)
  echo "-- wheels: $(last_line "$WORK/wheels.log")"
} > "$WORK/device.txt" 2>&1
STEP_NOTE[setup]="done after $(( SECONDS - SETUP_BEGAN )) s"
cat "$WORK/device.txt"
pack

# ---- the CUDA tests, then the logits ones against a planted defect (they must fail)
run_step cuda_tests "$WORK/cuda_tests.log" python3 -m pytest -q -rsfE --durations=15 -p no:cacheprovider -m cuda $CUDA_TESTS
run_step planted "$WORK/cuda_tests_planted_defect.log" env SGA_PLANTED_DEFECT=halve_gradient \
    python3 -m pytest -q -rsfE -p no:cacheprovider -m cuda tests/kernels/test_smoothed_ga_cuda.py
echo "   CUDA logits tests against a halved gradient: $(planted_verdict)"

# ---- the benchmarks: rows are written as each case finishes (the goals' shapes and phase first, ours first)
BENCH_ARGS=(-q -rsfE -p no:cacheprovider --benchmark-only --benchmark-columns=median,min,rounds)
run_step engine "$WORK/bench_engine.log" env -C bench python3 -m pytest "${BENCH_ARGS[@]}" test_bench_engine.py
[ -n "$BENCH_SELECT" ] && BENCH_ARGS+=(-k "$BENCH_SELECT")  # the smoke run's selection: not the engine's Liger skip
SWEEP_BUDGET_S=$(( BUDGET_S[sweep] * TIME_SCALE - SWEEP_STARTUP_S ))
SWEEP_BUDGET_S=$(( SWEEP_BUDGET_S < 5 ? 5 : SWEEP_BUDGET_S ))
run_step sweep "$WORK/sweep.log" python3 bench/gpu_sweep.py --out "$WORK" --budget-s "$SWEEP_BUDGET_S" $SWEEP_FLAGS
run_step logits "$WORK/bench_logits.log" env -C bench python3 -m pytest "${BENCH_ARGS[@]}" test_bench_smoothed_ga.py
run_step linear "$WORK/bench_linear.log" env -C bench python3 -m pytest "${BENCH_ARGS[@]}" test_bench_linear.py
[ -s "$WORK/logits.jsonl" ] && timeout -k 5 "$(step_limit pack)" python3 bench/report.py "$WORK/logits.jsonl" \
    --plot "$OUT/logits_vs_vocab.png" > /dev/null 2>&1
pack
cat "$OUT/summary.txt"
ls -l "$OUT"
