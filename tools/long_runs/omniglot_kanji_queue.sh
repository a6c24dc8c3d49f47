#!/usr/bin/env bash
# Issue #19's Table 4 run on the kanji strokes set: 1-RMD, 10-RMD, full RMD and the short horizon,
# 2000 hyper-iterations each, resuming per method from a checkpoint every 250 hyper-iterations.
# Rerun to continue. The interleaved timing is a separate quiet run (RESULTS.md).
# Usage: bash tools/long_runs/omniglot_kanji_queue.sh [OUTPUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-/work/runs/omniglot_kanji}
nice -n 15 python -m experiments.omniglot --dataset=kanji_strokes --truncate=1,10,full \
  --hyper_iterations=2000 --timing_rounds=0 --output_dir="$out"
