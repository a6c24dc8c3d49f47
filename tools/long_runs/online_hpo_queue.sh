#!/usr/bin/env bash
# Issue #16's benchmark, queued so that one seed of every method finishes first (a complete,
# single-seed picture early), then seeds 1 and 2. Every step resumes per (network, method, seed);
# rerun this script to continue. Usage: bash tools/long_runs/online_hpo_queue.sh [OUTPUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-/work/runs/online_hpo}
run() { nice -n 15 python -m experiments.online_hpo --output_dir="$out" --networks=cnn,cnn_bn "$@"; }
for seeds in 0 0,1,2; do
  for methods in default_cosine krmd_wd forward_forget forward random_search hyperband bilevel default; do
    run --methods=$methods --seeds=$seeds || echo "queue: $methods seeds $seeds exited $?"
  done
done
# Every method and seed is finished: this pass only reads their rows back and writes the whole
# results.json, table and figures (each run above wrote them for its own methods only).
run --seeds=0,1,2
