"""Helpers shared by the benchmarks: a store of untrained variants (speed does not depend on the
weights), timing loops, tables, and JSON results."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    from quicknet.build.gpu_probe import cpu_description

    return cpu_description()


def make_untrained_store(root: Path, variants: list[str], calibration: np.ndarray | None = None) -> Path:
    """Fold + export (and INT8-quantize) untrained variants into a store: speed is weight-independent.
    Each keeps the `config.json` its model ships with (its batch policy), so the benchmarks measure
    the service as it is served."""
    import torch

    from quicknet import store
    from quicknet.build import data
    from quicknet.build.compile import quantize_int8
    from quicknet.build.export import export_onnx
    from quicknet.build.fold import fold
    from quicknet.build.model import build_model

    torch.manual_seed(0)
    for name in variants:
        if store.list_versions(root, name):
            continue
        work = root / f".work-{name}"
        work.mkdir(parents=True, exist_ok=True)
        files = [export_onnx(fold(build_model(name).eval()), work / "model.onnx")]
        artifacts = {"onnx": "model.onnx"}
        if calibration is not None:
            files.append(quantize_int8(files[0], work / "model.int8.onnx", calibration))
            artifacts["onnx-int8"] = "model.int8.onnx"
        meta = {"labels": list(data.LABELS), "artifacts": artifacts, "accuracy": {}, "note": "untrained, for speed"}
        store.publish(root, name, files, meta)
        shipped_config = store.default_root() / name / store.MODEL_CONFIG  # its batch policy, as it ships
        if shipped_config.is_file():
            (root / name / store.MODEL_CONFIG).write_bytes(shipped_config.read_bytes())
    return root


def serving_store(root: Path, variants: list[str], calibration: np.ndarray | None = None) -> Path:
    """The store a speed comparison serves: each variant's newest published version where the
    shipped store has one, else an untrained export. Trained weights are not speed-neutral: their
    per-channel PReLU slopes run as three elementwise ops, where an untrained model's equal slopes
    fold to LeakyRelu and fuse into the convolution (the full quicknet: 174 against 243 img/s on one
    image on 2 cores)."""
    import shutil

    from quicknet import store

    shipped = store.default_root()
    for name in variants:
        if store.list_versions(shipped, name) and not store.list_versions(root, name):
            published = store.get_version(shipped, name)
            shutil.copytree(published.path, root / name / "1")
            if (shipped / name / store.MODEL_CONFIG).is_file():
                shutil.copyfile(shipped / name / store.MODEL_CONFIG, root / name / store.MODEL_CONFIG)
    return make_untrained_store(root, [v for v in variants if not store.list_versions(root, v)], calibration)


def images_per_second(fn: Callable[[np.ndarray], object], batch: int, seconds: float = 2.0) -> float:
    x = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    fn(x)
    fn(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(x)
        n += batch
    return n / (time.perf_counter() - start)


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns), "-|-".join("-" * widths[c] for c in columns)]
    lines += [" | ".join(cell(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def cell(v: object) -> str:
    """A table cell: floats to one decimal (three below 10), None as blank."""
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3f}"
    return "" if v is None else str(v)


def save(name: str, payload: dict) -> Path:
    from quicknet.fsutil import write_text_atomic

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {"benchmark": name, "machine": machine(), "when": datetime.now(UTC).isoformat(timespec="seconds"), **payload}
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")
    return path
