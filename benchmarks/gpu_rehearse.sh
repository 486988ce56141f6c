#!/usr/bin/env bash
# `make gpu-rehearse`: both GPU jobs' dry runs on this CPU machine, set up the way the README's two
# device-tool runs set them up, so a lease never finds a version mismatch first. What it reproduces:
#   - that machine's Python minor version (3.12) and, pinned at the versions it was seen with
#     (device tool, KINDS.md, 2026-11), torch 2.11.0 (its CUDA build, which runs on the CPU here),
#     numpy 2.5.2, onnx 1.23.1 and onnxruntime 1.30.0; its other packages at their newest, in a
#     venv outside the repo;
#   - each run's copy of the repo as the device tool sends it: tracked and untracked-not-ignored
#     files, plus that run's carried folders only (train: data/; serve: data-test/, .whl/ and .gpu/),
#     within the 64 MiB a run carries;
#   - the serve run's environment: the wheels installed by `pip install --no-index --no-deps
#     --target`, then PYTHONPATH (the train run has neither, as on the lease);
#   - both machines the serve run can find: a fresh one (no hand-off: the published model) and the
#     warm one the train run left its best arm on (`--handoff` / `--from-train`: a git-ignored folder
#     that a warm machine keeps between calls), the second run with that folder copied across;
#   - the next draw: the train run again (one arm), on empty torch.compile caches, starting warm from
#     the compile cache the serve run brought back, as gpu-cache/ will hold it.
# It does not reproduce a GPU: the CUDA-only lines (CUDA graphs, bf16 autocast, NVML) and the
# Triton kernels torch.compile generates there still run first on the lease (the train dry run
# compiles its first arm with inductor for the CPU and only traces the others). Cost: ~4 GB of downloads into the venv the first time (torch's CUDA
# libraries), then about 5 minutes on 2 cores. Run nothing heavy beside it.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${GPU_REHEARSE_VENV:-$HOME/.cache/quicknet/gpu-rehearse-venv}

is_312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }

python=
for candidate in "${GPU_REHEARSE_PYTHON:-}" python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if [[ -n "$candidate" ]] && is_312 "$candidate"; then python=$candidate; break; fi
done
[[ -n "$python" ]] || { echo "gpu-rehearse: no working Python 3.12 (set GPU_REHEARSE_PYTHON)" >&2; exit 2; }
for need in data/cifar10_jpeg.npz data-test/cifar10_test_jpeg.npz .whl .gpu/bin/hey; do
    [[ -e "$repo/$need" ]] || { echo "gpu-rehearse: $need is missing: run make gpu-data gpu-wheels" >&2; exit 2; }
done

if [[ -x "$venv/bin/python3" ]] && ! is_312 "$venv/bin/python3"; then
    echo "gpu-rehearse: $venv is not a Python 3.12 venv; making it again" >&2
    rm -rf "$venv"
fi
[[ -x "$venv/bin/python3" ]] || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check torch==2.11.0 numpy==2.5.2 onnx==1.23.1 \
    onnxruntime==1.30.0 pillow tqdm matplotlib grpcio protobuf prometheus-client httpx uvloop nvidia-ml-py

work=$(mktemp -d /tmp/gpu-rehearse-XXXXXX)
trap 'rm -rf "$work/train-repo" "$work/serve-repo" "$work/site" "$work"/inductor-*' EXIT
copy_repo() {  # $1: destination; the rest: the folders that run carries
    local dest=$1
    shift
    mkdir -p "$dest"
    (cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 cp -d --parents -t "$dest" && cp -r "$@" "$dest/")
    local bytes
    bytes=$(du -sb "$dest" | cut -f1)  # what the device tool sends: at most 64 MiB
    ((bytes <= 64 << 20)) || { echo "gpu-rehearse: $dest is $bytes bytes, over the 64 MiB a run carries" >&2; exit 1; }
}
export PATH="$venv/bin:$PATH" PYTHONUNBUFFERED=1
python3 -c 'import sys, torch; print(f"rehearsing under Python {sys.version.split()[0]}, torch {torch.__version__}")'

copy_repo "$work/train-repo" data
# Every arm at once, each its own process started by `python -m quicknet.build.gpu_train` (so the repo
# must be importable from the arms too); the job exits non-zero unless every arm ends "done".
# torch.compile's on-disk caches as on a fresh machine (TORCHINDUCTOR_CACHE_DIR: this one's own are warm).
(cd "$work/train-repo" && TORCHINDUCTOR_CACHE_DIR="$work/inductor-cold" python3 -m quicknet gpu-train --dry-run \
    --data data/cifar10_jpeg.npz --out "$work/OUT/train" --handoff .gpu-handoff --compile-cache gpu-cache)
