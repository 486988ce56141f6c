"""The offline build: train → fold+export → compile → evaluate → publish.

Every stage reads and writes one run folder (`runs/<model>/` by default), so each can run alone
(`quicknet train|export|compile|eval|publish`) and `quicknet build` runs them in order.
Each stage records what it measured in `<run>/build.json`, which `publish` turns into metadata.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from quicknet import store
from quicknet.build import data as data_mod
from quicknet.build.compile import ORT_INT8, TensorRTOptions, build_tensorrt_plan, quantize_int8
from quicknet.build.config import TrainConfig
from quicknet.build.gpu_probe import cpu_description
from quicknet.build.ortrun import INPUT_NAME, OUTPUT_NAME
from quicknet.errors import BuildError, QuickNetError
from quicknet.fsutil import write_text_atomic

CHECKPOINT = "checkpoint.pt"
ONNX = "model.onnx"
BUILD_RECORD = "build.json"
# Files a published version carries besides its engines: what the README and the web page show.
REPORTS = ("epochs.jsonl", "training_curves.png", "confusion_matrix.png")
# What every servable artifact may lose against the checkpoint on the full 10k test split before
# publishing is refused: 0.1 point for FP32 graphs, 0.5 for INT8. (`onnx-optimized` gates versions
# published before ORT's graph optimizations moved to load time.)
ACCURACY_GATES = {"onnx": 0.001, "onnx-optimized": 0.001, "onnx-int8": 0.005}
CALIBRATION_IMAGES = 1024
EXPORT_CHECK_IMAGES = 2000


def load_record(run_dir: Path) -> dict:
    path = run_dir / BUILD_RECORD
    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def _save_stage(run_dir: Path, stage: str, seconds: float, **results: object) -> None:
    rec = load_record(run_dir)
    rec["stages"][stage] = {"seconds": round(seconds, 2), **results}
    write_text_atomic(run_dir / BUILD_RECORD, json.dumps(rec, indent=2) + "\n")


def trained_model(run_dir: Path) -> str | None:
    """The model a run folder's training stage trained, from its build.json (None: no record)."""
    try:
        return load_record(run_dir)["stages"]["train"]["config"]["model"]
    except (KeyError, TypeError, ValueError, OSError):
        return None


def _require(path: Path, stage: str, otherwise: str = "") -> Path:
    if not path.is_file():
        raise BuildError(f"{path} not found: run `quicknet {stage}` for this run folder first{otherwise}")
    return path


def stage_train(
    cfg: TrainConfig,
    dataset: data_mod.Dataset,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    plot: bool = True,
) -> dict:
    import torch

    from quicknet.build.train import train

    result = train(cfg, dataset, run_dir, resume=resume, progress=progress, on_epoch=on_epoch, plot=plot)
    last = result.history[-1] if result.history else None
    summary = {
        "config": asdict(cfg),
        "device": result.device,
        "machine": _machine(result.device),
        "torch": torch.__version__,
        "epochs_run": last["epoch"] if last else 0,
        "planned_epochs": result.planned_epochs,
        "train_seconds": round(result.seconds, 1),
        "stopped_early": result.stopped_early,
        "final": last,
        "dataset": dataset.source,
    }
    _save_stage(run_dir, "train", result.seconds, **summary)  # all epochs, across resumes
    return summary


def stage_export(run_dir: Path, dataset: data_mod.Dataset) -> dict:
    from quicknet.build.export import export_onnx, verify
    from quicknet.build.fold import fold, graph_nodes
    from quicknet.build.train import load_checkpoint

    t0 = time.perf_counter()
    checkpoint = _require(run_dir / CHECKPOINT, "train")
    model, _ = load_checkpoint(checkpoint)
    folded = fold(model)
    onnx_path = export_onnx(folded, run_dir / ONNX)
    eq = verify(model, onnx_path, dataset.test.sample(EXPORT_CHECK_IMAGES))
    results = {
        # which weights model.onnx holds: an engine built on a GPU from this checkpoint attaches to the
        # version published from here (`gpu_engine.attach`)
        "checkpoint_sha256": store.sha256_file(checkpoint),
        "graph_nodes_before_fold": graph_nodes(model),
        "graph_nodes_after_fold": graph_nodes(folded),
        "onnx_nodes": _onnx_node_count(onnx_path),
        "equivalence": {
            "images": eq.images,
            "max_abs_logit_delta": eq.max_abs_logit_delta,
            "top1_agreement": eq.top1_agreement,
        },
    }
    _save_stage(run_dir, "export", time.perf_counter() - t0, **results)
    return results


