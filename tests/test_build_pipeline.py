"""The whole offline build on a tiny run: train → export → compile → eval → publish."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from quicknet import store
from quicknet.build import pipeline as build
from quicknet.build.config import TrainConfig
from quicknet.errors import BuildError


@pytest.fixture(scope="module")
def run_dir(cifar, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(model="quicknet-xs", epochs=1, batch_size=128, train_subset=1024, eval_subset=256)
    build.stage_train(cfg, cifar, run)
    build.stage_export(run, cifar)
    build.stage_compile(run, cifar)  # TensorRT where it imports; here, the skip path with its reason
    build.stage_eval(run, cifar)
    return run


def test_every_stage_leaves_its_artifact_and_record(run_dir):
    for name in ("checkpoint.pt", "model.onnx", "model.int8.onnx", "confusion_matrix.png"):
        assert (run_dir / name).is_file(), name
    rec = json.loads((run_dir / "build.json").read_text())
    assert set(rec["stages"]) == {"train", "export", "compile", "eval"}
    compiled = rec["stages"]["compile"]
    assert "tensorrt" in compiled or compiled["tensorrt_skipped"].startswith("TensorRT is not installed")
    export = rec["stages"]["export"]
    assert export["graph_nodes_after_fold"] < export["graph_nodes_before_fold"] + 4
    assert export["equivalence"]["max_abs_logit_delta"] <= 1e-3
    acc = rec["stages"]["eval"]["accuracy"]
    assert {"checkpoint", "checkpoint+flip-tta", "onnx", "onnx-int8"} <= set(acc)
    assert acc["onnx"]["images"] == 10000
    assert abs(acc["onnx"]["top1"] - acc["checkpoint"]["top1"]) <= 0.001
    assert len(acc["onnx"]["per_class"]) == 10


def test_int8_is_quantized_from_the_graph_with_orts_fast_prelu_form(run_dir):
    """Each activation as int8 1x1 depthwise convolutions and an int8 Add (quicknet/ort_graph.py), not
    a float Min between a dequantize and a quantize: the published model.onnx keeps the portable form."""
    import onnx

    published = Counter(n.op_type for n in onnx.load(run_dir / "model.onnx").graph.node)
    int8 = Counter(n.op_type for n in onnx.load(run_dir / "model.int8.onnx").graph.node)
    assert published["Min"] == 9 and published["Conv"] == 17 and published["Mul"] == 9 + 1
    # what is left of Mul and Add is the input normalization's
    assert int8["Min"] == 0 and int8["Mul"] == 1, "no elementwise PReLU left to run in float or in int8"
    assert int8["Conv"] == 17 + 18 and int8["Add"] == 9 + 1, "two scalings an activation"
    graph = onnx.load(run_dir / "model.int8.onnx").graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    assert all(made_by.get(n.input[1]) == "DequantizeLinear" for n in graph.node if n.op_type == "Conv"), (
        "every convolution, the scalings too, has int8 weights"
    )


def _copy(run_dir, dest):
    """Publishing records itself in the run folder: each test publishes its own copy."""
    shutil.copytree(run_dir, dest)
    return dest


def test_the_confusion_matrix_is_titled_with_the_published_name(run_dir, tmp_path, cifar, monkeypatch):
    """Not the run folder's name (`runs/quicknet-xs-cpu`), which the store does not know."""
    import quicknet.build.evaluate

    titles = []
    monkeypatch.setattr(quicknet.build.evaluate, "plot_confusion", lambda report, path, title: titles.append(title))
    build.stage_eval(_copy(run_dir, tmp_path / "quicknet-xs-cpu"), cifar, limit=256)
    assert titles and titles[0].startswith("quicknet-xs: model.onnx, top-1 ") and "cpu" not in titles[0], titles
    assert titles[0].endswith("on 256 test images")


