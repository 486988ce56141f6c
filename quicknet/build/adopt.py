"""`quicknet adopt-gpu-run`: what a GPU draw brought back, into the model store, in one command.

The README's "GPU runs" return two folders, copied here as `gpu-results/train/` (the arms, each
`<arm>/checkpoint.pt`, and `results.json` naming the best under `handoff`) and `gpu-results/serve/`
(`model.fused.<gpu>.sm90.zip`, the engine built from that arm's weights, and
`torch-compile-cache.<gpu>.zip`). Adopting them is the steps the README used to list by hand:

1. the compile cache into `gpu-cache/`, where the next draw's train run starts warm from it;
2. the handed-off arm exported, compiled and scored on the full 10k test split (the stages every run
   folder goes through), then published with the job's results.json as its provenance: refused
   when the arm scores below the version it would replace (published, it would be served in that
   version's place), made the default when it beats the default model;
3. the fused engine attached to the version whose weights it was built from (`attach`, which gates
   it), found by the SHA-256 the engine names: the arm's checkpoint, or the model file of the version
   the serve run served when it found no hand-off. A train run that handed off no arm publishes
   nothing (said in a line) unless `--arm` names one; its engine step still runs;
4. the README's "The published models" rows for the store as it then is, from the versions'
   metadata, the two speed cells left `?` for the benchmarks to fill.

Each step is passed over where it is done already (a published run, an attached engine, a cache
file there), so after a refusal the same command, run again, finishes what is left. Every step
says what it did in one line; a refusal is the usual one-line BuildError.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from quicknet import store
from quicknet.build import pipeline
from quicknet.build.compile_cache import ZIP_GLOB
from quicknet.errors import BuildError, QuickNetError

ENGINE_GLOB = "model.fused.*.zip"
SPEED_COLUMNS = 2  # the README model table's last columns, measured by the benchmarks (`?` until filled in)


def adopt(
    results: Path,
    root: Path,
    dataset: Callable[[], object],
    *,
    cache_dir: Path,
    arm: str | None = None,
    allow_partial: bool = False,
    even_if_worse: bool = False,
    threads: int = 2,
    say: Callable[[str], None] = print,
) -> None:
    """`results` holds the draw's `train/` and `serve/` folders (either may be missing); `dataset`
    loads CIFAR-10 when a stage must run (decoding it costs a minute the first time)."""
    if not results.is_dir():
        raise BuildError(f"{results} is not a folder: copy what the GPU runs returned there (train/ and serve/)")
    train, serve = results / "train", results / "serve"
    if not train.is_dir() and not serve.is_dir():
        raise BuildError(f"{results} holds neither train/ nor serve/: the folders the GPU runs returned")
    before = _newest_versions(root)
    try:
        if serve.is_dir():
            _keep_compile_cache(serve, cache_dir, say)
        if train.is_dir():
            picked = _arm_to_publish(train, arm, say)
            if picked:
                _publish_arm(*picked, root, dataset, allow_partial, even_if_worse, threads, say)
        elif arm is not None:
            raise BuildError(f"--arm {arm}: {results} has no train/ folder")
        if serve.is_dir():
            for engine in sorted(serve.glob(ENGINE_GLOB)):
                _attach_engine(engine, root, say)
    except BaseException:
        if _newest_versions(root) != before:  # published something, then refused: the table has changed
            _say_model_table(root, say)
        raise
    _say_model_table(root, say)


def _say_model_table(root: Path, say: Callable[[str], None]) -> None:
    """The README's "The published models" rows for the store as it is now, every model (a new
    default takes the old one's marker too), the speed cells `?` for whoever fills them in."""
    try:
        default = store.default_model(root)
    except QuickNetError:
        default = None
    rows = []
    for name, version in _newest_versions(root).items():
        try:
            cells = model_table_cells(store.get_version(root, name, version), default=default)
        except QuickNetError as e:
            say(f"{name} v{version}: no table row ({e})")
            continue
        rows.append(f"| {' | '.join([*cells, *['?'] * SPEED_COLUMNS])} |")
    if rows:
        say('README, "The published models" (the speed columns from benchmarks/README.md):')
        for row in rows:
            say(row)