def _onnx_node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(path).graph.node)


def stage_compile(
    run_dir: Path,
    dataset: data_mod.Dataset,
    *,
    tensorrt: bool | None = None,
    trt_options: TensorRTOptions | None = None,
) -> dict:
    """ORT static INT8 always; TensorRT when asked (True), or when it imports (None)."""
    t0 = time.perf_counter()
    onnx_path = _require(run_dir / ONNX, "export")
    calibration = dataset.train.sample(CALIBRATION_IMAGES, seed=1).images
    quantize_int8(onnx_path, run_dir / ORT_INT8, calibration)
    # which model.onnx the INT8 model was quantized from: publish refuses one from an earlier export
    results: dict = {"onnxruntime": [ORT_INT8], "onnx_sha256": store.sha256_file(onnx_path)}
    if tensorrt is not False:
        try:
            plan = build_tensorrt_plan(onnx_path, run_dir, trt_options or TensorRTOptions(), calibration)
            results["tensorrt"] = plan.name
        except QuickNetError as e:
            if tensorrt:
                raise
            results["tensorrt_skipped"] = str(e)
    _save_stage(run_dir, "compile", time.perf_counter() - t0, **results)
    return results


def require_checkpoint(run_dir: Path) -> Path:
    """The run folder's checkpoint, or the one-line refusal `quicknet eval` gives before loading data."""
    return _require(
        run_dir / CHECKPOINT, "train", ", or re-score a published model with `quicknet eval --store-model NAME`"
    )


def stage_eval(run_dir: Path, dataset: data_mod.Dataset, *, limit: int | None = None, threads: int = 2) -> dict:
    from quicknet.build.evaluate import evaluate_artifact, evaluate_checkpoint, plot_confusion

    t0 = time.perf_counter()
    split = dataset.test.sample(limit) if limit else dataset.test
    checkpoint = require_checkpoint(run_dir)
    plain, flip_tta = evaluate_checkpoint(checkpoint, split)
    reports = {"checkpoint": plain, "checkpoint+flip-tta": flip_tta}
    artifacts = [("onnx", run_dir / ONNX), ("onnx-int8", run_dir / ORT_INT8)]
    artifacts += [("tensorrt", p) for p in sorted(run_dir.glob("*.plan"))]
    for kind, path in artifacts:
        if path.is_file():
            reports[kind if kind != "tensorrt" else path.name] = evaluate_artifact(kind, path, split, threads=threads)
    if "onnx" in reports:
        # titled with the name the store will publish it under (the training config's), not the folder's
        name = load_record(run_dir).get("stages", {}).get("train", {}).get("config", {}).get("model", run_dir.name)
        top1 = reports["onnx"].summary()["top1"]
        title = f"{name}: model.onnx, top-1 {top1:.2%} on {len(split.labels):,} test images"
        plot_confusion(reports["onnx"], run_dir / "confusion_matrix.png", title)
    results = {
        "dataset": dataset.source,
        "dataset_checksum": dataset.checksum,
        "accuracy": {k: r.summary() for k, r in reports.items()},
        # what was scored, by SHA-256: publish refuses accuracy measured on other files than it publishes
        "scored": {p.name: store.sha256_file(p) for p in (checkpoint, *(path for _, path in artifacts)) if p.is_file()},
    }
    _save_stage(run_dir, "eval", time.perf_counter() - t0, **results)
    return results


