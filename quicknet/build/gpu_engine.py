"""The offline compile stage for the GPU: a folded model → a fused engine file for this GPU, gated.

The role TensorRT plays in the design (its package cannot be installed here): built once on the
target GPU, it records what it was built for, and a version publishes it only after it scored on
the 10k test split within 0.1 point of the checkpoint. Steps, each bounded by `time_limit_s`:

1. pack the folded graph for the kernels (`quicknet.fused.engine.pack`);
2. compile every candidate tile configuration at once, one process per core (Triton compiles in
   one thread and holds the GIL: ~1-3 s a kernel, ~50 kernels; in parallel, ~15 s on 16 cores);
3. time each layer's candidates at a small batch and a large one and keep the fastest (a layer
   still untimed when the time is up keeps its first candidate: slower, never wrong);
4. check the engine against the folded model in fp32 on the same device (random images: max
   |Δlogit|, top-1 agreement), and, given the labelled test split, score it (the gate);
5. write `model.fused.<gpu>.sm<cc>.zip` (`quicknet.fused.engine`'s format) with the compiled kernels.

`attach` publishes a built engine into the next version of the model it was built from, refusing
one whose gate did not pass. Tied by the name and SHA-256 of the version's model file it was
packed from (`model.onnx` for a published version), or by the trained weights behind both: an
engine built on the GPU from a training checkpoint (the serve run's `--from-train`) names that
checkpoint's SHA-256, and attaches to the version whose `model.onnx` was exported from it
(`exported_from` in its metadata; the export checked it against that checkpoint), the engine file
then naming that `model.onnx` (the file a server packs the weights from) and keeping what it was
gated with.

On a CPU (the tests, the dry runs) the same steps run with Triton's interpreter
(`TRITON_INTERPRET=1`): nothing to compile, timings meaningless, arithmetic exact.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from quicknet import store
from quicknet.errors import BuildError
from quicknet.fused import engine as fe

KIND = "fused-gpu"  # the artifact kind in metadata.json
MAX_TOP1_LOSS = 0.001  # FP16: within 0.1 point of the checkpoint, as every FP16/FP32 artifact
CHECK_IMAGES = 256
TUNE_BATCHES = {"small": 4, "large": 256}
MAX_FILE_BYTES = 16 << 20  # a file a GPU run brings back


def build(
    spec: dict,
    out_dir: Path,
    *,
    source: dict,
    reference: Callable | None = None,
    test_split: tuple[np.ndarray, np.ndarray] | None = None,
    reference_top1: float | None = None,
    time_limit_s: float = 120.0,
    tune_batches: dict[str, int] | None = None,
    check_images: int = CHECK_IMAGES,
    log: Callable[[str], None] = print,
) -> tuple[Path, dict]:
    """(artifact path, engine.json) for `spec` on this machine's GPU (the interpreter on a CPU).

    `source`: the model file `spec` was read from, `{"file", "sha256"}` and whatever else names it:
    the engine carries no weights, a server packs them from that file of the version at load;
    `reference`: the folded model in fp32 on this device (uint8 NHWC → logits), for the check;
    `test_split`: (images, labels) to score the engine on; `reference_top1`: the checkpoint's top-1
    on that split (else the reference's own score on it is used)."""
    import torch

    if not {"file", "sha256"} <= set(source):
        raise ValueError(f"source names the model file and its SHA-256, not {source}")
    started = time.monotonic()
    deadline = started + time_limit_s
    here = fe.current_identity()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layers, arrays = fe.pack(spec)
    configs = fe.default_configs(layers)
    net = fe.FusedNet(layers, arrays, configs, device)
    stages: dict = {}

    t0 = time.monotonic()
    if device == "cuda":
        stages["precompile"] = precompile(layers, arrays, deadline - 20)
    stages["precompile_s"] = round(time.monotonic() - t0, 1)
    log(f"gpu-engine: precompiled in {stages['precompile_s']} s")

    t0 = time.monotonic()
    tuning = tune(net, tune_batches or TUNE_BATCHES, deadline - 10, device)
    configs = {size: [t["chosen"] for t in rows] for size, rows in tuning.items()}
    net.configs = configs
    stages["tune_s"] = round(time.monotonic() - t0, 1)
    log(f"gpu-engine: tuned in {stages['tune_s']} s")

    doc: dict = {"built_for": here, "source": source, "layers": layers, "configs": configs}
    doc["small_batch"] = fe.SMALL_BATCH
    doc["tuning"] = {
        size: [{k: v for k, v in t.items() if k != "chosen"} for t in rows] for size, rows in tuning.items()
    }
    if reference is not None:
        doc["check"] = check(net, reference, check_images, device)
        log(f"gpu-engine: check {doc['check']}")
    if test_split is not None:
        doc["gate"] = gate(net, reference, test_split, reference_top1, device)
        log(f"gpu-engine: gate {doc['gate']}")
    doc["compile_seconds"] = round(time.monotonic() - started, 1)
    doc["stages"] = stages
    if device == "cuda":  # the kernels of the configurations the engine runs, not every candidate tuned
        net.compiled.clear()
        with torch.inference_mode():
            for size, batch in (("small", 1), ("large", fe.SMALL_BATCH + 1)):
                net(torch.zeros((batch, 32, 32, 3), dtype=torch.uint8, device=device), configs[size])
    cache_dir = _cache_dir_or_none()
    kept = {key for key in net.compiled if cache_dir and (cache_dir / key).is_dir()}
    doc["kernels"] = {"compiled": len(net.compiled), "packed": len(kept)}  # a shortfall is a lookup gone wrong
    path = fe.write_artifact(out_dir / fe.artifact_name(here), doc, cache_dir, kept)
    if path.stat().st_size > MAX_FILE_BYTES:  # what a GPU run can bring back; without kernels it compiles at load
        doc["kernels_dropped"] = f"{path.stat().st_size} bytes with them"
        doc["kernels"]["packed"] = 0
        path = fe.write_artifact(path, doc, None, set())
    log(f"gpu-engine: wrote {path.name} ({path.stat().st_size / 2**20:.1f} MiB, kernels {doc['kernels']})")
    return path, doc


def _cache_dir_or_none() -> Path | None:
    return None if os.environ.get("TRITON_INTERPRET") == "1" else fe.triton_cache_dir()


# --- 2. compile every candidate in parallel ---------------------------------------------------------


def _candidates(layers: list[dict]) -> list[tuple[int, dict]]:
    seen = []
    for size in ("small", "large"):
        for i, layer in enumerate(layers):
            if layer["kind"] != "head":
                seen += [(i, c) for c in fe.candidate_configs(layer, size == "small") if (i, c) not in seen]
    return seen


def precompile(layers: list[dict], arrays: dict, deadline: float) -> dict:
    """Compile every candidate kernel into Triton's cache from a pool of processes, so the timing
    step loads instead of compiling. Best effort: a failure here costs time later, not the build."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, wait

    jobs = _candidates(layers)
    workers = max(1, min(len(jobs), (os.cpu_count() or 2) - 1))
    shapes = {k: (v.shape, str(v.dtype)) for k, v in arrays.items()}
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_compile_one, layers, shapes, i, c) for i, c in jobs]
            done, late = wait(futures, timeout=max(1.0, deadline - time.monotonic()))
            for f in late:
                f.cancel()
        errors = [str(f.exception()) for f in done if f.exception() is not None]
    except Exception as e:  # a pool that cannot start (no spawn, no memory): compile on first use instead
        return {"kernels": len(jobs), "error": f"{type(e).__name__}: {e}"}
    return {"kernels": len(jobs), "workers": workers, "late": len(late), "errors": errors[:3]}


def _compile_one(layers: list[dict], shapes: dict, index: int, cfg: dict) -> None:
    """In a pool process: launch one layer once at batch 1 with `cfg` (compiles it into the cache)."""
    import torch

    arrays = {k: np.zeros(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}
    net = fe.FusedNet(layers, arrays, {}, "cuda")
    x = _layer_input(layers, index, 1, "cuda")
    net.run_layer(index, layers[index], cfg, x, 1)
    torch.cuda.synchronize()


# --- 3. time each layer's candidates ------------------------------------------------------------------


def _layer_input(layers: list[dict], index: int, n: int, device: str):
    import torch

    layer = layers[index]
    if layer["kind"] == "stem":
        return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, device=device)
    return torch.randn((n, layer["h"], layer["h"], layer["cin"]), device=device).to(torch.float16)


def _time_ms(fn, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=20))
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def tune(net: fe.FusedNet, batches: dict[str, int], deadline: float, device: str) -> dict[str, list[dict]]:
    """Per batch class and layer: each candidate's time (ms) and the fastest (`chosen`)."""
    import torch

    out: dict[str, list[dict]] = {}
    for size, batch in batches.items():
        rows = []
        for i, layer in enumerate(net.layers):
            if layer["kind"] == "head":
                rows.append({"layer": i, "kind": "head", "chosen": None})
                continue
            candidates = fe.candidate_configs(layer, size == "small")
            x = _layer_input(net.layers, i, batch, device)
            times, errors = [], {}
            for j, cfg in enumerate(candidates):
                if time.monotonic() > deadline and times:
                    break
                run = functools.partial(net.run_layer, i, layer, cfg, x, batch)
                try:
                    with torch.inference_mode():
                        times.append(_time_ms(run, device))
                except Exception as e:  # a tile this GPU cannot launch (shared memory, registers): not chosen
                    if j == 0:
                        raise  # the first candidate is every layer's fallback: without it there is no engine
                    times.append(float("inf"))
                    errors[j] = f"{type(e).__name__}: {e}"[:200]
            best = int(np.argmin(times))
            ms = [round(t, 4) if np.isfinite(t) else None for t in times]
            rows.append({"layer": i, "kind": layer["kind"], "batch": batch, "ms": ms})
            rows[-1] |= {"errors": errors} if errors else {}
            rows[-1]["chosen"] = candidates[best]
        out[size] = rows
    return out


# --- 4. check and gate ---------------------------------------------------------------------------------


def _logits(fn, images: np.ndarray, device: str, batch: int = 1000) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).to(device)
            out.append(fn(x).float().cpu().numpy())
    return np.concatenate(out)