def model_table_cells(mv: store.ModelVersion, *, default: str | None) -> list[str]:
    """The README model table's cells for a published version, up to its speed columns (those come
    from the benchmarks): name, version, parameters, multiply-adds, and top-1 of the checkpoint,
    `model.onnx`, `model.int8.onnx` and the checkpoint with flip TTA (`tests/test_shipped_model.py`
    holds the README to them)."""
    meta, accuracy = mv.metadata, mv.metadata.get("accuracy", {})

    def top1(kind: str) -> str:
        return f"{accuracy[kind]['top1']:.2%}" if kind in accuracy else "-"

    return [
        f"`{mv.name}`" + (" (default)" if mv.name == default else ""),
        str(mv.version),
        f"{meta['params'] / 1e6:.3f} M" if "params" in meta else "-",
        f"{meta['macs_per_image'] / 1e9:.3f} G" if "macs_per_image" in meta else "-",
        *(top1(kind) for kind in ("checkpoint", "onnx", "onnx-int8", "checkpoint+flip-tta")),
    ]


def _newest_versions(root: Path) -> dict[str, int]:
    return {name: max(store.list_versions(root, name)) for name in store.list_models(root)}


def _keep_compile_cache(serve: Path, cache_dir: Path, say: Callable[[str], None]) -> None:
    for blob in sorted(serve.glob(ZIP_GLOB)):
        kept = cache_dir / blob.name
        if kept.is_file() and store.sha256_file(kept) == store.sha256_file(blob):
            say(f"compile cache: {kept} is there already")
            continue
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(blob, kept)
        except OSError as e:
            raise BuildError(f"cannot keep {blob.name} in {cache_dir}: {e.strerror or e}") from None
        say(f"compile cache: {blob.name} into {cache_dir}/ (commit it: the next draw's train run starts warm)")


def _arm_to_publish(train: Path, arm: str | None, say: Callable[[str], None]) -> tuple[Path, Path] | None:
    """(the run folder of the arm to publish, the job's results.json): `arm`, else the arm the job
    handed to the serve run; None, said in a line, when it handed off none (the serve run then
    built its engine from the published model, which the engine step still attaches)."""
    path = train / "results.json"
    try:
        doc = json.loads(path.read_text())
        arms = doc["arms"]
        handoff = doc.get("handoff")
        if not isinstance(arms, dict) or not all(isinstance(a, dict) for a in arms.values()):
            raise TypeError("arms")
        if isinstance(handoff, dict) and not (
            isinstance(handoff.get("arm"), str) and isinstance(handoff.get("checkpoint_sha256"), str)
        ):
            raise TypeError("handoff")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        why = f"{path} is not a gpu-train job's results ({type(e).__name__}: {e})"
        raise BuildError(f"{why}: copy the train run's folder again") from None
    if arm is None and not isinstance(handoff, dict):
        why = handoff or "the job was run without --handoff"
        say(f"train: {path} hands off no arm ({why}): nothing published; --arm NAME publishes one of {', '.join(arms)}")
        return None
    arm = arm or handoff["arm"]
    if arm not in arms:
        raise BuildError(f"--arm {arm}: the job trained {', '.join(arms)}")
    run_dir = train / arm
    checkpoint = run_dir / pipeline.CHECKPOINT
    if not checkpoint.is_file():
        raise BuildError(f"{checkpoint} is missing: the arm {arm} left no weights ({arms[arm].get('state')})")
    digest = handoff["checkpoint_sha256"] if isinstance(handoff, dict) and handoff["arm"] == arm else None
    if digest and store.sha256_file(checkpoint) != digest:
        raise BuildError(f"{checkpoint} is not the checkpoint the job handed off (SHA-256 {digest[:12]}): copy it")
    return run_dir, path