def test_publish_writes_complete_metadata(run_dir, tmp_path):
    mv = build.stage_publish(_copy(run_dir, tmp_path / "run"), tmp_path / "store", make_default=True)
    meta = mv.metadata
    for key in (
        "name",
        "version",
        "created",
        "architecture",
        "params",
        "macs_per_image",
        "inputs",
        "outputs",
        "labels",
        "build",
        "files",
        "accuracy",
        "dataset",
    ):
        assert key in meta, key
    assert meta["inputs"][0] == {"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3], "layout": "NHWC"}
    assert "JPEG-q75" in meta["dataset"]
    assert store.default_model(tmp_path / "store") == "quicknet-xs"
    store.verify_files(store.get_version(tmp_path / "store", "quicknet-xs"))
    # the weights once (FP32 ONNX) and the INT8 engine; no optimized or torch copy of them
    assert set(meta["files"]) == {"model.onnx", "model.int8.onnx", "epochs.jsonl", "training_curves.png"} | {
        "confusion_matrix.png"
    }
    assert meta["artifacts"] == {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
    # the weights model.onnx was exported from: a GPU engine built from that checkpoint attaches here
    assert meta["exported_from"] == {"file": "checkpoint.pt", "sha256": store.sha256_file(run_dir / "checkpoint.pt")}


def test_publish_records_the_gpu_run_that_trained_the_weights(run_dir, tmp_path):
    """`--training-results`: the GPU job's results.json names the GPU, driver, torch, CUDA, recipe,
    epochs and seconds, and its SHA-256 ties the version to it; the training curves are drawn from
    the run's epoch log where the GPU machine (no matplotlib) did not draw them."""
    results = {
        "job": "gpu-train",
        "started": "2026-12-04T16:11:00+00:00",
        "environment": {"gpu": "NVIDIA H200", "driver": "580.159.04", "torch": "2.11.0+cu130", "cuda_runtime": "13.0"},
        "recipe": {"model": "quicknet-xs", "epochs": 200, "cutout": 12},
        "final": {"epochs": 58, "train_seconds": 139.0, "top1": 0.9114},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    run = _copy(run_dir, tmp_path / "run")
    (run / "training_curves.png").unlink()
    meta = build.stage_publish(run, tmp_path / "store", training_results=tmp_path / "results.json").metadata
    trained_on = meta["training"]["trained_on"]
    assert trained_on["gpu"] == "NVIDIA H200" and trained_on["driver"] == "580.159.04"
    assert trained_on["torch"] == "2.11.0+cu130" and trained_on["cuda"] == "13.0"
    assert trained_on["recipe"]["cutout"] == 12 and trained_on["epochs"] == 58 and trained_on["train_seconds"] == 139.0
    assert trained_on["results_sha256"] == store.sha256_file(tmp_path / "results.json")
    assert "training_curves.png" in meta["files"] and (run / "training_curves.png").stat().st_size > 10_000

    for wrong in ({"job": "gpu-serve"}, {"recipe": {**results["recipe"], "model": "quicknet"}}, {"final": {}}):
        (tmp_path / "other.json").write_text(json.dumps(results | wrong))
        with pytest.raises(BuildError, match=r"other.json is not the results.json of the GPU training job that"):
            build.stage_publish(
                _copy(run_dir, tmp_path / "run2"), tmp_path / "store", training_results=tmp_path / "other.json"
            )
        shutil.rmtree(tmp_path / "run2")


def test_publish_takes_one_arm_of_a_several_arm_gpu_run(run_dir, tmp_path):
    """`gpu-train --arms` returns `<arm>/checkpoint.pt` and one results.json keeping each arm (its
    recipe, result and epochs) under `arms.<arm>`: the run folder's name picks the arm, and the
    curves come from the epochs kept there (the arm folder has no epochs.jsonl)."""
    run = _copy(run_dir, tmp_path / "quicknet-ls02")
    history = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
    (run / "epochs.jsonl").unlink()
    (run / "training_curves.png").unlink()
    arm = {"recipe": {"model": "quicknet-xs", "label_smoothing": 0.2}}
    arm["final"] = {"epochs": 70, "train_seconds": 300.0, "top1": 0.93}
    results = {
        "job": "gpu-train",
        "started": "2026-12-05T10:00:00+00:00",
        "environment": {"gpu": "NVIDIA H200", "driver": "580.159.04", "torch": "2.11.0+cu130", "cuda_runtime": "13.0"},
        "arms": {"quicknet": {"recipe": {}, "final": {}}, "quicknet-ls02": arm | {"epochs": history}},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    meta = build.stage_publish(run, tmp_path / "store", training_results=tmp_path / "results.json").metadata
    trained_on = meta["training"]["trained_on"]
    assert trained_on["arm"] == "quicknet-ls02" and trained_on["recipe"]["label_smoothing"] == 0.2
    assert (trained_on["epochs"], trained_on["top1"]) == (70, 0.93)
    assert "training_curves.png" in meta["files"]
    with pytest.raises(BuildError, match="that trained quicknet-s0"):  # an arm the run did not train
        build.stage_publish(
            _copy(run_dir, tmp_path / "quicknet-s0"), tmp_path / "store", training_results=tmp_path / "results.json"
        )


@pytest.mark.parametrize(
    ("artifact", "loss", "message"),
    [
        ("onnx", 0.002, "model.onnx scores"),
        ("onnx-int8", 0.006, "model.int8.onnx scores"),
        ("onnx-int8", None, "model.int8.onnx has no accuracy on the full 10k"),
    ],
)
def test_publish_gates_every_servable_artifact(run_dir, tmp_path, artifact, loss, message):
    rec = json.loads((run_dir / "build.json").read_text())
    acc = rec["stages"]["eval"]["accuracy"]
    if loss is None:
        acc[artifact]["images"] = 500
    else:
        acc[artifact]["top1"] = acc["checkpoint"]["top1"] - loss
    bad = tmp_path / "a bad run"  # a space: the offered command quotes it
    bad.mkdir()
    for f in ("model.onnx", "model.int8.onnx"):
        (bad / f).write_bytes((run_dir / f).read_bytes())
    (bad / "build.json").write_text(json.dumps(rec))
    root = tmp_path / "my store"
    with pytest.raises(BuildError, match=f"refusing to publish: {message}") as refused:
        build.stage_publish(bad, root, make_default=True)
    assert not root.exists() or store.list_models(root) == []
    if artifact == "onnx-int8" and loss is not None:  # the refusal offers the command that publishes without it
        gate = f"{100 * loss:.2f} points below the checkpoint's {acc['checkpoint']['top1']:.2%} (its gate: 0.5 point)"
        assert gate in str(refused.value), refused.value
        offered = str(refused.value).split("publish without it (FP32 serves): ", 1)[1]
        assert offered.startswith(f"rm '{bad / 'model.int8.onnx'}' && quicknet publish --run-dir '{bad}'"), offered
        done = subprocess.run(
            ["bash", "-c", offered.replace("&& quicknet ", f"&& {shlex.quote(sys.executable)} -m quicknet ")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        mv = store.get_version(root, store.default_model(root))  # into the store it was refused for, as default
        assert mv.metadata["artifacts"] == {"onnx": "model.onnx", "onnx-int8": None}
        assert "model.int8.onnx" not in mv.metadata["files"]


def test_int8_within_half_a_point_publishes_and_the_gates_are_recorded(run_dir, tmp_path):
    rec = json.loads((run_dir / "build.json").read_text())
    acc = rec["stages"]["eval"]["accuracy"]
    acc["onnx-int8"]["top1"] = acc["checkpoint"]["top1"] - 0.004
    ok = _copy(run_dir, tmp_path / "ok-run")
    (ok / "build.json").write_text(json.dumps(rec))
    meta = build.stage_publish(ok, tmp_path / "store").metadata
    assert set(meta["accuracy_gates"]) == {"onnx", "onnx-int8"}
    assert meta["accuracy_gates"]["onnx-int8"]["max_loss"] == 0.005


def test_publish_refuses_records_that_describe_other_files(run_dir, tmp_path):
    """build.json's export, compile and eval records name the files they were made from by SHA-256:
    a run trained again since its export published the old model.onnx under the new training record
    with the old accuracy; now each stale record names the stages to run again, and nothing is
    published."""
    root = tmp_path / "store"
    retrained = _copy(run_dir, tmp_path / "retrained")
    with (retrained / "checkpoint.pt").open("ab") as f:
        f.write(b"another training run")
    recompiled = _copy(run_dir, tmp_path / "recompiled")
    (recompiled / "model.int8.onnx").write_bytes(b"not what eval scored")
    reexported = _copy(run_dir, tmp_path / "reexported")
    (reexported / "model.onnx").write_bytes((run_dir / "model.onnx").read_bytes() + b"\0")
    unnamed = _copy(run_dir, tmp_path / "unnamed")
    rec = json.loads((unnamed / "build.json").read_text())
    rec["stages"]["eval"].pop("scored", None)  # a record from before this check
    (unnamed / "build.json").write_text(json.dumps(rec))
    for run, says in (
        (retrained, "model.onnx was exported from an earlier checkpoint.pt (the run trained again since): run "
         f"`quicknet export`, `compile` and `eval` for {retrained} again"),
        (reexported, "model.int8.onnx was quantized from an earlier model.onnx: run `quicknet compile` and `eval` "
         f"for {reexported} again"),
        (recompiled, "the accuracy in build.json was not measured on the model.int8.onnx there now: run `quicknet "
         f"eval` for {recompiled} again"),
        (unnamed, f"the eval record names no files it scored: run `quicknet eval` for {unnamed} again"),
    ):  # fmt: skip
        with pytest.raises(BuildError) as refused:
            build.stage_publish(run, root)
        assert str(refused.value) == f"refusing to publish: {says}"
    assert not root.exists() or store.list_models(root) == []
    # the same folders, their stages run again as the refusals say, publish: here the record of the
    # files as they are (what eval's re-run would write), without re-scoring them for the test
    rec = json.loads((recompiled / "build.json").read_text())
    rec["stages"]["eval"]["scored"]["model.int8.onnx"] = store.sha256_file(recompiled / "model.int8.onnx")
    (recompiled / "build.json").write_text(json.dumps(rec))
    assert build.stage_publish(recompiled, root).version == 1


def test_publish_refuses_a_stopped_run_a_missing_export_and_a_run_published_already(run_dir, tmp_path):
    """A build stopped by its time limit published its half-trained weights; deleting model.onnx was
    reported as a stale INT8 model; publishing a run twice made two versions of the same weights."""
    root = tmp_path / "store"
    stopped = _copy(run_dir, tmp_path / "stopped")
    rec = json.loads((stopped / "build.json").read_text())
    rec["stages"]["train"].update(stopped_early=True, epochs_run=3, planned_epochs=8)
    (stopped / "build.json").write_text(json.dumps(rec))
    with pytest.raises(BuildError) as refused:
        build.stage_publish(stopped, root)
    assert str(refused.value) == (
        f"refusing to publish: {stopped}'s training stopped after 3 of its 8 planned epochs: `quicknet train "
        "--resume` with its flags finishes it (then export, compile and eval), or publish it as it is with "
        "--allow-partial"
    )
    assert build.stage_publish(stopped, root, allow_partial=True).version == 1
    with pytest.raises(BuildError, match=f"^quicknet-xs version 1 in {root} already holds this run's model.onnx"):
        build.stage_publish(_copy(run_dir, tmp_path / "again"), root)
    assert store.list_versions(root, "quicknet-xs") == [1]
    unexported = _copy(run_dir, tmp_path / "unexported")
    (unexported / "model.onnx").unlink()
    with pytest.raises(
        BuildError, match=f"^refusing to publish: {unexported / 'model.onnx'} is missing; run `quicknet export`"
    ):
        build.stage_publish(unexported, root)


def test_stage_without_its_input_says_which_stage_to_run(tmp_path, cifar):
    with pytest.raises(BuildError, match="run `quicknet train`"):
        build.stage_export(tmp_path, cifar)


def _as_onnx_prelu(model):
    """The elementwise PReLU form (`x + (s-1)·Min(x, 0)`) turned back into ONNX `PRelu(x, s)`: the
    graph this project exported before that rewrite."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    by_output = {n.output[0]: n for n in model.graph.node}
    prelu_at, dropped = {}, set()  # the Add's output -> its PRelu; outputs of the Min and Mul
    for mul in [n for n in model.graph.node if n.op_type == "Mul" and n.input[1].endswith("_slope_minus_1")]:
        x = by_output[mul.input[0]].input[0]
        add = next(n for n in model.graph.node if n.op_type == "Add" and mul.output[0] in n.input)
        slope = numpy_helper.from_array(numpy_helper.to_array(inits[mul.input[1]]) + 1, mul.input[1] + "_plus_1")
        model.graph.initializer.append(slope)
        prelu_at[add.output[0]] = helper.make_node("PRelu", [x, slope.name], [add.output[0]], name=add.output[0])
        dropped |= {mul.input[0], mul.output[0]}
    nodes = [prelu_at.get(n.output[0], n) for n in model.graph.node if n.output[0] not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for n in nodes for name in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def test_republish_rewrites_a_published_prelu_graph_and_keeps_its_accuracy(run_dir, cifar, tmp_path):
    """A version exported with ONNX PRelu (as the first quicknet-xs was): republishing re-derives its
    engines with the elementwise form (the same function) and publishes v2 at the same accuracy,
    gated, carrying its reports and no engine of the source's."""
    import onnx

    prelu = _as_onnx_prelu(onnx.load(run_dir / "model.onnx"))
    onnx.checker.check_model(prelu, full_check=True)
    source = tmp_path / "v1"
    source.mkdir()
    onnx.save(prelu, source / "model.onnx")
    (source / "model.opt.onnx").write_bytes(b"an engine of the old layout")
    (source / "confusion_matrix.png").write_bytes((run_dir / "confusion_matrix.png").read_bytes())
    acc = json.loads((run_dir / "build.json").read_text())["stages"]["eval"]["accuracy"]
    # the PRelu graph computes the export's function, so the export's full-split score stands for it
    # (scoring it again here would cost ~8 s); republish scores its own engines on the full split
    acc = {k: v for k, v in acc.items() if k.startswith("checkpoint") or k == "onnx"}
    meta = {"labels": list("0123456789"), "accuracy": acc}
    meta["artifacts"] = {"onnx": "model.onnx", "onnx-optimized": "model.opt.onnx"}
    root = tmp_path / "store"
    v1 = store.publish(
        root, "quicknet-xs", [source / f for f in ("model.onnx", "model.opt.onnx", "confusion_matrix.png")], meta
    )
    store.set_default(root, "quicknet-xs")
    assert any(n.op_type == "PRelu" for n in onnx.load(v1.file("model.onnx")).graph.node)
    v2 = build.republish(root, "quicknet-xs", None, cifar, why="test")
    assert v2.version == 2 and v2.metadata["derived_from"] == {**v2.metadata["derived_from"], "version": 1}
    assert not any(n.op_type == "PRelu" for n in onnx.load(v2.file("model.onnx")).graph.node)
    assert v2.metadata["accuracy"]["onnx"]["top1"] == v1.metadata["accuracy"]["onnx"]["top1"]
    assert set(v2.metadata["accuracy_gates"]) == {"onnx", "onnx-int8"}
    assert set(v2.metadata["files"]) == {"model.onnx", "model.int8.onnx", "confusion_matrix.png"}
    assert v2.metadata["artifacts"] == {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
    assert store.default_model(root) == "quicknet-xs"
    store.verify_files(v2)


def _gpu_results(run_dir, where, *, handoff=True, engines=()):
    """What the README's two GPU runs return, copied into `where` as `gpu-results/`: the train run's
    results.json and two arms (the run folder above as `quicknet-ls02`, handed off, beside one that
    left nothing), the serve run's compile cache and the fused engines `engines` names as (file name,
    its source, its top-1 on the 10k split); `_ARM` in a source is the handed-off checkpoint."""
    from quicknet.fused import engine as fe

    train, serve = where / "train", where / "serve"
    arm = _copy(run_dir, train / "quicknet-ls02")
    digest = store.sha256_file(arm / "checkpoint.pt")
    recipe = {"model": "quicknet-xs", "label_smoothing": 0.2}
    results = {
        "job": "gpu-train",
        "started": "2026-12-06T10:00:00+00:00",
        "environment": {"gpu": "NVIDIA H200", "driver": "580.159.04", "torch": "2.11.0+cu130", "cuda_runtime": "13.0"},
        "arms": {
            "quicknet": {"state": "failed", "recipe": {"model": "quicknet"}},
            "quicknet-ls02": {
                "state": "done",
                "recipe": recipe,
                "final": {"epochs": 3, "train_seconds": 9, "top1": 0.3},
            },
        },
        "handoff": {"arm": "quicknet-ls02", "checkpoint_sha256": digest}
        if handoff
        else "no arm finished with a checkpoint and a score",
    }
    (train / "results.json").write_text(json.dumps(results))
    serve.mkdir()
    (serve / "torch-compile-cache.nvidia-h200.zip").write_bytes(b"what torch.compile built in each arm")
    for name, source, top1 in engines:
        source = (
            {"file": "model.folded.pt", "sha256": "f" * 64, "checkpoint_sha256": digest} if source is _ARM else source
        )
        gate = {"images": 10000, "top1": top1, "max_loss": 0.001, "passed": True}
        doc = {"built_for": {"gpu": name.split(".")[2], "compute_capability": "9.0"}, "source": source, "gate": gate}
        fe.write_artifact(serve / name, doc, None, set())
    return where


_ARM = object()


def _store(root, **top1):
    """A store of stand-in versions (one each, `model.onnx` of its own bytes) with these checkpoint
    top-1s, the first model the default."""
    for name, value in top1.items():
        folder = root.parent / "stand-ins" / name
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(f"stands in for {name}'s weights".encode())
        meta = {"labels": ["a"], "artifacts": {"onnx": "model.onnx"}}
        meta["accuracy"] = {"checkpoint": {"top1": value, "images": 10000}}
        store.publish(root, name, [folder / "model.onnx"], meta)
    store.set_default(root, next(iter(top1)))
    return root


def _run_top1(run_dir) -> float:
    return json.loads((run_dir / "build.json").read_text())["stages"]["eval"]["accuracy"]["checkpoint"]["top1"]


def test_adopt_gpu_run_publishes_the_handed_off_arm_then_its_engine_and_keeps_the_compile_cache(run_dir, tmp_path):
    """`quicknet adopt-gpu-run`: the steps the README listed by hand after a draw, in one command that
    runs again to finish what a refusal left. An arm below the version it would replace is refused
    until --even-if-worse; the default model stays the better one; each engine attaches to the
    version holding its weights (the arm's checkpoint, or a published model.onnx where the serve run
    had no hand-off); done steps are passed over."""
    from quicknet.build.adopt import adopt
    from quicknet.testing import REPO

    top1 = _run_top1(run_dir)
    scored = json.loads((run_dir / "build.json").read_text())["stages"]["eval"]["accuracy"]
    root = _store(tmp_path / "store", quicknet=0.95, **{"quicknet-xs": 0.99})
    published_onnx = store.get_version(root, "quicknet").metadata["files"]["model.onnx"]["sha256"]
    engines = [
        ("model.fused.nvidia-h200.sm90.zip", _ARM, top1),
        ("model.fused.nvidia-h100.sm90.zip", {"file": "model.onnx", "sha256": published_onnx}, 0.9495),
    ]
    results = _gpu_results(run_dir, tmp_path / "gpu-results", engines=engines)
    cache = tmp_path / "gpu-cache"
    said: list[str] = []

    def no_data():
        raise AssertionError("the run folder was scored already: no stage runs again")

    def again(**flags):
        adopt(results, root, no_data, cache_dir=cache, say=said.append, **flags)

    below = "below quicknet-xs v1's 99.00%: published, it would be served in that version's place; --even-if-worse"
    with pytest.raises(BuildError, match=f"^quicknet-ls02 scores {top1:.2%}, {below}"):
        again()
    assert store.list_versions(root, "quicknet-xs") == [1] and store.list_versions(root, "quicknet") == [1]
    assert (cache / "torch-compile-cache.nvidia-h200.zip").read_bytes() == b"what torch.compile built in each arm"

    # the README table's rows for the store as it is now, the speed columns to be measured
    table = [
        'README, "The published models" (the speed columns from benchmarks/README.md):',
        "| `quicknet` (default) | 2 | - | - | 95.00% | - | - | - | ? | ? |",
        f"| `quicknet-xs` | 3 | 0.231 M | 0.034 G | {top1:.2%} | "
        + " | ".join(f"{scored[kind]['top1']:.2%}" for kind in ("onnx", "onnx-int8", "checkpoint+flip-tta"))
        + " | ? | ? |",
    ]
    said.clear()
    again(even_if_worse=True)
    assert said == [
        f"compile cache: {cache}/torch-compile-cache.nvidia-h200.zip is there already",
        "quicknet-ls02: exported, compiled and scored already",
        f"quicknet-ls02: published quicknet-xs v2 ({top1:.2%} on the 10k test split); the default stays quicknet "
        "(v1, 95.00%)",
        "model.fused.nvidia-h100.sm90.zip: gated and published as quicknet v2 (v1's files and the engine)",
        "model.fused.nvidia-h200.sm90.zip: gated and published as quicknet-xs v3 (v2's files and the engine)",
        *table,
    ]
    published = store.get_version(root, "quicknet-xs", 2).metadata
    assert published["training"]["trained_on"]["arm"] == "quicknet-ls02"
    assert published["exported_from"]["sha256"] == store.sha256_file(results / "train/quicknet-ls02/checkpoint.pt")
    for name, version, engine in (("quicknet-xs", 3, engines[0][0]), ("quicknet", 2, engines[1][0])):
        served = store.get_version(root, name)
        assert served.version == version and served.metadata["artifacts"]["fused-gpu"] == engine
    assert store.default_model(root) == "quicknet"

    said.clear()
    again(even_if_worse=True)
    assert said[1:] == [
        "quicknet-ls02: exported, compiled and scored already",
        "quicknet-ls02: published already, as quicknet-xs v2",
        "model.fused.nvidia-h100.sm90.zip: published already, in quicknet v2",
        "model.fused.nvidia-h200.sm90.zip: published already, in quicknet-xs v3",
        *table,
    ]
    assert store.list_versions(root, "quicknet-xs") == [1, 2, 3] and store.list_versions(root, "quicknet") == [1, 2]
    # what `make gpu-adopt` runs, from the folder the README copies the runs into
    assert (
        "\ngpu-adopt: venv-dev\n\t$(BIN)/python -m quicknet adopt-gpu-run gpu-results\n"
        in (REPO / "Makefile").read_text()
    )


def test_adopt_gpu_run_runs_the_stages_an_arm_has_not_been_through(run_dir, tmp_path, monkeypatch):
    """An arm as it comes back (a checkpoint and its training record) goes through export, compile
    and eval on the data, loaded once, before anything is published."""
    from quicknet.build import adopt

    results = _gpu_results(run_dir, tmp_path / "gpu-results")
    record = results / "train/quicknet-ls02/build.json"
    rec = json.loads(record.read_text())
    record.write_text(json.dumps({"stages": {"train": rec["stages"]["train"]}}))
    calls, data = [], object()

    class Scored(Exception):
        pass

    def stage(name):
        def run(run_dir, ds, **kwargs):
            calls.append((name, run_dir.name, ds, kwargs))
            if name == "eval":
                raise Scored

        return run

    for name in ("export", "compile", "eval"):
        monkeypatch.setattr(build, f"stage_{name}", stage(name))
    loads = []
    with pytest.raises(Scored):
        adopt.adopt(results, tmp_path / "store", lambda: loads.append(1) or data, cache_dir=tmp_path / "c", threads=3)
    assert loads == [1]
    assert calls == [
        ("export", "quicknet-ls02", data, {}),
        ("compile", "quicknet-ls02", data, {"tensorrt": False}),
        ("eval", "quicknet-ls02", data, {"threads": 3}),
    ]


def test_adopt_gpu_run_refuses_what_it_cannot_publish_in_one_line(run_dir, tmp_path, capsys):
    """An arm the job did not train, a checkpoint other than the one handed off, an arm its hard stop
    ended (until --allow-partial), an engine built from weights the store does not hold: each a line
    and exit 2, the store untouched. No hand-off publishes nothing, said. An arm that beats the
    default model becomes the default; into a store with no model, the arm is the default."""
    from quicknet.cli import main

    root, cache = tmp_path / "store", ["--compile-cache", str(tmp_path / "gpu-cache")]

    def adopt(results, *flags, into=root) -> tuple[int, str, str]:
        code = main(["adopt-gpu-run", str(results), "--store", str(into), *cache, *flags])
        out, err = capsys.readouterr()
        return code, out, err

    def refused(results, *flags) -> str:
        code, _, err = adopt(results, *flags)
        assert code == 2 and err.count("\n") == 1 and not root.exists(), err
        return err

    none = _gpu_results(run_dir, tmp_path / "none", handoff=False)
    code, out, _ = adopt(none)
    assert code == 0 and not root.exists()
    assert "hands off no arm (no arm finished with a checkpoint and a score): nothing published; --arm NAME" in out
    assert "--arm quicknet-s0: the job trained quicknet, quicknet-ls02" in refused(none, "--arm", "quicknet-s0")
    missing = "quicknet/checkpoint.pt is missing: the arm quicknet left no weights (failed)"
    assert missing in refused(none, "--arm", "quicknet")
    (none / "train/results.json").write_text('{"job": "gpu-train", "arms": ["quicknet"]}')
    assert "results.json is not a gpu-train job's results (TypeError: arms)" in refused(none)

    other = _gpu_results(run_dir, tmp_path / "other")
    (other / "train/quicknet-ls02/checkpoint.pt").write_bytes(b"another run's weights")
    assert "is not the checkpoint the job handed off" in refused(other)
    assert "is not the checkpoint the job handed off" in refused(other, "--arm", "quicknet-ls02")

    stranger = {"file": "model.onnx", "sha256": "0" * 64}
    unknown = _gpu_results(
        run_dir, tmp_path / "unknown", handoff=False, engines=[("model.fused.x.sm90.zip", stranger, 0.9)]
    )
    assert "model.fused.x.sm90.zip was built from weights no version in" in refused(unknown)

    stopped = _gpu_results(run_dir, tmp_path / "stopped")
    record = stopped / "train/quicknet-ls02/build.json"
    rec = json.loads(record.read_text())
    rec["stages"]["train"] |= {"stopped_early": True, "epochs_run": 40, "planned_epochs": 90}
    record.write_text(json.dumps(rec))
    hard_stop = "quicknet-ls02 was ended by its hard stop after 40 of its 90 planned epochs: --allow-partial publishes"
    assert hard_stop in refused(stopped)
    code, out, _ = adopt(stopped, "--allow-partial")
    assert code == 0 and "published quicknet-xs v1" in out and "the default model now (the store had no model)" in out
    assert store.default_model(root) == "quicknet-xs"

    # a refusal after something was published still gives the table's rows for the store as it is
    late = _gpu_results(run_dir, tmp_path / "late", engines=[("model.fused.x.sm90.zip", stranger, 0.9)])
    code, out, err = adopt(late, into=tmp_path / "late-store")
    assert code == 2 and "model.fused.x.sm90.zip was built from weights no version in" in err
    assert "published quicknet-xs v1" in out and "\n| `quicknet-xs` (default) | 1 | 0.231 M | 0.034 G |" in out

    worse = _store(tmp_path / "worse", quicknet=0.05)
    code, out, _ = adopt(stopped, "--allow-partial", into=worse)
    assert code == 0 and "the default model now (was quicknet v1, 5.00%)" in out
    assert store.default_model(worse) == "quicknet-xs"
