"""The fused GPU engine: QuickNet's folded graph packed for `kernels`, run, and kept as a file.

An engine is built once on the GPU it serves, like a TensorRT plan (`quicknet/build/gpu_engine.py` is
that build stage), and is one zip file, `model.fused.<gpu>.sm<cc>.zip`:

- `engine.json`: the layer plan, the tile configuration chosen on that GPU for each layer (one set
  for small batches, one for large), what it was built for (GPU name, compute capability, driver,
  torch, CUDA, Triton, and a digest of the kernels' source), the model file it came from (name and
  SHA-256), and its accuracy check;
- `triton-cache/<key>/...`: the kernels Triton compiled for those configurations on that GPU. Put
  back into Triton's cache before the first launch, they make loading a lookup instead of a
  ~20 s compile; if they do not match (they are keyed on Triton, the source and the GPU), Triton
  compiles again and nothing else changes.

No weights: like the torch engine, the fused one packs them at load from the version's own model
file (`pack`, the file the engine names, checked by its hash, the layer plan compared with the
one it was tuned for). The store keeps a model's weights once, and an engine is its kernels and
their plan: for the full quicknet ~1 MB (18 kernels compiled for sm_90, deflated) instead of ~8 MB
with a second copy of the weights in the kernels' layouts (7.1 MB).

A machine that differs in any recorded field gets the engine refused (`mismatch`): the service
says so in one line and serves the eager torch engine instead.

torch and triton are imported inside functions: the service imports this module only on a GPU
machine that has both, never on its CPU path.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from quicknet import nvml
from quicknet.errors import BuildError
from quicknet.store import slug

FORMAT = "quicknet-fused/2"  # /1 carried a copy of the weights
KERNELS_SOURCE = Path(__file__).with_name("kernels.py")
SMALL_BATCH = 16  # batches up to this use the "small" configs (more, smaller tiles), larger the "large"
# The kernels' grids put row tiles on CUDA's second axis (at most 65,535 programs: the stem's 1,024
# rows an image in 64-row tiles reach it at 4,096 images) and index in int32 (past 2**31 elements at
# ~8,192 images of the widest layer): the engine takes batches up to this, and the service is told.
MAX_BATCH = 2048
IDENTITY_KEYS = ("gpu", "compute_capability", "driver", "torch", "cuda", "triton", "kernels_sha256")


# --- the plan: the folded spec in the kernels' layouts ----------------------------------------------


def pack(spec: dict) -> tuple[list[dict], dict[str, np.ndarray]]:
    """(layers, arrays) from a folded spec (`quicknet.build.export.folded_spec`, or one read back from
    `model.onnx`): stem conv + activation, then separable blocks (depthwise 3x3, pointwise 1x1,
    activation, optionally an identity shortcut around the three, optionally a 2x2 max-pool), then
    global pooling and the classifier. Anything else raises BuildError in one line: this packs
    QuickNet and quicknet-res, not convolutional networks in general."""
    state = {
        k: np.asarray(v.float().numpy() if hasattr(v, "numpy") else v, dtype=np.float32)
        for k, v in spec["state_dict"].items()
    }
    specs = [(str(i), layer) for i, layer in enumerate(spec["layers"])]  # (state key under features., spec)
    arrays: dict[str, np.ndarray] = {
        "stem.scale": state["normalize.scale"].reshape(3),
        "stem.shift": state["normalize.shift"].reshape(3),
    }

    def take(op: str, **want) -> tuple[str, dict]:
        if not specs:
            raise BuildError(f"the folded graph ends where the fused engine expects {op}")
        i, layer = specs.pop(0)
        if layer["op"] != op or any(layer.get(k) != v for k, v in want.items()):
            raise BuildError(f"the fused engine cannot run layer {i} ({layer}): it expects {op} {want or ''}".strip())
        return i, layer

    def slopes(channels: int) -> np.ndarray:
        i, layer = specs.pop(0) if specs else (None, {"op": None})
        if layer["op"] == "prelu":
            return state[f"features.{i}.weight"].reshape(-1)
        if layer["op"] == "leaky_relu":
            return np.full(channels, layer["slope"], dtype=np.float32)
        raise BuildError(f"the fused engine expects an activation at layer {i}, not {layer['op']}")

    i, stem = take("conv", **{"in": 3, "kernel": 3, "padding": 1, "groups": 1})
    cout = stem["out"]
    weight = state[f"features.{i}.weight"]  # [out, 3, 3, 3] -> rows (ky, kx, channel)
    stem_w = np.zeros((32, cout), dtype=np.float32)
    stem_w[:27] = weight.transpose(2, 3, 1, 0).reshape(27, cout)
    arrays |= {
        "stem.w": stem_w.astype(np.float16),
        "stem.bias": state.get(f"features.{i}.bias", np.zeros(cout, np.float32)),
        "stem.slope": slopes(cout),
    }
    size = 32
    layers: list[dict] = [{"kind": "stem", "cout": cout, "h": size, "w": size}]
    cin = cout
    while specs:
        b = len(layers) - 1
        residual = specs[0][1]["op"] == "residual"
        if residual:  # quicknet-res: `x + block(x)`, the block's three layers in its place
            key, shortcut = specs.pop(0)
            inner = [(f"{key}.body.{j}", layer) for j, layer in enumerate(shortcut["layers"])]
            if len(inner) != 3:
                raise BuildError(f"the fused engine runs shortcuts around one separable block, not layer {key}")
            specs[:0] = inner
        i, _ = take("conv", **{"in": cin, "out": cin, "kernel": 3, "padding": 1, "groups": cin})
        dw = state[f"features.{i}.weight"].reshape(cin, 9)
        dw_bias = state.get(f"features.{i}.bias")
        pointwise = {"in": cin, "kernel": 1, "padding": 0, "groups": 1} | ({"out": cin} if residual else {})
        j, pw_layer = take("conv", **pointwise)
        cout = pw_layer["out"]
        pw = state[f"features.{j}.weight"].reshape(cout, cin)
        bias = state.get(f"features.{j}.bias", np.zeros(cout, np.float32)).copy()
        if dw_bias is not None:  # pw(dw(x) + b) = pw(dw(x)) + pw @ b
            bias += pw @ dw_bias
        arrays |= {
            f"b{b}.dw": np.ascontiguousarray(dw.T),
            f"b{b}.pw": np.ascontiguousarray(pw.T).astype(np.float16),
            f"b{b}.bias": bias.astype(np.float32),
            f"b{b}.slope": slopes(cout),
        }
        pool = bool(specs) and specs[0][1]["op"] == "maxpool"
        if pool:
            take("maxpool", kernel=2)
            if size % 2:
                raise BuildError(f"the fused engine pools even sizes only, not {size}")
        layers.append(
            {"kind": "separable", "cin": cin, "cout": cout, "h": size, "w": size, "pool": pool, "mean": False}
            | {"residual": residual}
        )
        size //= 2 if pool else 1
        cin = cout
    last = layers[-1]
    if last["kind"] != "separable" or last["pool"] or (size * size) & (size * size - 1):
        raise BuildError("the fused engine needs a last separable block, unpooled, on a power-of-two number of pixels")
    last["mean"] = True
    head_w = state["classifier.weight"]
    arrays |= {"head.w": head_w, "head.b": state["classifier.bias"]}
    layers.append({"kind": "head", "in": head_w.shape[1], "out": head_w.shape[0]})
    return layers, {k: np.ascontiguousarray(v) for k, v in arrays.items()}


# --- tile configurations ---------------------------------------------------------------------------


def candidate_configs(layer: dict, small: bool) -> list[dict]:
    """Tile shapes worth timing for one layer on a Hopper GPU. Few on purpose: each one is a compile
    (~1-2 s) per layer. Large batches want 128-row tiles and wide columns (fewer depthwise
    recomputes); small batches want many programs. MEAN needs tiles of whole images. Under Triton's
    interpreter (tests, dry runs) one huge tile: it runs programs one by one in numpy, where 1,024-row
    tiles are ~2x faster than 128-row ones, and its timings mean nothing."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        cin = _pow2_at_least(layer.get("cin", 32))
        return [
            {
                "BLOCK_M": 1024,
                "BLOCK_N": _pow2_at_least(layer["cout"]),
                "BLOCK_K": min(cin, 256) if layer["kind"] != "stem" else 32,
                "num_warps": 4,
                "num_stages": 2,
            }
        ]
    if layer["kind"] == "stem":
        shapes = [(64, 64, 32, 4, 2), (128, 128, 32, 8, 2)] if not small else [(32, 64, 32, 4, 2), (64, 64, 32, 4, 2)]
    elif small:
        shapes = [(32, 64, 64, 4, 2), (64, 64, 64, 4, 2), (64, 128, 64, 4, 3)]
    else:
        shapes = [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)]
    out = []
    for bm, bn, bk, warps, stages in shapes:
        cin = layer.get("cin", 32)
        if layer.get("mean") and bm % (layer["h"] * layer["w"]):
            bm = layer["h"] * layer["w"]  # whole images per tile
        cfg = {
            "BLOCK_M": bm,
            "BLOCK_N": min(bn, _pow2_at_least(layer["cout"])),
            "BLOCK_K": min(bk, _pow2_at_least(cin)),
        }
        cfg |= {"num_warps": warps, "num_stages": stages}
        if cfg not in out:
            out.append(cfg)
    return out


