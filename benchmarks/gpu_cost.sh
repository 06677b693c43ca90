#!/usr/bin/env bash
# The GPU cost targets (weak and strong against no regularizer), sized for one call of the
# device tool (10 minutes a command, 15 device-minutes a task, the machine's start included): the parts run most important first, each under
# the time left of BUDGET_S, and each leaves its result in OUT as soon as it ends, so a part cut
# short costs only itself. OUT receives at most 7 flat files (the tool returns 8); run
# directories and data go to SCRATCH.
#
#   device run:  bash benchmarks/gpu_cost.sh "$OUT"       (timeout_s 600, BUDGET_S 540)
#   here:        bash benchmarks/gpu_cost.sh [OUT]        (default OUT=runs/gpu-cost)
#
# Parts (PARTS, in this order by default):
#   cost      demo MLP, one training step per arm, eager: weak/none <= 1.5x  -> cost.json
#   overhead  ViT-sized step, bf16 autocast: weak/none <= 1.05x, strong/none <= 1.08x,
#             weak no slower than strong                                   -> overhead_amp.json
#   epochs    paper-vit-adamw-mix none/weak/strong, eager, 2 epochs of IMAGES random images in
#             CIFAR-100's official format (the machine has no internet): epoch 2's throughput
#             -> epochs.jsonl
#   compiled  the same with compile=true: a 50,000-image epoch <= 5 s        -> epochs.jsonl
#   cost-compiled  the demo MLP step with model and regularizer compiled     -> cost_compiled.json
# then summary.md (benchmarks/gpu_cost_summary.py): every ratio with its target and verdict,
# ready for benchmarks/RESULTS.md, and log.txt, everything printed.
#
# An epoch of 50,000 images is 50,000 / images_per_s of epoch 2 (the trainer times the training
# loop alone); IMAGES=50000 measures it directly when the budget allows. The seconds each part
# "needs" below are thresholds for skipping it, not measurements. For "before" numbers,
# BEFORE=<copy of an older commit> runs the same parts with that copy's src (and its benchmarks,
# when it has them) into OUT with a "before_" prefix; for the device tool, make the copy inside
# the repository, ignored, and carry it:
#   git archive 61bb749 src benchmarks | (mkdir -p .before && tar -x -C .before)
#   echo /.before/ >> .git/info/exclude     # then run with carry [".before"], BEFORE=.before
# Smoke test on a CPU (tiny sizes, nothing measured; tests/test_benchmarks_smoke.py runs it):
#   DEVICE=cpu QUICK=1 IMAGES=256 PARTS="cost epochs" \
#     EXTRA="num_test=64 model.dim=16 model.depth=1 model.heads=2" bash benchmarks/gpu_cost.sh /tmp/g9
set -uo pipefail  # not -e: a part that fails or runs out of time must not stop the others
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
OUT=$(mkdir -p "${1:-${OUT:-runs/gpu-cost}}" && cd "${1:-${OUT:-runs/gpu-cost}}" && pwd)
SCRATCH=${SCRATCH:-/tmp/gpu-cost}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-540}
IMAGES=${IMAGES:-20000}
PARTS=${PARTS:-cost overhead epochs compiled cost-compiled}
QUICK=${QUICK:+--quick}
EXTRA=${EXTRA:-}
BEFORE=${BEFORE:-}
export PY OUT SCRATCH DEVICE IMAGES EXTRA PYTHONUNBUFFERED=1
mkdir -p "$SCRATCH"
exec > >(tee -a "$OUT/log.txt") 2>&1
START=$SECONDS
cd "$ROOT"

# part NAME SECONDS_NEEDED COMMAND...: runs COMMAND with the time left, or says why it did not.
part() {
  local name=$1 need=$2 left
  shift 2
  left=$((BUDGET_S - (SECONDS - START)))
  if ((left < need)); then
    echo "== $name: skipped, ${left} s left of BUDGET_S=${BUDGET_S} (needs about ${need} s)"
    return 0
  fi
  echo "== $name ($((SECONDS - START)) s in, ${left} s left)"
  timeout "$left" "$@"
  local status=$?
  if ((status == 124)); then
    echo "== $name: out of time"
  elif ((status != 0)); then
    echo "== $name: failed, exit status $status"
  fi
}

# epochs TAG SRC COMPILE: the three arms' training runs; epoch 2 of each appended to epochs.jsonl.
epochs() {
  local tag=$1 src=$2 compile=$3 arm run
  for arm in none weak strong; do
    run="$SCRATCH/${tag}vit-$arm-compile-$compile"
    rm -rf "$run"  # a fresh run: older checkouts have no --overwrite
    # shellcheck disable=SC2086  # EXTRA is a list of key=value items
    PYTHONPATH="$src" $PY -m sigreg.train.cli train --preset "paper-vit-adamw-mix-$arm" \
      --out "$run" --no-progress \
      --set data_dir="$SCRATCH/data" epochs=2 num_train="$IMAGES" num_test=2000 device="$DEVICE" \
      compile="$compile" $EXTRA || return
    $PY benchmarks/gpu_cost_summary.py --collect "$run" --arm "$arm" --compile "$compile" \
      --tag "$tag" >>"$OUT/epochs.jsonl" || return
  done
}
export -f epochs  # run by `timeout bash -c` below

fake_data() {
  [ -d "$SCRATCH/data/cifar-100-python" ] && return
  $PY -c "import sys; from pathlib import Path; sys.path.insert(0, 'tests')
from _fake_datasets import write_cifar; write_cifar(Path('$SCRATCH/data'), 'cifar100', n=$IMAGES)"
}

# run_parts TAG SRC BENCH: every part of PARTS with library SRC and benchmark scripts in BENCH.
run_parts() {
  local tag=$1 src=$2 bench=$3 p
  for p in $PARTS; do
    case $p in
      cost) part "${tag}cost" 30 env PYTHONPATH="$src" $PY "$bench/regularizer_cost.py" \
        --device "$DEVICE" $QUICK --json "$OUT/${tag}cost.json" ;;
      overhead) part "${tag}overhead" 90 env PYTHONPATH="$src" $PY "$bench/overhead.py" \
        --device "$DEVICE" --amp $QUICK --json "$OUT/${tag}overhead_amp.json" ;;
      epochs) part "${tag}epochs" 120 bash -c 'epochs "$@"' _ "$tag" "$src" false ;;
      compiled) part "${tag}compiled" 200 bash -c 'epochs "$@"' _ "$tag" "$src" true ;;
      cost-compiled) part "${tag}cost-compiled" 90 env PYTHONPATH="$src" $PY \
        "$bench/regularizer_cost.py" --device "$DEVICE" --compile $QUICK \
        --json "$OUT/${tag}cost_compiled.json" ;;
      *) echo "== unknown part $p (cost, overhead, epochs, compiled, cost-compiled)" ;;
    esac
  done
}

echo "GPU cost parts: $PARTS; DEVICE=$DEVICE BUDGET_S=$BUDGET_S IMAGES=$IMAGES; $(git rev-parse --short HEAD 2>/dev/null)"
[[ " $PARTS " == *" epochs "* || " $PARTS " == *" compiled "* ]] && fake_data
run_parts "" "$ROOT/src" benchmarks
if [ -n "$BEFORE" ]; then
  bench="$BEFORE/benchmarks"
  [ -f "$bench/regularizer_cost.py" ] || bench=benchmarks
  run_parts before_ "$BEFORE/src" "$bench"
fi
$PY benchmarks/gpu_cost_summary.py "$OUT" | tee "$OUT/summary.md"
echo "== done in $((SECONDS - START)) s"
