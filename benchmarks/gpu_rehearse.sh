#!/usr/bin/env bash
# `make gpu-rehearse`: both GPU jobs' dry runs on this CPU machine, set up the way the GPU machine
# runs them, so a lease never finds a version mismatch first. What it reproduces:
#   - that machine's own Python and packages, at the versions it was seen with (device tool,
#     KINDS.md, 2026-11: Python 3.12, torch 2.11.0+cu130, numpy 2.5.2, onnx 1.23.1, onnxruntime
#     1.30.0; torch is its CUDA build, which runs on the CPU here), in a venv outside the repo;
#   - the repo as the device tool copies it: tracked and untracked-not-ignored files, plus the
#     folders the README's run commands carry (data/, .whl/, .gpu/);
#   - the serving stack installed exactly as the serve run does (`pip install --no-index --no-deps
#     --target`, then PYTHONPATH).
# It does not reproduce a GPU: the CUDA-only lines (CUDA graphs, bf16 autocast, NVML) still run
# first on the lease. Cost: ~4 GB of downloads into the venv the first time (torch's CUDA
# libraries), then about 2.5 minutes on 2 cores. Run nothing heavy beside it.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${GPU_REHEARSE_PYTHON:-python3.12}
venv=${GPU_REHEARSE_VENV:-$HOME/.cache/quicknet/gpu-rehearse-venv}
work=$(mktemp -d /tmp/gpu-rehearse-XXXXXX)
trap 'rm -rf "$work/repo" "$work/site"' EXIT

for need in data/cifar10_jpeg.npz .whl .gpu/bin/hey; do
    [[ -e "$repo/$need" ]] || { echo "gpu-rehearse: $need is missing: run make gpu-data gpu-wheels" >&2; exit 2; }
done
command -v "$python" >/dev/null || { echo "gpu-rehearse: no $python (set GPU_REHEARSE_PYTHON)" >&2; exit 2; }

if [[ ! -x "$venv/bin/python3" ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check torch==2.11.0 numpy==2.5.2 onnx==1.23.1 \
    onnxruntime==1.30.0 pillow tqdm matplotlib grpcio protobuf prometheus-client httpx uvloop nvidia-ml-py

mkdir -p "$work/repo"
(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work/repo" \
    && cp -r data .whl .gpu "$work/repo/")
cd "$work/repo"
export PATH="$venv/bin:$PATH" PYTHONUNBUFFERED=1
python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$work/site" .whl/*.whl
export PYTHONPATH="$work/site"
python3 -c 'import sys, torch; print(f"rehearsing under Python {sys.version.split()[0]}, torch {torch.__version__}")'

python3 -m quicknet_cli gpu-train --dry-run --data data/cifar10_jpeg.npz --out "$work/OUT/train"
python3 -m benchmarks.gpu_serve --dry-run --out "$work/OUT/serve"
# A compiled variant that failed is recorded, not raised (on the lease it must not cost the rest):
# here it must fail the rehearsal.
python3 - "$work/OUT/serve/results.json" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
failed = [v for v in doc["variants"] if "error" in v]
sys.exit(f"gpu-rehearse: compiled variants failed: {failed}" if failed else 0)
EOF
echo "gpu-rehearse: both dry runs passed; results in $work/OUT"