def _pow2_at_least(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


def default_configs(layers: list[dict]) -> dict[str, list[dict | None]]:
    """The first candidate per layer: what an engine runs before (or without) tuning."""
    return {
        size: [candidate_configs(layer, size == "small")[0] if layer["kind"] != "head" else None for layer in layers]
        for size in ("small", "large")
    }


# --- running it --------------------------------------------------------------------------------------


class FusedNet:
    """uint8 NHWC [N, 32, 32, 3] on the device → float32 logits [N, classes]: the stem kernel, one
    separable kernel per block, and the classifier as one matmul (`addmm`) on the pooled features."""

    def __init__(self, layers: list[dict], arrays: dict[str, np.ndarray], configs: dict, device: str):
        import torch

        self.torch = torch
        self.layers = layers
        self.configs = configs
        self.device = device
        self.w = {k: torch.from_numpy(np.array(v)).to(device) for k, v in arrays.items()}
        self.compiled: set[str] = set()  # Triton cache keys of the kernels launched (what an artifact keeps)

    def configs_for(self, n: int) -> list[dict | None]:
        return self.configs["small" if n <= SMALL_BATCH else "large"]

    def __call__(self, images, configs: list[dict | None] | None = None):
        n = images.shape[0]
        configs = configs or self.configs_for(n)
        x = None
        for index, (layer, cfg) in enumerate(zip(self.layers, configs, strict=True)):
            x = self.run_layer(index, layer, cfg, images if index == 0 else x, n)
        return x

    def run_layer(self, index: int, layer: dict, cfg: dict | None, x, n: int):
        import triton

        from quicknet.fused import kernels as k

        torch = self.torch
        w = self.w
        if layer["kind"] == "head":
            return torch.addmm(w["head.b"], x, w["head.w"].t())
        h, cout = layer["h"], layer["cout"]
        launch = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "num_warps": cfg["num_warps"]}
        launch["num_stages"] = cfg["num_stages"]
        grid = (triton.cdiv(cout, cfg["BLOCK_N"]), triton.cdiv(n * h * h, cfg["BLOCK_M"]))
        if layer["kind"] == "stem":
            out = torch.empty((n, h, h, cout), dtype=torch.float16, device=x.device)
            args = (x, w["stem.w"], w["stem.scale"], w["stem.shift"], w["stem.bias"], w["stem.slope"], out, n)
            compiled = k.stem_kernel[grid](*args, COUT=cout, H=h, W=h, K=k.STEM_K, **launch)
        else:
            b = f"b{index - 1}"
            if layer["mean"]:
                out = torch.empty((n, cout), dtype=torch.float32, device=x.device)
            else:
                side = h // 2 if layer["pool"] else h
                out = torch.empty((n, side, side, cout), dtype=torch.float16, device=x.device)
            args = (x, w[f"{b}.dw"], w[f"{b}.pw"], w[f"{b}.bias"], w[f"{b}.slope"], out, n)
            shape = {"CIN": layer["cin"], "COUT": cout, "H": h, "W": h, "POOL": layer["pool"], "MEAN": layer["mean"]}
            shape["RESIDUAL"] = layer["residual"]
            compiled = k.separable_kernel[grid](*args, **shape, BLOCK_K=cfg["BLOCK_K"], **launch)
        if key := cache_key(compiled):
            self.compiled.add(key)
        return out