def stage_publish(
    run_dir: Path,
    root: Path,
    *,
    make_default: bool = False,
    training_results: Path | None = None,
    allow_partial: bool = False,
) -> store.ModelVersion:
    """The run's engines into the next version of its model: the FP32 ONNX (the one copy of the
    weights: ONNX Runtime optimizes it at load, the torch engine is derived from it) and the INT8
    ONNX, each gated; `training_results` is the `results.json` of the GPU job that trained it.
    A run whose training stopped before its planned end is refused unless `allow_partial`."""
    from quicknet.build.model import QuickNet, count_macs, count_params, get_config

    t0 = time.perf_counter()
    rec = load_record(run_dir)
    for needed in ("train", "export", "eval"):
        if needed not in rec["stages"]:
            raise BuildError(f"{run_dir} has no {needed} record: run `quicknet {needed}` first")
    if rec["stages"]["train"].get("stopped_early") and not allow_partial:
        done = rec["stages"]["train"].get("epochs_run")
        raise BuildError(
            f"refusing to publish: {run_dir}'s training stopped after {done} of its "
            f"{rec['stages']['train'].get('planned_epochs')} planned epochs: `quicknet train --resume` with its "
            "flags finishes it (then export, compile and eval), or publish it as it is with --allow-partial"
        )
    digests = _check_records_match_files(run_dir, rec["stages"])
    acc = rec["stages"]["eval"]["accuracy"]
    if acc["checkpoint"]["images"] < 10000:
        raise BuildError("publishing needs accuracy on the full 10k test split: run `quicknet eval` without --limit")
    again = ["quicknet", "publish", "--run-dir", str(run_dir), "--model-store", str(root)]
    again += ["--make-default"] if make_default else []
    again += ["--training-results", str(training_results)] if training_results else []
    without_int8 = f"rm {shlex.quote(str(run_dir / ORT_INT8))} && {shlex.join(again)}"
    gates = _accuracy_gates(run_dir, acc, without_int8=without_int8)
    model_name = rec["stages"]["train"]["config"]["model"]
    arch = get_config(model_name)
    provenance, history = trained_on(training_results, run_dir, model_name) if training_results else (None, [])
    _draw_curves(
        run_dir, f"{model_name} on {provenance['gpu'] if provenance else rec['stages']['train']['device']}", history
    )
    files = [run_dir / f for f in (ONNX, ORT_INT8, *REPORTS) if (run_dir / f).is_file()]
    metadata = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source_commit": _git_commit(),
        "architecture": {**arch.to_dict(), "note": "reconstruction of QuickNet (Ghosh 2017); no official layer table"},
        "params": count_params(QuickNet(arch)),
        "macs_per_image": count_macs(arch),
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, 32, 32, 3], "layout": "NHWC"}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, 10]}],
        "labels": list(data_mod.LABELS),
        "artifacts": {"onnx": ONNX, "onnx-int8": ORT_INT8 if (run_dir / ORT_INT8).is_file() else None},
        "dataset": rec["stages"]["eval"]["dataset"],
        "accuracy": {k: v for k, v in acc.items() if k in gates or k.startswith("checkpoint")},
        "accuracy_gates": gates,
        "training": {k: v for k, v in rec["stages"]["train"].items() if k != "seconds"}
        | ({"trained_on": provenance} if provenance else {}),
        "build": {k: {"seconds": v["seconds"]} for k, v in rec["stages"].items()},
        "fold": {
            k: rec["stages"]["export"][k] for k in ("graph_nodes_before_fold", "graph_nodes_after_fold", "onnx_nodes")
        },
        "export_equivalence": rec["stages"]["export"]["equivalence"],
    }
    if "checkpoint_sha256" in rec["stages"]["export"]:
        metadata["exported_from"] = {"file": CHECKPOINT, "sha256": rec["stages"]["export"]["checkpoint_sha256"]}
    _check_not_published(root, model_name, digests[ONNX])
    mv = store.publish(root, model_name, files, metadata)
    if make_default:
        store.set_default(root, model_name)
    _save_stage(run_dir, "publish", time.perf_counter() - t0, version=mv.version, path=str(mv.path))
    return mv


def _check_not_published(root: Path, name: str, digest: str) -> None:
    """A run published once (its model.onnx's SHA-256 `digest`) is not published again as a new
    version with the same weights (a second `publish`, or `build --resume` of a finished build):
    one line naming the version."""
    version = published_version(root, name, digest)
    if version is not None:
        raise BuildError(f"{name} version {version} in {root} already holds this run's {ONNX}: nothing to publish")


def published_version(root: Path, name: str, digest: str) -> int | None:
    """The first version of `name` whose model.onnx has the SHA-256 `digest`, if one does."""
    for version in store.list_versions(root, name):
        try:
            files = store.get_version(root, name, version).metadata.get("files", {})
        except QuickNetError:
            continue  # a version the store cannot read is not this run's
        if files.get(ONNX, {}).get("sha256") == digest:
            return version
    return None


