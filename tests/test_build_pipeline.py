"""The whole offline build on a tiny run: train → export → compile → eval → publish."""

from __future__ import annotations

import json

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
    build.stage_compile(run, cifar, tensorrt=False)
    build.stage_eval(run, cifar)
    return run


def test_every_stage_leaves_its_artifact_and_record(run_dir):
    for name in ("checkpoint.pt", "model.onnx", "model.opt.onnx", "model.int8.onnx", "confusion_matrix.png"):
        assert (run_dir / name).is_file(), name
    rec = json.loads((run_dir / "build.json").read_text())
    assert set(rec["stages"]) == {"train", "export", "compile", "eval"}
    export = rec["stages"]["export"]
    assert export["graph_nodes_after_fold"] < export["graph_nodes_before_fold"] + 4
    assert export["equivalence"]["max_abs_logit_delta"] <= 1e-3
    acc = rec["stages"]["eval"]["accuracy"]
    assert {"checkpoint", "checkpoint+flip-tta", "onnx", "onnx-optimized", "onnx-int8"} <= set(acc)
    assert acc["onnx"]["images"] == 10000
    assert abs(acc["onnx"]["top1"] - acc["checkpoint"]["top1"]) <= 0.001
    assert abs(acc["onnx-optimized"]["top1"] - acc["onnx"]["top1"]) <= 0.001
    assert len(acc["onnx"]["per_class"]) == 10


def test_publish_writes_complete_metadata(run_dir, tmp_path):
    mv = build.stage_publish(run_dir, tmp_path, make_default=True)
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
    assert store.default_model(tmp_path) == "quicknet-xs"
    store.verify_files(store.get_version(tmp_path, "quicknet-xs"))


def test_publish_refuses_a_worse_export(run_dir, tmp_path):
    rec = json.loads((run_dir / "build.json").read_text())
    rec["stages"]["eval"]["accuracy"]["onnx"]["top1"] = rec["stages"]["eval"]["accuracy"]["checkpoint"]["top1"] - 0.002
    bad = tmp_path / "bad-run"
    bad.mkdir()
    (bad / "build.json").write_text(json.dumps(rec))
    with pytest.raises(BuildError, match="refusing to publish"):
        build.stage_publish(bad, tmp_path / "store")
    assert not (tmp_path / "store").exists() or store.list_models(tmp_path / "store") == []


def test_stage_without_its_input_says_which_stage_to_run(tmp_path, cifar):
    with pytest.raises(BuildError, match="run `quicknet train`"):
        build.stage_export(tmp_path, cifar)
