#!/bin/sh
# Build the TensorRT plan for this GPU if QUICKNET_PLAN_DIR has none, then become the server
# (exec: it gets SIGTERM directly and drains). `quicknet plan` is a no-op when the plan exists.
set -eu
quicknet plan --plan-dir "${QUICKNET_PLAN_DIR:-/plans}"
exec quicknet serve "$@"
