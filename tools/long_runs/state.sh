#!/usr/bin/env bash
# The long runs' state survives a new machine only in git. `save` copies each run folder of
# RUNS_DIR (default /work/runs) into STORE_DIR (default results/long_runs/, to be committed);
# `restore` copies a saved folder back where the run folder is missing, so the queue scripts
# resume where the last snapshot stood; `stop` ends the queue scripts and their programs (a
# running or paused run is never saved: its files may be half written).
#
# Saved: everything but the output-folder lock and the per-trial weights of KerasTuner's
# RandomSearch and BayesianOptimization (the program only reads their best hyperparameters;
# Hyperband's are kept: a promoted trial starts from them). A save replaces the snapshot only
# as a whole (swap at the end), and refuses to drop a finished method (a resume/<row>.json the
# snapshot has and the run folder lacks: a run started without `restore`) unless --force.
#
# Usage: bash tools/long_runs/state.sh save|restore|stop [--force] [RUN ...]
#        (default RUN: every run folder, online_hpo and omniglot_kanji for save)
set -euo pipefail
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
repo=$(cd "$(dirname "$0")/../.." && pwd)
runs_dir=$(absolute "${RUNS_DIR:-/work/runs}")
store=$(absolute "${STORE_DIR:-$repo/results/long_runs}")
usage="usage: state.sh save|restore|stop [--force] [RUN ...]"
action=${1:?$usage}
shift
case $action in save|restore|stop) ;; *) echo "state.sh: unknown action $action; $usage" >&2; exit 2 ;; esac
force=0
if [ "${1:-}" = --force ]; then force=1; shift; fi
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  case $action in
    save|stop) names=(online_hpo omniglot_kanji) ;;
    restore)
      for folder in "$store"/*/; do
        name=$(basename "$folder")
        case $name in
          *.tmp) continue ;;
          *.old) name=${name%.old}; [ -d "$store/$name" ] && continue ;;  # an interrupted save's last snapshot
        esac
        [ -d "$folder" ] && names+=("$name")
      done
      [ ${#names[@]} -gt 0 ] || echo "state: no run folder in $store" ;;
  esac
fi

in_use() {  # the run's program holds the lock on <run>/.lock while it runs (also when paused)
  [ -e "$1/.lock" ] && ! flock -n "$1/.lock" true
}

save() {
  local name=$1 run=$runs_dir/$1 saved=$store/$1
  [ -d "$run" ] || { echo "state: no $run, skipped"; return; }
  if in_use "$run"; then
    echo "state.sh: $run is in use ($(cat "$run/.lock")); stop it first: bash tools/long_runs/state.sh stop" >&2
    exit 1
  fi
  # An interrupted swap leaves only <name>.old: that is the last snapshot.
  if [ ! -d "$saved" ] && [ -d "$saved.old" ]; then mv "$saved.old" "$saved"; fi
  rm -rf "$saved.tmp" "$saved.old"
  if [ -d "$saved/resume" ] && [ $force -eq 0 ]; then
    local row lost=()
    for row in "$saved"/resume/*.json; do
      [ -e "$row" ] || continue
      case $row in *.record.json) continue ;; esac
      [ -e "$run/resume/$(basename "$row")" ] || lost+=("$(basename "$row")")
    done
    if [ ${#lost[@]} -gt 0 ]; then
      echo "state.sh: $run lacks ${#lost[@]} finished method(s) of the snapshot (${lost[*]}): restore the snapshot" \
           "first (move $run away, then state.sh restore $name), or save with --force to drop them" >&2
      exit 1
    fi
  fi
  mkdir -p "$saved.tmp"
  tar -C "$run" --exclude=./.lock \
      --exclude='./tuner/*/random_search/*/checkpoint.weights.h5' \
      --exclude='./tuner/*/bayesian/*/checkpoint.weights.h5' -cf - . | tar -C "$saved.tmp" -xf -
  if [ -d "$saved" ]; then mv "$saved" "$saved.old"; fi
  mv "$saved.tmp" "$saved"
  rm -rf "$saved.old"
  echo "state: saved $name ($(du -sh "$saved" | cut -f1))"
}

restore() {
  local name=$1 run=$runs_dir/$1 saved=$store/$1
  if [ ! -d "$saved" ] && [ -d "$saved.old" ]; then saved=$saved.old; fi
  [ -d "$saved" ] || { echo "state.sh: no snapshot $store/$name" >&2; exit 1; }
  if [ -e "$run" ]; then echo "state: $run exists, left as it is"; return; fi
  rm -rf "$run.tmp" && mkdir -p "$run.tmp"
  tar -C "$saved" -cf - . | tar -C "$run.tmp" -xf -
  mv "$run.tmp" "$run"
  echo "state: restored $name into $run"
}

stop() {
  local name=$1 run=$runs_dir/$1
  pkill -f "tools/long_runs/${name}_queue.sh" || true
  pkill -f -- "--output_dir=$run( |$)" || true
  pkill -CONT -f -- "--output_dir=$run( |$)" || true  # a paused program acts on TERM once continued
  for _ in $(seq 120); do in_use "$run" || { echo "state: $name stopped"; return; }; sleep 1; done
  echo "state.sh: $run is still in use after 120 s ($(cat "$run/.lock"))" >&2
  exit 1
}

for name in "${names[@]}"; do
  "$action" "$name"
done
