#!/usr/bin/env bash
# Runs the Bazel build offline: Debian's bazel-bootstrap (Bazel 4.2.3), the local
# stand-ins of WORKSPACE, and the project's venv as the Python toolchain.
#
#   tools/bazel_test.sh          build every target; run the pure-Python tests
#                                (untagged: the BUILD sync test, ...)
#   tools/bazel_test.sh --all    also run the TensorFlow tests (tag "tf"; slow:
#                                each pays a TensorFlow import in its own process)
#   tools/bazel_test.sh //:test_datasets ...   run the given targets
#
# The interpreter is $TF_BILEVEL_PYTHON, else the active `python` (the venv), and
# must have the project's dependencies and pytest. Installs bazel-bootstrap with
# apt-get when `bazel` is missing (needs root and a working `apt-get update`).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

if ! command -v bazel >/dev/null; then
  echo "bazel_test: installing Debian's bazel-bootstrap"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bazel-bootstrap >/dev/null
  echo "bazel_test: install took $(( $(date +%s) - start )) s"
fi

python=${TF_BILEVEL_PYTHON:-$(command -v python || command -v python3)}
python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python")  # absolute, symlink kept (venv)
if ! "$python" -c "import pytest" 2>/dev/null; then
  echo "bazel_test: $python has no pytest; set TF_BILEVEL_PYTHON to the project's venv python" >&2
  exit 2
fi

case "${1:-}" in
  "") targets=(//...); filter=(--test_tag_filters=-tf) ;;
  --all) targets=(//...); filter=() ;;
  *) targets=("$@"); filter=() ;;
esac

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
bazel test --repo_env=TF_BILEVEL_PYTHON="$python" ${filter[@]+"${filter[@]}"} "${targets[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [[ "${CI:-}" == true ]]; then
  bazel shutdown  # no Bazel server left running after CI
fi

# One plain closing line, as pytest prints it.
passed=$(grep -cE '^//\S+ +(\(cached\) )?PASSED' "$log" || true)
failed=$(grep -cE '^//\S+ +(FAILED|TIMEOUT|NO STATUS|FLAKY)' "$log" || true)
echo "bazel test took $(( $(date +%s) - start )) s (bazel-bootstrap $(dpkg-query -W -f="\${Version}" bazel-bootstrap 2>/dev/null), python $python)"
echo "bazel: $passed passed, $failed failed"
exit "$status"
