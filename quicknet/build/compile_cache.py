"""torch.compile's work carried from one GPU draw to the next: the train run's warm start.

The first draw's one gpu-train arm spent 46 s of its first epoch compiling (2026-12-04; three arms
compile at once now, sharing the cores). What an arm compiled is saved at its end (`save`:
PyTorch's portable "Mega-Cache", `torch.compiler.save_cache_artifacts`: Inductor's graphs with
their Triton kernels bundled, AOTAutograd's graphs, autotuning results; instant, it serializes what
is in memory, what was read from the cache included) into a folder beside the train run's hand-off,
with `built-for.json` (`mark`): the machine it is for. The serve run of the same draw zips that
folder (`bundle`: `torch-compile-cache.<gpu>.zip`, the train run's own 8 files being taken), it is
kept in the tracked `gpu-cache/`, and the next draw's parent loads the zip built for its machine
before the arms start (`load`: `torch.compiler.load_cache_artifacts` writes the artifacts into this
machine's on-disk caches, which the arms, started after, read like their own). Dynamo still traces;
Inductor's code generation, Triton's compiles and the autotuning are what a hit skips. The caches
are keyed by, among other things, the GPU model and the torch and Triton versions, so a zip built
anywhere else would only miss: it is not loaded, and the results say why.

Nothing here fails a run: what went wrong is a line in its results, and the arms compile cold.
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

FOLDER = "compile-cache"  # beside the hand-off: <arm>.bin and BUILT_FOR
BUILT_FOR = "built-for.json"
ZIP_GLOB = "torch-compile-cache*.zip"


def identity(env: dict) -> dict:
    """What compiled artifacts are specific to, from `gpu_probe.environment()`."""
    return {
        "gpu": env.get("gpu"),
        "torch": env.get("torch"),
        "triton": env.get("triton"),
        "cuda_runtime": env.get("cuda_runtime"),
        "python": ".".join(str(env.get("python", "")).split(".")[:2]),
    }


def mark(folder: Path, env: dict) -> str | None:
    """Say which machine the artifacts saved into `folder` are for (before the arms save them).
    None when done, else why not (then nothing should be saved there: no run could tell it is its)."""
    from quicknet.fsutil import write_text_atomic

    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / BUILT_FOR, json.dumps(identity(env), indent=2) + "\n")
    except OSError as e:
        return f"not saved: {folder / BUILT_FOR}: {type(e).__name__}: {e}"[:300]
    return None


def save(path: Path) -> dict:
    """What torch.compile built in this process, into `path` (one arm's blob). What was saved, or
    the error: never raises."""
    from quicknet.fsutil import atomic_write

    try:
        import torch

        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return {"error": "torch.compile left nothing to save"}
        blob, info = saved
        with atomic_write(path) as f:
            f.write(blob)
        return {"bytes": len(blob), "artifacts": {kind: len(keys) for kind, keys in info.artifacts.items()}}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def counters() -> dict:
    """How this process's torch.compile went: graphs Inductor took from its cache or compiled, and
    the same for AOTAutograd's (forward + backward) cache. A warm start shows as hits, no misses."""
    from torch._dynamo.utils import counters as dynamo_counters

    return {
        "inductor_hits": dynamo_counters["inductor"]["fxgraph_cache_hit"],
        "inductor_misses": dynamo_counters["inductor"]["fxgraph_cache_miss"],
        "aot_autograd_hits": dynamo_counters["aot_autograd"]["autograd_cache_hit"],
        "aot_autograd_misses": dynamo_counters["aot_autograd"]["autograd_cache_miss"],
    }


def bundle(folder: Path, out: Path, limit: int = 16 << 20) -> dict | str:
    """The blobs in `folder` and the machine they are for as one zip in `out`, named for its GPU:
    what was written, or why nothing was (none saved, no `built-for.json`, larger than `limit`, the
    most a file may be to come back from the GPU machine)."""
    from quicknet.store import slug

    blobs = sorted(folder.glob("*.bin"))
    if not blobs:
        return f"none in {folder}"
    try:
        built_for = json.loads((folder / BUILT_FOR).read_text())
        gpu = built_for.get("gpu") or "cpu"
    except (OSError, ValueError, AttributeError) as e:  # a later run could not tell whether it is for it
        return f"not brought back: {BUILT_FOR} unreadable ({type(e).__name__})"
    path = out / f"torch-compile-cache.{slug(gpu)}.zip"
    try:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(BUILT_FOR, json.dumps(built_for, indent=2) + "\n")
            for blob in blobs:
                zf.write(blob, blob.name)
    except OSError as e:
        path.unlink(missing_ok=True)
        return f"not brought back: {type(e).__name__}: {e}"
    size = path.stat().st_size
    if size > limit:  # nothing, rather than a failed transfer
        path.unlink()
        return f"{size} bytes zipped, over the {limit} a file may have: not brought back"
    return {"file": path.name, "bytes": size, "built_for": built_for, "arms": {b.stem: b.stat().st_size for b in blobs}}


def describe(counters: dict) -> str:
    """`counters()` in the words the results use."""
    return f"{counters['inductor_hits']} graphs from the cache, {counters['inductor_misses']} compiled"


def load(source: Path, env: dict) -> dict | str:
    """Load the artifacts in `source` (a zip from `bundle`, or a folder of them: the first built for
    this machine) into this machine's torch.compile caches. What was loaded, or why nothing was: a
    zip that is missing, built for another machine or unreadable means compiling cold."""
    try:
        zips = [z for z in (sorted(source.glob(ZIP_GLOB)) if source.is_dir() else [source]) if z.is_file()]
    except OSError as e:
        return f"{source} unreadable ({type(e).__name__}): compiling cold"
    if not zips:
        return f"none in {source}: compiling cold"
    here = identity(env)
    others = []
    for path in zips:
        t = time.perf_counter()
        try:
            with zipfile.ZipFile(path) as zf:
                built_for = json.loads(zf.read(BUILT_FOR))
                if built_for != here:
                    others.append(f"{path.name} ({built_for.get('gpu')}, torch {built_for.get('torch')})")
                    continue
                loaded = _load_blobs(zf)
        except Exception as e:  # a zip damaged in any way zipfile or zlib can say: compiling cold
            others.append(f"{path.name} (unreadable: {type(e).__name__}: {e})"[:300])
            continue
        return {"file": path.name, "built_for": built_for, "arms": loaded, "seconds": round(time.perf_counter() - t, 2)}
    machine = f"{here['gpu']}, torch {here['torch']}"
    return f"none built for this machine ({machine}) among {'; '.join(others)}: compiling cold"


def _load_blobs(zf: zipfile.ZipFile) -> dict[str, dict | str]:
    """Each arm's blob in `zf` into this machine's caches: the artifacts it held, or why it did not
    load (the others still do)."""
    import torch

    loaded: dict[str, dict | str] = {}
    for name in sorted(n for n in zf.namelist() if n.endswith(".bin")):
        arm = name[: -len(".bin")]
        try:  # torch logs and returns None for a blob it cannot read
            info = torch.compiler.load_cache_artifacts(zf.read(name))
            loaded[arm] = {k: len(v) for k, v in info.artifacts.items()} if info else "unreadable"
        except Exception as e:
            loaded[arm] = f"{type(e).__name__}: {e}"[:300]
    return loaded
