#!/usr/bin/env bash
# The GPU evidence queue: one device call runs the most valuable GPU
# measurements not yet committed, in order, within BUDGET_S seconds of its own start, and
# leaves one results file per item in OUT (with provenance: sigreg version, git commit, the
# library's hash, torch, device, threads, date, the command). What is committed decides what
# runs next: an item whose complete results file is in DONE_DIR (experiments/gpu-queue/) is
# skipped, so the next slot continues where this one stopped.
#
# Items, in order (benchmarks/gpu_queue.py has the details):
#   gpu-cost            benchmarks/gpu_cost.sh's parts (the GPU cost targets) for the
#                       CURRENT library: gpu-cost-<hash of src/sigreg/*.py>.json; a change to
#                       those modules makes it due again. Parts left out for time: due again.
#   vit-full-lr1e-3     (b) the paper's ViT recipe on all of Fashion-MNIST (fmnist-vit-full-*),
#                       none / weak / strong / vicreg at once on the one GPU, lr 1e-3, seed 0,
#                       epochs = as many as fit (measured, see gpu_queue.py; at most MAX_EPOCHS)
#                       and only with at least VIT_MIN_S left: it gets a slot of its own, since
#                       every later item repeats its epoch count -> vit-full-lr1e-3.jsonl
#   vit-full-lr1e-3-s1, vit-full-lr1e-3-s2, vit-full-lr3e-4, vit-full-lr3e-3
#                       (c) more seeds, then the lrs either side, one a slot, same epochs
# A ViT results file has one JSON line per arm: state (finished / diverged / failed / cut: a
# cut one is run again), epochs and epochs done, final and best test accuracy, the per-epoch
# curves, timings, settings, command, config, the run's provenance.json and the data's sizes.
#
# The device call (the tool's `run`), from the repository root of the session's checkout:
#   once before:  mkdir -p .gpu-data/fashion-mnist &&
#                 cp /usr/share/datasets/fashion-mnist/*.gz .gpu-data/fashion-mnist/
#                 (30 MB; .gpu-data/ is ignored by .gitignore, so `carry` takes it along)
#   run:          command   bash benchmarks/gpu_queue.sh "$OUT"
#                 timeout_s 540          carry [".gpu-data"]
#   afterwards:   cp FILES_AT/gpu-cost-*.json FILES_AT/vit-full-*.jsonl experiments/gpu-queue/
#                 cp FILES_AT/queue-log.txt experiments/gpu-queue/log-$(date +%F).txt
#                 git add experiments/gpu-queue && git commit   (FILES_AT: the reply's files_at;
#                 a cp that matches nothing is fine: that item did not run)
# Without Fashion-MNIST (DATA_DIR, default .gpu-data, or its fashion-mnist/) the ViT items are
# refused with one line and the script exits 2 (gpu-cost still runs when due).
#
# OUT receives at most 7 files (the tool returns 8): queue-log.txt (everything printed) and one
# results file per item; run directories go to SCRATCH. Settings (environment):
#   BUDGET_S 500   DEVICE cuda   DATA_DIR .gpu-data   DONE_DIR experiments/gpu-queue
#   SCRATCH /tmp/gpu-queue   EXTRA ""  (--set items for every training run, gpu_cost's too)
#   EPOCHS (fixes the ViT epoch count)   MAX_EPOCHS 100   MIN_EPOCHS 3   VIT_MIN_S 400
#   MAX_ITEMS (run at most this many items)   PARTS, IMAGES, QUICK (gpu_cost.sh's)
# Smoke test on a CPU: tests/test_gpu_queue.py (tiny sizes, a fake Fashion-MNIST).
set -uo pipefail  # not -e: an item that fails must not stop the next one
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${1:-${OUT:-runs/gpu-queue}}" && cd "${1:-${OUT:-runs/gpu-queue}}" && pwd)
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-500}
max_items=${MAX_ITEMS:-99}
MAX_FILES=7
export OUT DEVICE=${DEVICE:-cuda} DATA_DIR=${DATA_DIR:-.gpu-data}
export DONE_DIR=${DONE_DIR:-$ROOT/experiments/gpu-queue} SCRATCH=${SCRATCH:-/tmp/gpu-queue}
export PYTHON=$PY PYTHONPATH=$ROOT/src PYTHONUNBUFFERED=1
# The command as the results record it: the effective settings, then the command line.
settings=$(for v in BUDGET_S DEVICE DATA_DIR DONE_DIR EXTRA EPOCHS MAX_EPOCHS MIN_EPOCHS \
  VIT_MIN_S MAX_ITEMS PARTS IMAGES QUICK; do [ -n "${!v:-}" ] && printf '%s=%q ' "$v" "${!v}"; done)
export QUEUE_COMMAND="${settings}bash benchmarks/gpu_queue.sh $*"
mkdir -p "$SCRATCH"
exec > >(tee -a "$OUT/queue-log.txt") 2>&1
START=$SECONDS
cd "$ROOT" || exit 1

left() { echo $((BUDGET_S - (SECONDS - START))); }

# gpu-cost: gpu_cost.sh with the time left, into SCRATCH; then its files as one results file.
run_gpu_cost() {
  local dir="$SCRATCH/gpu-cost" budget=$(($(left) - 10))
  rm -rf "$dir"
  export COST_COMMAND="BUDGET_S=$budget bash benchmarks/gpu_cost.sh $dir"
  BUDGET_S=$budget SCRATCH="$SCRATCH/gpu-cost" timeout $((budget + 30)) \
    bash benchmarks/gpu_cost.sh "$dir"
  $PY benchmarks/gpu_queue.py pack-cost "$dir"
}

echo "gpu queue: $QUEUE_COMMAND"
echo "$(date -u +%FT%TZ); $(git rev-parse --short HEAD 2>/dev/null || echo 'no git'); DONE_DIR=$DONE_DIR"
mapfile -t pending < <($PY benchmarks/gpu_queue.py pending)
data_ok=1
if [[ " ${pending[*]} " == *" vit-"* ]]; then
  $PY benchmarks/gpu_queue.py check-data || data_ok=0  # the one line, once, at the top
fi
ran=0
for item in "${pending[@]}"; do
  if ((ran >= max_items)); then
    echo "== $item: not run (MAX_ITEMS=$max_items)"; break
  fi
  if (($(left) < 30)); then  # too little for any item, even to say why it does not fit
    echo "== $item: not run ($(left) s left)"; break
  fi
  if (($(find "$OUT" -maxdepth 1 -type f | wc -l) >= MAX_FILES)); then
    echo "== $item: not run (OUT holds $MAX_FILES files, what the device tool returns)"; break
  fi
  case $item in
    gpu-cost)
      echo "== gpu-cost ($((SECONDS - START)) s in, $(left) s left)"
      run_gpu_cost ;;
    vit-*)
      ((data_ok)) || break  # refused above, in one line
      echo "== $item ($((SECONDS - START)) s in, $(left) s left)"
      $PY benchmarks/gpu_queue.py vit "$item" --left "$(left)" ;;
  esac
  ran=$((ran + 1))
done
((${#pending[@]})) || echo "== nothing left to run: every item's results are in $DONE_DIR"
echo "== done in $((SECONDS - START)) s; files in $OUT: $(cd "$OUT" && echo *)"
((data_ok)) || exit 2
