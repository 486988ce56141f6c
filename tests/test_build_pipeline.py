"""The whole offline build on a tiny run: train → export → compile → eval → publish."""

from __future__ import annotations

import json
import shutil

import pytest

from quicknet import build, store
from quicknet.config import TrainConfig
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
    for name in ("checkpoint.pt", "model.onnx", "model.opt.onnx", "model.int8.onnx", "confusion_matrix.png"):
        assert (run_dir / name).is_file(), name
    rec = json.loads((run_dir / "build.json").read_text())
    assert set(rec["stages"]) == {"train", "export", "compile", "eval"}
    compiled = rec["stages"]["compile"]
    assert "tensorrt" in compiled or compiled["tensorrt_skipped"].startswith("TensorRT is not installed")
    export = rec["stages"]["export"]
    assert export["graph_nodes_after_fold"] < export["graph_nodes_before_fold"] + 4
    assert export["equivalence"]["max_abs_logit_delta"] <= 1e-3
    acc = rec["stages"]["eval"]["accuracy"]
    assert {"checkpoint", "checkpoint+flip-tta", "onnx", "onnx-optimized", "onnx-int8"} <= set(acc)
    assert acc["onnx"]["images"] == 10000
    assert abs(acc["onnx"]["top1"] - acc["checkpoint"]["top1"]) <= 0.001
    assert abs(acc["onnx-optimized"]["top1"] - acc["onnx"]["top1"]) <= 0.001
    assert len(acc["onnx"]["per_class"]) == 10


def _copy(run_dir, dest):
    """Publishing records itself in the run folder: each test publishes its own copy."""
    shutil.copytree(run_dir, dest)
    return dest


def test_the_confusion_matrix_is_titled_with_the_published_name(run_dir, tmp_path, cifar, monkeypatch):
    """Not the run folder's name (`runs/quicknet-xs-cpu`), which the store does not know."""
    import quicknet.evaluate

    titles = []
    monkeypatch.setattr(quicknet.evaluate, "plot_confusion", lambda report, path, title: titles.append(title))
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


@pytest.mark.parametrize(
    ("artifact", "loss", "message"),
    [
        ("onnx", 0.002, "model.onnx scores"),
        ("onnx-optimized", 0.002, "model.opt.onnx scores"),
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
    bad = tmp_path / "bad-run"
    bad.mkdir()
    for f in ("model.onnx", "model.opt.onnx", "model.int8.onnx"):
        (bad / f).write_bytes((run_dir / f).read_bytes())
    (bad / "build.json").write_text(json.dumps(rec))
    with pytest.raises(BuildError, match=f"refusing to publish: {message}"):
        build.stage_publish(bad, tmp_path / "store")
    assert not (tmp_path / "store").exists() or store.list_models(tmp_path / "store") == []


def test_int8_within_half_a_point_publishes_and_the_gates_are_recorded(run_dir, tmp_path):
    rec = json.loads((run_dir / "build.json").read_text())
    acc = rec["stages"]["eval"]["accuracy"]
    acc["onnx-int8"]["top1"] = acc["checkpoint"]["top1"] - 0.004
    ok = _copy(run_dir, tmp_path / "ok-run")
    (ok / "build.json").write_text(json.dumps(rec))
    meta = build.stage_publish(ok, tmp_path / "store").metadata
    assert set(meta["accuracy_gates"]) == {"onnx", "onnx-optimized", "onnx-int8"}
    assert meta["accuracy_gates"]["onnx-int8"]["max_loss"] == 0.005


def test_stage_without_its_input_says_which_stage_to_run(tmp_path, cifar):
    with pytest.raises(BuildError, match="run `quicknet train`"):
        build.stage_export(tmp_path, cifar)


def test_republish_rewrites_a_published_prelu_graph_and_keeps_its_accuracy(cifar, tmp_path):
    """The shipped v1 was exported with ONNX PRelu; republishing re-derives its engines with the
    elementwise form (the same function) and publishes v2 at the same accuracy, gated."""
    import onnx

    from tests.serving import STORE

    v1 = next(store.get_version(STORE, "quicknet-xs", v) for v in store.list_versions(STORE, "quicknet-xs"))
    assert any(n.op_type == "PRelu" for n in onnx.load(v1.file("model.onnx")).graph.node)
    root = tmp_path / "store"
    meta = {k: v for k, v in v1.metadata.items() if k not in ("name", "version", "files")}
    store.publish(root, "quicknet-xs", [v1.file(f) for f in v1.metadata["files"]], meta)
    store.set_default(root, "quicknet-xs")
    v2 = build.republish(root, "quicknet-xs", None, cifar, why="test")
    assert v2.version == 2 and v2.metadata["derived_from"] == {**v2.metadata["derived_from"], "version": 1}
    assert not any(n.op_type == "PRelu" for n in onnx.load(v2.file("model.onnx")).graph.node)
    for kind in ("onnx", "onnx-optimized"):
        assert v2.metadata["accuracy"][kind]["top1"] == v1.metadata["accuracy"][kind]["top1"]
    assert set(v2.metadata["accuracy_gates"]) == {"onnx", "onnx-optimized", "onnx-int8"}
    assert store.default_model(root) == "quicknet-xs"
    store.verify_files(v2)
