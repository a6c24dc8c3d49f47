#!/usr/bin/env bash
# The long runs' state survives a new machine only in git: `save` copies each run folder of
# RUNS_DIR (default /work/runs) into STORE_DIR (default results/long_runs/, to be committed), `restore` copies it
# back where a folder is missing, so the queue scripts resume where the last snapshot stood.
# Excluded: output-folder locks, and KerasTuner's per-trial weights (a finished trial is known by
# its trial.json; an unfinished one restarts from its first epoch).
# Usage: bash tools/long_runs/state.sh save|restore [RUN ...]   (default: every run)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs_dir=${RUNS_DIR:-/work/runs}
store=${STORE_DIR:-results/long_runs}
action=${1:?usage: state.sh save|restore [RUN ...]}
shift
case $action in save|restore) ;; *) echo "state.sh: unknown action $action (save or restore)" >&2; exit 2 ;; esac
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  case $action in
    save) names=(online_hpo omniglot_kanji) ;;
    restore) for folder in "$store"/*/; do [ -d "$folder" ] && names+=("$(basename "$folder")"); done ;;
  esac
  [ ${#names[@]} -gt 0 ] || echo "state: no run folder in $store"
fi
excludes=(--exclude=.lock --exclude='*.weights.h5' --exclude='checkpoint.weights*' --exclude='__pycache__')
for name in "${names[@]}"; do
  case $action in
    save)
      [ -d "$runs_dir/$name" ] || { echo "state: no $runs_dir/$name, skipped"; continue; }
      rm -rf "$store/$name.tmp" && mkdir -p "$store/$name.tmp"
      tar -C "$runs_dir/$name" "${excludes[@]}" -cf - . | tar -C "$store/$name.tmp" -xf -
      rm -rf "$store/$name" && mv "$store/$name.tmp" "$store/$name"
      echo "state: saved $name ($(du -sh "$store/$name" | cut -f1))" ;;
    restore)
      if [ -e "$runs_dir/$name" ]; then echo "state: $runs_dir/$name exists, left as it is"; continue; fi
      mkdir -p "$runs_dir/$name"
      tar -C "$store/$name" -cf - . | tar -C "$runs_dir/$name" -xf -
      echo "state: restored $name into $runs_dir/$name" ;;
  esac
done