def cache_key(compiled) -> str | None:
    """The folder of Triton's file cache that holds a compiled kernel (its metadata and machine code),
    or None in the interpreter. Not `compiled.hash`: Triton 3.6 names the folder by that hash in
    base32, and the hex name matched no folder, so engine files carried no kernels."""
    group = getattr(compiled, "metadata_group", None)
    return Path(next(iter(group.values()))).parent.name if group else None


# --- what it was built for -----------------------------------------------------------------------


def kernels_digest() -> str:
    return hashlib.sha256(KERNELS_SOURCE.read_bytes()).hexdigest()


def current_identity() -> dict:
    """This machine's GPU 0 and software, in the fields an engine records (`IDENTITY_KEYS`)."""
    import torch
    import triton

    ident = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}
    ident["kernels_sha256"] = kernels_digest()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        ident |= {
            "gpu": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "driver": nvml.driver_version(),
        }
    else:
        ident |= {"gpu": None, "compute_capability": None, "driver": None}
    return ident


def mismatch(built_for: dict, here: dict) -> list[str]:
    """What differs between the machine an engine was built for and this one ([] when it matches)."""
    return [
        f"{key} {built_for.get(key)!r} (here {here.get(key)!r})"
        for key in IDENTITY_KEYS
        if built_for.get(key) != here.get(key)
    ]


def not_built_from(doc: dict, files: dict) -> str | None:
    """Why the engine `doc` cannot take its weights from a version whose metadata lists `files`
    (name -> {"sha256"}), or None when it names one of them by name and SHA-256."""
    built_from = doc.get("source", {})
    if not built_from.get("file") or not built_from.get("sha256"):
        return "does not name the model file it was built from"
    if files.get(built_from["file"], {}).get("sha256") != built_from["sha256"]:
        return f"was built from another model file than this version's {built_from['file']!r}"
    return None


