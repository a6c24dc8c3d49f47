#!/bin/sh
# Offline stand-in: Bazel's coverage tools are downloaded from the network, which
# this project's machines do not reach, so `bazel coverage` is not supported.
echo "remote_coverage_tools stand-in: bazel coverage is not available offline" >&2
exit 1