python3 - "$work/OUT/train" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
files = [p for p in out.rglob("*") if p.is_file()]
doc = json.loads((out / "results.json").read_text())
problems = [f"{len(files)} files (at most 8)"] if len(files) > 8 else []
problems += [f"{p} is {p.stat().st_size} bytes" for p in files if p.stat().st_size > 16 << 20]
problems += [f"arm {n}: {a.get('state')} {a.get('error', '')}" for n, a in doc["arms"].items() if a.get("state") != "done"]
print(f"gpu-rehearse: train dry run, every arm: {doc['job_seconds']} s (issue 26: under 120)")
problems += [f"every arm's dry run took {doc['job_seconds']} s, past 120"] if doc["job_seconds"] >= 120 else []
sys.exit(f"gpu-rehearse: train dry run: {problems}" if problems else 0)
EOF

copy_repo "$work/serve-repo" data-test .whl .gpu
cd "$work/serve-repo"
python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$work/site" .whl/*.whl
serve() {  # $1: where its results go; the README's serve run, dry
    PYTHONPATH="$work/site" python3 -m benchmarks.gpu_serve --dry-run --data data-test/cifar10_test_jpeg.npz --out "$1" --from-train .gpu-handoff
}
# A compiled variant or a fused engine step that failed is recorded, not raised (on the lease it must
# not cost the rest): here it must fail the rehearsal. The fused engine is gated from the carried data
# (on 8 test images here) and names what it was built from: the published model.onnx on a fresh
# machine; on the warm one the folded weights of the train run's best arm, and that arm's checkpoint.
check() {  # $1: results.json; $2: the model file the engine names; $3: the checkpoint's SHA-256 or ""
    python3 - "$@" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
problems = [v for v in doc["variants"] if "error" in v]
fused = doc.get("fused", {})
gate, source = fused.get("build", {}).get("gate", {}), fused.get("source", {})
if "error" in fused or gate.get("images") != 8 or source.get("file") != sys.argv[2] or source.get("checkpoint_sha256", "") != sys.argv[3]:
    problems.append({"fused": fused.get("error"), "gate": gate, "source": source, "weights": doc.get("weights")})
sys.exit(f"gpu-rehearse: serve dry run ({sys.argv[1]}): {problems}" if problems else 0)
EOF
}
serve "$work/OUT/serve-fresh"
check "$work/OUT/serve-fresh/results.json" model.onnx ""
cp -r "$work/train-repo/.gpu-handoff" .  # what the warm machine kept from the train run
serve "$work/OUT/serve"
check "$work/OUT/serve/results.json" model.folded.pt "$(python3 -c 'import json; print(json.load(open(".gpu-handoff/handoff.json"))["checkpoint_sha256"])')"
# ... and brought back the train run's torch.compile artifacts, within the device tool's 8 files
python3 - "$work/OUT/serve" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
cache = json.loads((out / "results.json").read_text()).get("compile_cache")
files = [p for p in out.rglob("*") if p.is_file()]
if not isinstance(cache, dict) or not (out / cache["file"]).is_file() or len(files) > 8:
    sys.exit(f"gpu-rehearse: serve dry run: compile cache {cache}, {len(files)} files")
EOF
# ... which the next draw's train run, kept in gpu-cache/, starts warm from: on a machine whose caches
# are empty, every graph its first arm compiles comes from that zip (one arm: ~40 s more here).
cp "$work"/OUT/serve/torch-compile-cache.*.zip "$work/train-repo/gpu-cache/"
(cd "$work/train-repo" && TORCHINDUCTOR_CACHE_DIR="$work/inductor-warm" python3 -m quicknet gpu-train --dry-run \
    --arms quicknet --data data/cifar10_jpeg.npz --out "$work/OUT/train-warm" --compile-cache gpu-cache)
python3 - "$work/OUT/train-warm" <<'EOF'
import json, pathlib, sys
doc = json.loads((pathlib.Path(sys.argv[1]) / "results.json").read_text())
counters = doc["arms"]["quicknet"].get("compile_counters", {})
if not isinstance(doc.get("compile_cache_loaded"), dict) or not counters.get("inductor_hits") or counters.get("inductor_misses"):
    sys.exit(f"gpu-rehearse: warm train dry run: {doc.get('compile_cache_loaded')}, {counters}")
EOF
echo "gpu-rehearse: both dry runs passed; results in $work/OUT"