def _publish_arm(
    run_dir: Path,
    results_json: Path,
    root: Path,
    dataset: Callable[[], object],
    allow_partial: bool,
    even_if_worse: bool,
    threads: int,
    say: Callable[[str], None],
) -> None:
    model = pipeline.trained_model(run_dir)
    if not model:
        raise BuildError(f"{run_dir} has no training record naming its model (build.json): copy the arm's folder again")
    trained = pipeline.load_record(run_dir)["stages"]["train"]
    if trained.get("stopped_early") and not allow_partial:  # before the stages: they cost minutes
        raise BuildError(
            f"{run_dir.name} was ended by its hard stop after {trained.get('epochs_run')} of its "
            f"{trained.get('planned_epochs')} planned epochs: --allow-partial publishes it as it is"
        )
    if pipeline.scored_as_it_stands(run_dir):
        say(f"{run_dir.name}: exported, compiled and scored already")
    else:
        ds = dataset()
        say(f"{run_dir.name}: exporting (fold, ONNX, checked against PyTorch on 2,000 test images)")
        pipeline.stage_export(run_dir, ds)
        say(f"{run_dir.name}: compiling (ONNX Runtime INT8)")
        pipeline.stage_compile(run_dir, ds, tensorrt=False)
        say(f"{run_dir.name}: scoring every artifact on the 10k test split")
        pipeline.stage_eval(run_dir, ds, threads=threads)
    done = pipeline.published_version(root, model, store.sha256_file(run_dir / pipeline.ONNX))
    if done is not None:
        say(f"{run_dir.name}: published already, as {model} v{done}")
        return
    top1 = pipeline.load_record(run_dir)["stages"]["eval"]["accuracy"]["checkpoint"]["top1"]
    replaced = _newest_top1(root, model)
    if replaced and top1 < replaced[1] and not even_if_worse:
        raise BuildError(
            f"{run_dir.name} scores {top1:.2%}, below {model} v{replaced[0]}'s {replaced[1]:.2%}: published, it would "
            "be served in that version's place; --even-if-worse publishes it anyway"
        )
    make_default, why = _beats_default(root, model, top1)
    mv = pipeline.stage_publish(
        run_dir, root, make_default=make_default, training_results=results_json, allow_partial=allow_partial
    )
    say(f"{run_dir.name}: published {mv.name} v{mv.version} ({top1:.2%} on the 10k test split); {why}")


def _newest_top1(root: Path, model: str) -> tuple[int, float] | None:
    """The newest version of `model` and its checkpoint's top-1, where it has one."""
    try:
        mv = store.get_version(root, model)
    except QuickNetError:
        return None
    top1 = mv.metadata.get("accuracy", {}).get("checkpoint", {}).get("top1")
    return (mv.version, top1) if isinstance(top1, float | int) else None


def _beats_default(root: Path, model: str, top1: float) -> tuple[bool, str]:
    """Whether the published arm becomes the store's default, and the words saying so."""
    if not store.list_models(root):
        return True, "the default model now (the store had no model)"
    try:
        default = store.default_model(root)
    except QuickNetError:
        return True, f"the default model now (the store named none among {', '.join(store.list_models(root))})"
    if default == model:
        return False, "the default model's newest version, so the one served by default"
    theirs = _newest_top1(root, default)
    if theirs is None or top1 > theirs[1]:
        was = f"{default} v{theirs[0]}, {theirs[1]:.2%}" if theirs else default
        return True, f"the default model now (was {was})"
    return False, f"the default stays {default} (v{theirs[0]}, {theirs[1]:.2%})"


def _versions(root: Path) -> list[tuple[str, int, dict]]:
    """Every readable version in the store as (model, version, metadata), each model's newest first;
    one the store cannot read is passed over, as `pipeline.published_version` does."""
    found = []
    for name in store.list_models(root):
        for version in sorted(store.list_versions(root, name), reverse=True):
            try:
                found.append((name, version, store.get_version(root, name, version).metadata))
            except QuickNetError:
                continue
    return found


def _attach_engine(engine: Path, root: Path, say: Callable[[str], None]) -> None:
    from quicknet.build.gpu_engine import attach, holds_weights
    from quicknet.fused import engine as fe

    doc = fe.read_doc(engine)
    source, built_for = doc.get("source"), doc.get("built_for")
    if not isinstance(source, dict) or not isinstance(built_for, dict):
        raise BuildError(f"{engine.name} does not say what it was built from and for: rebuild it on the GPU")
    versions = _versions(root)
    for name, version, meta in versions:
        kept = meta.get("gpu_engine", {})
        if kept.get("built_from") == source and kept.get("built_for") == built_for:
            say(f"{engine.name}: published already, in {name} v{version}")
            return
    for name, version, meta in versions:  # newest first: the version published from it, not an older twin
        if holds_weights(meta, doc):
            mv = attach(root, name, version, engine)
            say(f"{engine.name}: gated and published as {name} v{mv.version} (v{version}'s files and the engine)")
            return
    raise BuildError(
        f"{engine.name} was built from weights no version in {root} holds ({source.get('file')!r}, SHA-256 "
        f"{str(source.get('checkpoint_sha256') or source.get('sha256'))[:12]}): publish its arm first"
    )
