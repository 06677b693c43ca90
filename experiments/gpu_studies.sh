#!/usr/bin/env bash
# The GPU half of docs/studies.md: every run of the studies and sweeps, trained in parallel
# processes on one GPU (they are launch-bound, so one process cannot fill it): the studies by
# `experiments/studies.py --jobs`, the sweeps by `sigreg sweep --jobs`, the ablations through
# xargs. (The recorded results were trained with xargs for every run; same configs.)
# Timings of parallel runs are not comparable: costs come from benchmarks/regularizer_cost.py.
#
#   DATA_DIR=/usr/share/datasets PARALLEL=15 bash experiments/gpu_studies.sh
# (DATA_DIR holds fashion-mnist/; the results recorded in experiments/*-gpu-h100.* came from
# an H100 with PARALLEL 13 for the studies and 15 for the sweeps.)
set -euo pipefail
export PYTHONPATH=src
DATA_DIR=${DATA_DIR:-/usr/share/datasets}
PARALLEL=${PARALLEL:-15}
PY=${PYTHON:-python3}
S="device=cuda data_dir=$DATA_DIR amp=false"

# Ablations: 3 seeds each, trained through xargs (they are not part of a study or a sweep).
ablations() {
  for s in 0 1 2; do
    echo "--preset fmnist-mlp-weak --out runs/gpu-extra/weak-a0.1-k256-s$s --set $S alpha=0.1 sketch_dim=256 seed=$s"
    echo "--preset fmnist-mlp-vicreg --out runs/gpu-extra/vicreg-covonly-s$s --set $S vicreg_var_weight=0 seed=$s"
    echo "--preset fmnist-mlp-vicreg --out runs/gpu-extra/vicreg-varonly-s$s --set $S vicreg_cov_weight=0 seed=$s"
  done
}

$PY experiments/studies.py --out runs/gpu-studies --seeds 5 --set $S --no-progress --jobs "$PARALLEL"
ablations | xargs -P "$PARALLEL" -L 1 sh -c "$PY -m sigreg.train.cli train --no-progress \$0 \"\$@\" > /dev/null"
sweep() { $PY -m sigreg.train.cli sweep --preset "$1" --alpha "$2" --sketch-dim "$3" --seeds 3 \
            --out "$4" --jobs "$PARALLEL" --set $S --no-progress | tail -n 8; }
sweep fmnist-mlp-strong 0.01,0.03,0.1,0.3 16,64,256 runs/gpu-sweep-strong
sweep fmnist-mlp-weak 0.5 16,64 runs/gpu-sweep-weak-a0.5
sweep fmnist-mlp-weak 0.1 128,255 runs/gpu-sweep-weak-k
for d in runs/gpu-extra/*/; do
  echo "$d $($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['final_test_acc'])" "$d/summary.json")"
done