def scored_as_it_stands(run_dir: Path) -> bool:
    """The run folder was exported, compiled and scored on the full 10k split, and the records say so
    of the files there now: publish would take it as it is, with no stage to run again."""
    stages = load_record(run_dir)["stages"]
    if not {"train", "export", "compile", "eval"} <= set(stages):
        return False
    try:
        _check_records_match_files(run_dir, stages)
    except BuildError:
        return False
    return stages["eval"]["accuracy"].get("checkpoint", {}).get("images", 0) >= 10000


def _check_records_match_files(run_dir: Path, stages: dict) -> dict[str, str]:
    """The records publish copies into metadata.json describe the files in the run folder now: a
    run trained again since its export, a model.onnx exported again since its INT8 model was
    quantized or since eval scored it, is refused with the stages to run again (the records hold
    each file's SHA-256). Returns the files' SHA-256 by name."""
    again = "run `quicknet {}` for {} again"
    if not (run_dir / ONNX).is_file():
        raise BuildError(f"refusing to publish: {run_dir / ONNX} is missing; run `quicknet export`")
    now = {p.name: store.sha256_file(p) for p in (run_dir / f for f in (CHECKPOINT, ONNX, ORT_INT8)) if p.is_file()}
    exported_from = stages["export"].get("checkpoint_sha256")
    if CHECKPOINT in now and exported_from and exported_from != now[CHECKPOINT]:
        what = f"{ONNX} was exported from an earlier {CHECKPOINT} (the run trained again since)"
        raise BuildError(f"refusing to publish: {what}: {again.format('export`, `compile` and `eval', run_dir)}")
    quantized_from = stages.get("compile", {}).get("onnx_sha256")
    if ORT_INT8 in now and quantized_from and quantized_from != now.get(ONNX):
        what = f"{ORT_INT8} was quantized from an earlier {ONNX}"
        raise BuildError(f"refusing to publish: {what}: {again.format('compile` and `eval', run_dir)}")
    scored = stages["eval"].get("scored")
    if scored is None:
        raise BuildError(
            f"refusing to publish: the eval record names no files it scored: {again.format('eval', run_dir)}"
        )
    stale = [name for name, digest in now.items() if scored.get(name) != digest]
    if stale:
        what = f"the accuracy in {BUILD_RECORD} was not measured on the {' and '.join(stale)} there now"
        raise BuildError(f"refusing to publish: {what}: {again.format('eval', run_dir)}")
    return now


def trained_on(results_path: Path, run_dir: Path, model: str) -> tuple[dict, list[dict]]:
    """Where a GPU job's weights came from, out of its `results.json`, and the epoch log it kept:
    the GPU, driver, torch and CUDA, the recipe, epochs and training seconds, and the file's
    SHA-256 (the file stays with the run; the digest ties the published version to it). It must be
    a gpu-train job that trained `model`. A several-arm job (`gpu-train --arms`) keeps each arm
    under `arms.<name>`, the name of the folder it returned: `run_dir`'s."""
    try:
        results = json.loads(Path(results_path).read_text())
        env = results["environment"]
        arm = results["arms"][run_dir.name] if "arms" in results else results
        final = arm["final"]
        if results["job"] != "gpu-train" or arm["recipe"].get("model") != model:
            raise ValueError(f"a {results['job']} job's results for model {arm['recipe'].get('model')!r}")
        provenance = {
            "job": results["job"],
            "started": results["started"],
            "gpu": env["gpu"],
            "driver": env["driver"],
            "torch": env["torch"],
            "cuda": env["cuda_runtime"],
            "recipe": arm["recipe"],
            "epochs": final["epochs"],
            "train_seconds": final["train_seconds"],
            "top1": final["top1"],
        }
        if "arms" in results:
            provenance["arm"] = run_dir.name
        history = [h for h in arm.get("epochs", []) if isinstance(h, dict) and "train_loss" in h]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BuildError(
            f"{results_path} is not the results.json of the GPU training job that trained {run_dir.name} ({e!r}); "
            "pass the job's own"
        ) from None
    return provenance | {"results_sha256": store.sha256_file(Path(results_path))}, history


