"""`quicknet data|train|export|compile|eval|publish|build|plan|republish|attach-engine|gpu-train|adopt-gpu-run|info`:
the offline build's commands."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path

from quicknet.build.config import VALID, TrainConfig
from quicknet.errors import QuickNetError, StoreError


def number(kind: type, valid: str | None) -> typing.Callable[[str], object]:
    """An argparse `type`: `kind` (int or float), and where `valid` names a rule of VALID, a value
    that keeps it, else argparse's one-line refusal naming the flag."""
    test, words = VALID[valid] if valid else (None, "")

    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n' if kind is int else ''} {kind.__name__}") from None
        if test is not None and not test(value):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type by it in its own messages
    return parse


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--flag` per dataclass field, typed from its annotation, described by its metadata."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        text = f"{f.metadata.get('help', '')} (default: %(default)s)".strip()
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        elif kind in (int, float):
            parse = number(kind, f.metadata.get("valid"))
            parser.add_argument(flag, type=parse, default=f.default, metavar=kind.__name__.upper(), help=text)
        elif f.metadata.get("choices"):
            parser.add_argument(flag, choices=f.metadata["choices"], default=f.default, help=text)
        else:
            parser.add_argument(flag, type=kind, default=f.default, metavar=kind.__name__.upper(), help=text)


STAGE_COMMANDS = ("export", "compile", "eval", "publish")  # they read a run folder a training run wrote
STAGE_MODEL_HELP = (
    "which run folder, runs/<model> (default quicknet), where --run-dir is not given; with --run-dir, a check "
    "that the run trained this model"
)


def _run_dir(args: argparse.Namespace) -> Path:
    """--run-dir, else runs/<model>. For the stages after training (whose --model only names that
    folder: the run itself says which model it trained), a --model the run contradicts is refused."""
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / (args.model or "quicknet")
    if args.command in STAGE_COMMANDS and args.model:
        from quicknet.build.pipeline import trained_model

        theirs = trained_model(run_dir)
        if theirs and theirs != args.model:
            raise QuickNetError(
                f"{run_dir} holds a {theirs} run, not {args.model}: drop --model, or give --model {theirs}"
            )
    return run_dir


def _dataset(args: argparse.Namespace):
    from quicknet.build import data

    return data.load(Path(args.data) if args.data else None)


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_data_fetch(args: argparse.Namespace) -> None:
    from quicknet.build import data

    path = data.fetch(Path(args.dest))
    print(f"{path} ok (MD5 {data.TARBALL_MD5}); use it with --data {path}")


def cmd_train(args: argparse.Namespace) -> None:
    from quicknet.build.pipeline import stage_train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    dataset, run_dir = _dataset(args), _run_dir(args)
    with _says_how_to_resume(run_dir):
        _print(stage_train(cfg, dataset, run_dir, resume=args.resume))


@contextlib.contextmanager
def _says_how_to_resume(run_dir: Path):
    """Ctrl-C in training: a line saying what the run folder holds and how to go on (exit 130)."""
    try:
        yield
    except KeyboardInterrupt:
        if (run_dir / "checkpoint.pt").is_file():
            print(f"interrupted: the same command with --resume continues from {run_dir}'s last save", file=sys.stderr)
        else:
            print(f"interrupted before the first save: nothing in {run_dir} to resume", file=sys.stderr)
        raise


def cmd_export(args: argparse.Namespace) -> None:
    from quicknet.build.pipeline import stage_export

    _print(stage_export(_run_dir(args), _dataset(args)))


def cmd_compile(args: argparse.Namespace) -> None:
    from quicknet.build.compile import TensorRTOptions
    from quicknet.build.pipeline import stage_compile

    trt = TensorRTOptions(
        fp16=True,
        int8=args.trt_int8,
        min_batch=args.trt_min_batch,
        opt_batch=args.trt_opt_batch,
        max_batch=args.trt_max_batch,
    )
    _print(stage_compile(_run_dir(args), _dataset(args), tensorrt=args.tensorrt, trt_options=trt))


def cmd_eval(args: argparse.Namespace) -> None:
    from quicknet.build.pipeline import require_checkpoint, stage_eval

    if args.store_model:
        _print(_eval_published(args))
        return
    require_checkpoint(_run_dir(args))  # before the data: a missing run is said at once, data or not
    results = stage_eval(_run_dir(args), _dataset(args), limit=args.limit, threads=args.threads)
    _print({k: v["top1"] for k, v in results["accuracy"].items()})


def _eval_published(args: argparse.Namespace) -> dict:
    """Score a published version's ONNX files (no torch needed) against its metadata."""
    from quicknet import store
    from quicknet.build.evaluate import evaluate_artifact

    root = Path(args.store) if args.store else store.default_root()
    mv = store.get_version(root, args.store_model, args.version)
    store.verify_files(mv)
    ds = _dataset(args)
    split = ds.test.sample(args.limit) if args.limit else ds.test
    out = {"model": mv.name, "version": mv.version, "images": len(split.labels), "dataset": ds.source, "artifacts": {}}
    for kind, fname in mv.metadata["artifacts"].items():
        if fname and kind.startswith("onnx"):  # ONNX Runtime only: no torch needed
            report = evaluate_artifact(kind, mv.file(fname), split, threads=args.threads)
            published = mv.metadata["accuracy"].get(kind, {}).get("top1")
            out["artifacts"][kind] = {"top1": round(report.top1, 5), "published_top1": published}
    return out


def cmd_publish(args: argparse.Namespace) -> None:
    from quicknet import store
    from quicknet.build.pipeline import stage_publish

    root = Path(args.store) if args.store else store.default_root()
    results = Path(args.training_results) if args.training_results else None
    mv = stage_publish(
        _run_dir(args), root, make_default=args.make_default, training_results=results, allow_partial=args.allow_partial
    )
    print(f"published {mv.name} version {mv.version} at {mv.path}")


def cmd_plan(args: argparse.Namespace) -> None:
    """Build the TensorRT plan for a published model on this GPU, unless one exists (GPU image start-up)."""
    from quicknet import store
    from quicknet.build.compile import TensorRTOptions, build_tensorrt_plan, import_tensorrt

    trt = import_tensorrt()
    root = Path(args.store) if args.store else store.default_root()
    gpu, cc = store.gpu_identity()
    options = TensorRTOptions(opt_batch=args.trt_opt_batch, max_batch=args.trt_max_batch)

    def build(mv: store.ModelVersion) -> None:
        out = store.plan_folder(Path(args.plan_dir) if args.plan_dir else None, mv)
        try:
            out.mkdir(parents=True, exist_ok=True)
            existing = out / store.plan_filename(gpu, cc, trt.__version__, "fp16")
            if existing.is_file():
                print(f"{existing} exists; nothing to build")
                return
            print(f"built {build_tensorrt_plan(mv.file('model.onnx'), out, options)}")
        except OSError as e:  # an unwritable plan folder, a version missing its model.onnx: one line
            raise StoreError(f"{mv.name} v{mv.version}: no plan built in {out}: {e}") from None

    if not args.all:
        build(store.get_version(root, args.store_model or store.default_model(root), args.version))
        return
    if args.store_model or args.version is not None:
        raise QuickNetError("--all builds every model's latest version: drop --store-model and --version")
    # Every model's latest version (what the server loads by default). One that cannot be built is
    # said and skipped: the server then refuses that version alone, where stopping here would keep
    # the whole pod from starting (the GPU image runs this first, under `set -e`). A store with no
    # model at all is an error: default_model says why (missing, a file, empty).
    for name in store.list_models(root) or [store.default_model(root)]:
        try:
            build(store.get_version(root, name))
        except QuickNetError as e:
            print(f"error: {name}: no plan built: {e}", file=sys.stderr)


def cmd_build(args: argparse.Namespace) -> None:
    from quicknet import store
    from quicknet.build.pipeline import stage_compile, stage_eval, stage_export, stage_publish, stage_train

    root = Path(args.store) if args.store else store.default_root()
    if args.publish:
        store.check_publishable(root, args.model)  # before the data and training, not after them
    ds = _dataset(args)
    run_dir = _run_dir(args)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    with _says_how_to_resume(run_dir):
        _stage(f"training {cfg.model} into {run_dir}")
        trained = stage_train(cfg, ds, run_dir, resume=args.resume)
    if trained["stopped_early"]:  # a time limit: what it saved is half a run, not a model to publish
        raise QuickNetError(
            f"training stopped after {trained['epochs_run']} of {trained['planned_epochs']} epochs: the same "
            "command with --resume finishes it, then exports, compiles, scores and publishes"
        )
    _stage("exporting: fold, ONNX, checked against PyTorch on 2,000 test images")
    stage_export(run_dir, ds)
    _stage("compiling: ONNX Runtime INT8" + ("" if args.tensorrt is False else ", TensorRT where installed"))
    stage_compile(run_dir, ds, tensorrt=args.tensorrt)
    _stage("scoring every artifact on the 10k test split")
    results = stage_eval(run_dir, ds, threads=args.threads)
    _print({k: v["top1"] for k, v in results["accuracy"].items()})
    if args.publish:
        _stage(f"publishing into {root}")
        mv = stage_publish(run_dir, root, make_default=args.make_default)
        print(f"published {mv.name} version {mv.version} at {mv.path}")


def _stage(what: str) -> None:
    """Where a build is, on stderr: with no terminal there is no progress bar to say it."""
    print(f"quicknet build: {what}", file=sys.stderr, flush=True)


def cmd_republish(args: argparse.Namespace) -> None:
    from quicknet import store
    from quicknet.build.pipeline import republish

    root = Path(args.store) if args.store else store.default_root()
    mv = republish(root, args.store_model, args.version, _dataset(args), why=args.why)
    print(
        f"published {mv.name} version {mv.version} at {mv.path} (from version {mv.metadata['derived_from']['version']})"
    )


def cmd_attach_engine(args: argparse.Namespace) -> None:
    from quicknet import store
    from quicknet.build.gpu_engine import attach

    root = Path(args.store) if args.store else store.default_root()
    mv = attach(root, args.store_model or store.default_model(root), args.version, Path(args.engine))
    source = mv.metadata["derived_from"]["version"]
    print(f"published {mv.name} version {mv.version} at {mv.path}: version {source}'s files and the engine")


def cmd_gpu_train(args: argparse.Namespace) -> None:
    from quicknet.build.gpu_train import main

    main(args)


def cmd_adopt_gpu_run(args: argparse.Namespace) -> None:
    from quicknet import store
    from quicknet.build.adopt import adopt

    root = Path(args.store) if args.store else store.default_root()
    adopt(
        Path(args.results),
        root,
        lambda: _dataset(args),
        cache_dir=Path(args.compile_cache),
        arm=args.arm,
        allow_partial=args.allow_partial,
        even_if_worse=args.even_if_worse,
        threads=args.threads,
    )


def cmd_info(args: argparse.Namespace) -> None:
    from quicknet.build.sizes import table  # a table checked against torch by a test: no torch here

    print(table())


def add_commands(sub: argparse._SubParsersAction) -> None:
    data_flag = argparse.ArgumentParser(add_help=False)
    data_flag.add_argument(
        "--data",
        help="CIFAR-10 npz copy or cifar-10-python.tar.gz (env QUICKNET_DATA; default: ../shared/data/cifar10/"
        "cifar10_jpeg.npz beside the checkout, else data/cifar10_jpeg.npz in it)",
    )
    common = argparse.ArgumentParser(add_help=False, parents=[data_flag])
    common.add_argument("--run-dir", help="folder for this build's artifacts (default runs/<model>)")
    store_flags = argparse.ArgumentParser(add_help=False)
    store_flags.add_argument(  # `serve` spells it --model-store too; --store is kept for old scripts
        "--model-store",
        "--store",
        dest="store",
        metavar="DIR",
        help="model store root (env QUICKNET_MODEL_STORE; default: the model_store/ folder of this checkout, "
        "whatever the current one)",
    )
    default_flag = argparse.ArgumentParser(add_help=False)
    default_flag.add_argument("--make-default", action="store_true", help="serve this model when none is named")

    data = sub.add_parser("data", help="dataset utilities")
    data_sub = data.add_subparsers(dest="data_cmd", required=True)
    fetch = data_sub.add_parser("fetch", help="download the official cifar-10-python.tar.gz and verify its MD5")
    fetch.add_argument("--dest", default="data/cifar-10-python.tar.gz", help="where to save it (default: %(default)s)")
    fetch.set_defaults(func=cmd_data_fetch)

    train = sub.add_parser("train", parents=[common], help="train a QuickNet variant")
    _add_dataclass_flags(train, TrainConfig)
    train.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoint.pt")
    train.set_defaults(func=cmd_train)

    for name, func, text in (
        ("export", cmd_export, "fold BN/PReLU/normalization, export ONNX, verify against PyTorch"),
        ("compile", cmd_compile, "ONNX Runtime static INT8 model; TensorRT plan where it is installed"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("--model", help=STAGE_MODEL_HELP)
        p.set_defaults(func=func)
    compile_p = sub.choices["compile"]
    compile_p.add_argument(
        "--tensorrt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require (--tensorrt) or skip (--no-tensorrt) the TensorRT plan; default: build if installed",
    )
    compile_p.add_argument("--trt-int8", action="store_true", help="INT8 plan with an entropy calibrator")
    compile_p.add_argument("--trt-min-batch", type=number(int, "positive"), default=1)
    compile_p.add_argument("--trt-opt-batch", type=number(int, "positive"), default=64)
    compile_p.add_argument("--trt-max-batch", type=number(int, "positive"), default=256)

    ev = sub.add_parser("eval", parents=[common, store_flags], help="top-1 of every artifact on the 10k test split")
    ev.add_argument("--model", help=STAGE_MODEL_HELP)
    ev.add_argument(
        "--threads", type=number(int, "positive"), default=2, help="CPU threads for ONNX Runtime and PyTorch"
    )
    ev.add_argument("--limit", type=number(int, "positive"), help="score a fixed random subset of N test images")
    ev.add_argument("--store-model", metavar="NAME", help="evaluate a published model instead of a run folder")
    ev.add_argument("--version", type=int, help="with --store-model: this version (default newest)")
    ev.set_defaults(func=cmd_eval)

    pub = sub.add_parser(
        "publish", parents=[common, store_flags, default_flag], help="publish a run folder to the model store"
    )
    pub.add_argument("--model", help=STAGE_MODEL_HELP)
    pub.add_argument(
        "--training-results",
        metavar="FILE",
        help="the results.json of the GPU job that trained this run: its GPU, driver, torch, recipe, epochs "
        "and the file's SHA-256 go into metadata.json",
    )
    pub.add_argument(
        "--allow-partial",
        action="store_true",
        help="publish a run whose training stopped before its planned end (a time limit, a GPU job's hard stop)",
    )
    pub.set_defaults(func=cmd_publish)

    build = sub.add_parser(
        "build", parents=[common, store_flags, default_flag], help="train, export, compile, eval and publish"
    )
    _add_dataclass_flags(build, TrainConfig)
    build.add_argument(
        "--resume", action="store_true", help="continue training from <run-dir>/checkpoint.pt (an interrupted build)"
    )
    build.add_argument(
        "--tensorrt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require (--tensorrt) or skip (--no-tensorrt) the TensorRT plan; default: build it if TensorRT "
        "is installed",
    )
    build.add_argument(
        "--publish",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="publish the result to the model store as the next version (default: %(default)s; --no-publish "
        "leaves it in the run folder)",
    )
    build.set_defaults(func=cmd_build)

    plan = sub.add_parser("plan", parents=[store_flags], help="build a published model's TensorRT plan on this GPU")
    plan.add_argument("--store-model", metavar="NAME", help="model (default: the store's DEFAULT)")
    plan.add_argument("--all", action="store_true", help="every model's latest version instead")
    plan.add_argument("--version", type=int)
    plan.add_argument(
        "--plan-dir",
        help="where to write the plan, in <model>/<version>/ below it (env QUICKNET_PLAN_DIR; default the version "
        "folder)",
        default=os.environ.get("QUICKNET_PLAN_DIR"),
    )
    plan.add_argument("--trt-opt-batch", type=number(int, "positive"), default=64)
    plan.add_argument("--trt-max-batch", type=number(int, "positive"), default=256)
    plan.set_defaults(func=cmd_plan)

    rep = sub.add_parser(
        "republish",
        parents=[data_flag, store_flags],
        help="re-derive a published version's ONNX engines with today's exporter rewrites; publish the next version",
    )
    rep.add_argument("--store-model", required=True, metavar="NAME", help="the published model to re-derive")
    rep.add_argument("--version", type=int, help="its version (default newest)")
    rep.add_argument(
        "--why",
        default="engines re-derived with this build's exporter and store layout: elementwise PReLU (1.75x faster "
        "in ONNX Runtime on CPUs); the FP32 weights once, in model.onnx, beside the INT8 engine",
        help="why, recorded in the new version's metadata (default: %(default)s)",
    )
    rep.set_defaults(func=cmd_republish)

    attach = sub.add_parser(
        "attach-engine",
        parents=[store_flags],
        help="publish a fused GPU engine (a GPU run's model.fused.*.zip) beside the version it was built from",
        description="The next version of the model: the version's files plus the engine, as artifact fused-gpu. "
        "Refused unless the engine was built from that version's model file and passed its gate on the 10k "
        "test split (python -m benchmarks.gpu_engine --data, or the serve run with --data).",
    )
    attach.add_argument("engine", help="the engine file, model.fused.<gpu>.sm<cc>.zip")
    attach.add_argument("--store-model", metavar="NAME", help="model (default: the store's DEFAULT)")
    attach.add_argument("--version", type=int, help="the version it was built from (default newest)")
    attach.set_defaults(func=cmd_attach_engine)

    gpu_train = sub.add_parser(
        "gpu-train",
        help="train several QuickNet recipes at once on one GPU, time-boxed (see quicknet/build/gpu_train.py)",
        description="Train the arms at once on one GPU within --budget-s, saving results as they go. Flags "
        "default to the GPU recipe and apply to every arm; what an arm changes overrides them.",
    )
    _add_dataclass_flags(gpu_train, TrainConfig)
    from quicknet.build.gpu_train import ARMS, GPU_RECIPE

    gpu_train.add_argument(
        "--arms",
        default=",".join(ARMS),
        help="comma-separated arms to train at once, at most 3 (default: %(default)s)",
    )

    gpu_train.set_defaults(**dataclasses.asdict(GPU_RECIPE), func=cmd_gpu_train)
    gpu_train.add_argument("--data", help="CIFAR-10 npz copy (default: ../shared copy, else data/cifar10_jpeg.npz)")
    gpu_train.add_argument("--out", default="gpu-results/train", help="results folder (default: %(default)s)")
    gpu_train.add_argument(
        "--budget-s",
        type=number(float, "positive"),
        default=420.0,
        help="wall-clock budget for the whole job (default: %(default)s)",
    )
    gpu_train.add_argument(
        "--handoff",
        metavar="DIR",
        help="leave the best arm's checkpoint here (git-ignored, on the GPU machine) for the serve run's --from-train",
    )
    gpu_train.add_argument(
        "--compile-cache",
        metavar="PATH",
        help="an earlier draw's torch-compile-cache.<gpu>.zip, or a folder of them (gpu-cache/): the one built "
        "for this GPU, torch and Triton is loaded before the arms compile; none is a line in the results",
    )
    gpu_train.add_argument("--dry-run", action="store_true", help="the same code path on the CPU, tiny and fast")

    adopt = sub.add_parser(
        "adopt-gpu-run",
        parents=[data_flag, store_flags],
        help="publish what a GPU draw brought back: its best arm, its fused engine, its compile cache",
        description="After the README's GPU runs, with their folders copied into RESULTS (train/ and serve/): the "
        "compile cache into gpu-cache/; the arm the train run handed off exported, compiled, scored on the 10k test "
        "split and published (refused below the version it would replace; the default model when it beats it); the "
        "fused engine gated and attached to the version holding its weights. Done steps are passed over: after a "
        "refusal, the same command finishes what is left.",
    )
    adopt.add_argument("results", nargs="?", default="gpu-results", help="the returned folders (default: %(default)s)")
    adopt.add_argument("--arm", help="publish this arm instead of the one the train run handed off")
    adopt.add_argument(
        "--allow-partial", action="store_true", help="publish an arm its hard stop ended before its planned end"
    )
    adopt.add_argument(
        "--even-if-worse",
        action="store_true",
        help="publish an arm that scores below the version of its model it would replace",
    )
    adopt.add_argument(
        "--compile-cache", default="gpu-cache", metavar="DIR", help="the next draw reads it here (default: %(default)s)"
    )
    adopt.add_argument("--threads", type=number(int, "positive"), default=2, help="CPU threads for scoring")
    adopt.set_defaults(func=cmd_adopt_gpu_run)

    info = sub.add_parser("info", help="parameters and multiply-adds of every variant (no torch needed)")
    info.set_defaults(func=cmd_info)