def check(net: fe.FusedNet, reference: Callable, n: int, device: str) -> dict:
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    got, want = _logits(net, images, device), _logits(reference, images, device)
    return {
        "images": n,
        "max_abs_logit_delta": float(np.abs(got - want).max()),
        "logit_scale": float(np.abs(want).max()),
        "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
    }


def gate(net, reference, split: tuple[np.ndarray, np.ndarray], reference_top1: float | None, device: str) -> dict:
    images, labels = split
    top1 = float((_logits(net, images, device).argmax(1) == labels).mean())
    if reference_top1 is None:
        reference_top1 = float((_logits(reference, images, device).argmax(1) == labels).mean())
    return {
        "images": len(labels),
        "top1": top1,
        "checkpoint_top1": reference_top1,
        "max_loss": MAX_TOP1_LOSS,
        "passed": len(labels) >= 10000 and top1 >= reference_top1 - MAX_TOP1_LOSS,
    }


# --- publishing ----------------------------------------------------------------------------------------


def engine_source(mv: store.ModelVersion) -> dict:
    """What an engine built from `mv` names as its source: the version's weights file (what the eager
    engine serves and a server packs the fused engine's weights from) and, where the version records
    it, the checkpoint behind that file (`attach` takes either)."""
    fname = mv.weights_file
    if fname not in mv.metadata["files"]:
        raise BuildError(f"{mv.name} v{mv.version} has no model file the engines read (artifact 'torch' or 'onnx')")
    source = {"model": mv.name, "version": mv.version, "file": fname, "sha256": mv.metadata["files"][fname]["sha256"]}
    if mv.metadata.get("exported_from", {}).get("sha256"):
        source["checkpoint_sha256"] = mv.metadata["exported_from"]["sha256"]
    return source


