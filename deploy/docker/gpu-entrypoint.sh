#!/bin/sh
# Build the TensorRT plans for this GPU that QUICKNET_PLAN_DIR lacks (every model's latest version,
# each in <model>/<version>/), then become the server (exec: it gets SIGTERM directly and drains).
# `quicknet plan` is a no-op for a plan that exists.
set -eu
quicknet plan --all --plan-dir "${QUICKNET_PLAN_DIR:-/plans}"
exec quicknet serve "$@"