def artifact_name(identity: dict) -> str:
    cc = (identity.get("compute_capability") or "cpu").replace(".", "")
    return f"model.fused.{slug(identity.get('gpu') or 'cpu')}.sm{cc}.zip"


# --- the file ------------------------------------------------------------------------------------------


def write_artifact(path: Path, doc: dict, cache_dir: Path | None, keys: set[str]) -> Path:
    """The engine as one zip (see the module docstring); `keys` are the Triton cache entries to keep."""
    from quicknet.fsutil import atomic_write

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("engine.json", json.dumps({"format": FORMAT, **doc}, indent=2, default=str))
        for key in sorted(keys):
            entry = (cache_dir / key) if cache_dir else None
            if entry is None or not entry.is_dir():
                continue
            # A cache hit needs only the metadata and the machine code; the IRs (~1.5 MB a kernel,
            # the LLVM IR most of it) would take the file past 16 MiB with ~18 kernels.
            for f in sorted(entry.iterdir()):
                if f.suffix in (".json", ".cubin", ".hsaco") and not f.name.startswith("__grp__"):
                    zf.write(f, f"triton-cache/{key}/{f.name}")
    with atomic_write(path) as f:
        f.write(buffer.getvalue())
    return path


def rebound(path: Path, dest: Path, source: dict) -> Path:
    """A copy of the engine file `path` at `dest` naming `source` as the model file a server packs its
    weights from, the file it was built and gated with kept as `gated_with` (`gpu_engine.attach`:
    the same trained weights, exported as another file). Kernels and plan unchanged."""
    from quicknet.fsutil import atomic_write

    doc = read_doc(path)
    doc = {**doc, "source": source, "gated_with": doc.get("source")}
    buffer = io.BytesIO()
    with zipfile.ZipFile(path) as old, zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("engine.json", json.dumps(doc, indent=2, default=str))
        for item in old.infolist():
            if item.filename != "engine.json":
                zf.writestr(item, old.read(item))
    with atomic_write(dest) as f:
        f.write(buffer.getvalue())
    return dest


def read_doc(path: Path) -> dict:
    """`engine.json` alone (cheap: what the service reads to decide whether the engine fits here)."""
    try:
        with zipfile.ZipFile(path) as zf:
            doc = json.loads(zf.read("engine.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise BuildError(f"{path.name} is not a fused engine ({type(e).__name__}); rebuild it on the GPU") from None
    if doc.get("format") != FORMAT:
        raise BuildError(f"{path.name} is a {doc.get('format')!r} engine, not {FORMAT}; rebuild it on the GPU")
    return doc


def read_artifact(path: Path, cache_dir: Path | None) -> dict:
    """`engine.json`; the compiled kernels go into `cache_dir` (Triton's cache) first."""
    doc = read_doc(path)
    if cache_dir is not None:
        with zipfile.ZipFile(path) as zf:
            install_kernels(zf, cache_dir)
    return doc


def weights_for(doc: dict, spec: dict) -> dict[str, np.ndarray]:
    """The engine's arrays, packed from `spec` (the folded model read from the file the engine names);
    BuildError unless they make the layer plan the engine was tuned and compiled for."""
    layers, arrays = pack(spec)
    if json.loads(json.dumps(layers)) != doc.get("layers"):
        raise BuildError("the model's layers are not the ones the fused engine was built for; rebuild it on the GPU")
    return arrays


def install_kernels(zf: zipfile.ZipFile, cache_dir: Path) -> int:
    """The engine's compiled kernels into Triton's file cache, each with the group file Triton looks
    up (`__grp__<kernel>.json`, which names its files by absolute path, so it is written here, for
    this cache's location). Returns the kernels installed; ones already there are left as they are."""
    entries: dict[str, list[str]] = {}
    for name in zf.namelist():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "triton-cache" and all(_plain(p) for p in parts[1:]):
            entries.setdefault(parts[1], []).append(parts[2])
    for key, files in entries.items():
        folder = cache_dir / key
        metadata = [f for f in files if f.endswith(".json")]
        if len(metadata) != 1 or (folder / f"__grp__{metadata[0]}").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            (folder / f).write_bytes(zf.read(f"triton-cache/{key}/{f}"))
        group = {"child_paths": {f: str(folder / f) for f in files}}
        (folder / f"__grp__{metadata[0]}").write_text(json.dumps(group))  # last: Triton reads it as "complete"
    return len(entries)


def _plain(part: str) -> bool:
    return part not in ("", ".", "..") and "\\" not in part and "\0" not in part


def triton_cache_dir() -> Path:
    from triton import knobs

    return Path(knobs.cache.dir)