def _draw_curves(run_dir: Path, title: str, history: list[dict]) -> None:
    """`training_curves.png` where training did not draw it (the GPU machine's Python has no
    matplotlib), from the run's `epochs.jsonl`, else from the epochs its job's results kept."""
    if (run_dir / "training_curves.png").is_file():
        return
    log = run_dir / "epochs.jsonl"
    if log.is_file():
        history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if history:
        from quicknet.build.train import plot_curves

        plot_curves(history, run_dir / "training_curves.png", title)


def republish(root: Path, name: str, version: int | None, dataset: data_mod.Dataset, *, why: str) -> store.ModelVersion:
    """A published version's ONNX engines re-derived with today's graph rewrites (the same weights,
    the same function), re-compiled, scored on the full 10k split, gated against the source's
    checkpoint accuracy, and published as the next version; the DEFAULT follows it."""
    import tempfile

    import onnx

    from quicknet.build.evaluate import evaluate_artifact
    from quicknet.build.export import elementwise_prelu

    t0 = time.perf_counter()
    source = store.get_version(root, name, version)
    store.verify_files(source)
    meta = source.metadata
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = elementwise_prelu(onnx.load(source.file(meta["artifacts"]["onnx"])))
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, work / ONNX)
        quantize_int8(work / ONNX, work / ORT_INT8, dataset.train.sample(CALIBRATION_IMAGES, seed=1).images)
        acc = {k: v for k, v in meta["accuracy"].items() if not k.startswith("onnx")}
        for kind, fname in (("onnx", ONNX), ("onnx-int8", ORT_INT8)):
            acc[kind] = evaluate_artifact(kind, work / fname, dataset.test).summary()
        (work / BUILD_RECORD).write_text(json.dumps({"stages": {"eval": {"accuracy": acc}}}))
        gates = _accuracy_gates(work, acc)
        carried = [source.file(f) for f in meta["files"] if f in REPORTS]  # engines are re-derived, not carried
        files = [work / ONNX, work / ORT_INT8, *carried]
        fresh = {k: v for k, v in meta.items() if k not in ("name", "version", "files")}
        fresh |= {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "source_commit": _git_commit(),
            "accuracy": acc,
            "accuracy_gates": gates,
            "artifacts": {"onnx": ONNX, "onnx-int8": ORT_INT8},
            "derived_from": {"version": source.version, "why": why, "seconds": round(time.perf_counter() - t0, 1)},
        }
        was_default = (root / store.DEFAULT_FILE).is_file() and store.default_model(root) == name
        published = store.publish(root, name, files, fresh)
    if was_default:
        store.set_default(root, name)
    return published


def _accuracy_gates(run_dir: Path, acc: dict, without_int8: str | None = None) -> dict:
    """Every artifact the service can load, scored on the full 10k split and within its gate of the
    checkpoint; else a one-line refusal naming the artifact. Returns the gates applied.
    `without_int8`: the command that publishes the run without its INT8 model, which a refusal of
    that model offers (a few-minute run's calibration often misses the gate; the run is not lost)."""
    ckpt = acc["checkpoint"]["top1"]
    applied = {}
    kinds = {"onnx": ONNX, "onnx-int8": ORT_INT8}
    kinds |= {p.name: p.name for p in sorted(run_dir.glob("*.plan"))}
    for kind, fname in kinds.items():
        if not (run_dir / fname).is_file():
            continue
        gate = ACCURACY_GATES.get(kind, 0.005 if ".int8." in kind else 0.001)
        scored = acc.get(kind)
        if scored is None or scored["images"] < 10000:
            raise BuildError(
                f"refusing to publish: {fname} has no accuracy on the full 10k test split; run `quicknet eval`"
            )
        if scored["top1"] < ckpt - gate:
            offer = without_int8 and kind == "onnx-int8"
            without = f": train longer, or publish without it (FP32 serves): {without_int8}" if offer else ""
            raise BuildError(
                f"refusing to publish: {fname} scores {scored['top1']:.2%}, {100 * (ckpt - scored['top1']):.2f} "
                f"points below the checkpoint's {ckpt:.2%} (its gate: {100 * gate:g} point){without}"
            )
        applied[kind] = {"max_loss": gate, "top1": scored["top1"], "checkpoint_top1": ckpt}
    if "onnx" not in applied:
        raise BuildError(f"refusing to publish: {run_dir / ONNX} is missing; run `quicknet export`")
    return applied


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _machine(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return cpu_description()
