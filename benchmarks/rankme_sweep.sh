#!/usr/bin/env bash
# Cookbook Table 3 on our own runs: a SimCLR temperature sweep, then `selfsup compare` (RankMe vs linear probe).
# Usage: bash benchmarks/rankme_sweep.sh [OUT_DIR] [extra key=value for every run ...]
# Runs the five trainings in parallel (meant for a GPU: on an H200 all five took 3 min together); on a CPU set
# PARALLEL=1 and expect ~10 min per run with the default recipe (add epochs=3 for a quick look).
set -euo pipefail
out=${1:-runs/rankme-sweep}; shift || true
parallel=${PARALLEL:-5}
py=${PYTHON:-python}
quick=(eval.report=false eval.mlp=false eval.rotation=false eval.lidar_images=0)
temps=(0.05 0.1 0.2 0.5 1.0)
mkdir -p "$out"
for t in "${temps[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do sleep 5; done
  echo "training simclr.temperature=$t -> $out/t$t (log $out/t$t.log)"
  "$py" -m selfsup train simclr "simclr.temperature=$t" "out=$out/t$t" "${quick[@]}" "$@" > "$out/t$t.log" 2>&1 &
done
wait
"$py" -m selfsup compare $(for t in "${temps[@]}"; do echo "$out/t$t"; done) --out "$out/compare"