def holds_weights(meta: dict, doc: dict) -> bool:
    """The engine `doc` was built from the weights of the version whose metadata is `meta`: its model
    file (by name and SHA-256), or the checkpoint that file was exported from (`exported_from`)."""
    if not fe.not_built_from(doc, meta.get("files", {})):
        return True
    exported_from = meta.get("exported_from", {}).get("sha256")
    return bool(exported_from) and doc.get("source", {}).get("checkpoint_sha256") == exported_from


def attach(root: Path, name: str, version: int | None, engine: Path) -> store.ModelVersion:
    """The next version of `name`: `version`'s files and metadata plus `engine`, as artifact `fused-gpu`.
    Refused (one line) unless the engine was built from that version's model file (the one it names,
    by SHA-256: a server packs its weights from it) or from the checkpoint that file was exported
    from (then the published copy names the version's file), and passed its gate on the full 10k
    test split within 0.1 point of that version's checkpoint."""
    source = store.get_version(root, name, version)
    store.verify_files(source)
    meta = source.metadata
    doc = fe.read_doc(engine)
    weights_from = doc.get("source", {})
    if not holds_weights(meta, doc):
        raise BuildError(
            f"refusing to publish {engine.name}: it was not built from {name} v{source.version} "
            f"(it names {weights_from.get('file')!r}); build it on the GPU with `python -m "
            "benchmarks.gpu_engine --store <a store whose default is that version>`, or from the "
            "checkpoint that version was exported from"
        )
    # the version's own model file, when the engine was built from the checkpoint behind it
    rebind = engine_source(source) if fe.not_built_from(doc, meta["files"]) else None
    g = doc.get("gate") or {}
    ckpt = meta.get("accuracy", {}).get("checkpoint", {}).get("top1")
    if not g.get("passed") or g.get("images", 0) < 10000 or ckpt is None or g["top1"] < ckpt - MAX_TOP1_LOSS:
        raise BuildError(
            f"refusing to publish {engine.name}: its gate on the 10k test split did not pass "
            f"(top-1 {g.get('top1')} on {g.get('images', 0)} images, checkpoint {ckpt})"
        )
    with tempfile.TemporaryDirectory() as tmp:
        files = [source.file(f) for f in meta["files"]]
        staged = Path(tmp) / engine.name
        if rebind:
            fe.rebound(engine, staged, rebind)
        else:
            staged.write_bytes(engine.read_bytes())
        fresh = {k: v for k, v in meta.items() if k not in ("name", "version", "files")}
        fresh["artifacts"] = {**meta.get("artifacts", {}), KIND: engine.name}
        fresh["accuracy"] = {**meta.get("accuracy", {}), KIND: {"top1": g["top1"], "images": g["images"]}}
        gates = {**meta.get("accuracy_gates", {})}
        gates[KIND] = {"max_loss": MAX_TOP1_LOSS, "top1": g["top1"], "checkpoint_top1": ckpt}
        fresh["accuracy_gates"] = gates
        fresh["gpu_engine"] = {
            "built_for": doc["built_for"],
            "built_from": weights_from,
            "compile_seconds": doc.get("compile_seconds"),
        }
        fresh["derived_from"] = {"version": source.version, "why": "the fused GPU engine built for it"}
        return store.publish(root, name, [*files, staged], fresh)
