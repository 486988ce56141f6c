from __future__ import annotations

import json
import shutil

import pytest

from quicknet import store
from quicknet.errors import StoreError


@pytest.fixture
def artifact(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"onnx bytes")
    return f


def test_publish_round_trip_and_versions_increase(tmp_path, artifact):
    root = tmp_path / "store"
    v1 = store.publish(root, "quicknet-xs", [artifact], {"labels": ["a"], "accuracy": {}})
    v2 = store.publish(root, "quicknet-xs", [artifact], {"labels": ["a"], "accuracy": {}})
    assert (v1.version, v2.version) == (1, 2)
    got = store.get_version(root, "quicknet-xs")
    assert got.version == 2 and got.labels == ["a"]
    assert store.get_version(root, "quicknet-xs", 1).path == v1.path
    meta = json.loads((v1.path / "metadata.json").read_text())
    assert meta["files"]["model.onnx"]["sha256"] == store.sha256_file(artifact)
    store.verify_files(got)
    assert store.list_models(root) == ["quicknet-xs"]
    assert store.default_model(root) == "quicknet-xs"


def test_interrupted_publish_leaves_nothing(tmp_path, artifact, monkeypatch):
    root = tmp_path / "store"
    second = tmp_path / "model.int8.onnx"
    second.write_bytes(b"int8")
    calls = []
    real_copy = shutil.copyfile

    def failing_copy(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_copy(src, dst)

    monkeypatch.setattr(store.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        store.publish(root, "quicknet-xs", [artifact, second], {"labels": []})
    assert list((root / "quicknet-xs").iterdir()) == []
    assert store.list_versions(root, "quicknet-xs") == []


def test_existing_version_is_never_overwritten(tmp_path, artifact, monkeypatch):
    root = tmp_path / "store"
    store.publish(root, "m", [artifact], {"labels": []})
    monkeypatch.setattr(store, "list_versions", lambda *_: [])  # a racing publisher picked the same number
    with pytest.raises(StoreError, match="never overwritten"):
        store.publish(root, "m", [artifact], {"labels": []})
    assert [p.name for p in (root / "m").iterdir()] == ["1"]


def test_store_errors_are_one_line_and_actionable(tmp_path, artifact):
    root = tmp_path / "store"
    with pytest.raises(StoreError, match="not found.*quicknet build"):
        store.get_version(root, "quicknet")
    store.publish(root, "m", [artifact], {"labels": []})
    with pytest.raises(StoreError, match="no version 9 \\(have: 1\\)"):
        store.get_version(root, "m", 9)
    (root / "m" / "1" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(StoreError, match="altered since publish"):
        store.verify_files(store.get_version(root, "m"))
    with pytest.raises(StoreError, match="no published version"):
        store.set_default(root, "absent")


def test_default_marker_wins(tmp_path, artifact):
    root = tmp_path / "store"
    for name in ("a", "b"):
        store.publish(root, name, [artifact], {"labels": []})
    with pytest.raises(StoreError, match="no default model"):
        store.default_model(root)
    store.set_default(root, "b")
    assert store.default_model(root) == "b"


def test_plan_names_carry_gpu_and_versions():
    name = store.plan_filename("NVIDIA H100 80GB HBM3", (9, 0), "10.16.1.11", "fp16")
    assert name == "model.nvidia-h100-80gb-hbm3.sm90.trt10.16.1.11.fp16.plan"


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m.update(files={"model.onnx": "abc"}), '"files" must map'),
        (lambda m: m.update(files=["model.onnx"]), '"files" must map'),
        (lambda m: m.update(labels="cat,dog"), '"labels" must be a list'),
        (lambda m: m.update(artifacts={"onnx": 3}), '"artifacts" must map'),
    ],
)
def test_malformed_metadata_is_one_line_at_load(tmp_path, artifact, edit, fragment):
    mv = store.publish(tmp_path, "m", [artifact], {"labels": ["a"], "artifacts": {"onnx": artifact.name}})
    meta = json.loads((mv.path / "metadata.json").read_text())
    edit(meta)
    (mv.path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=fragment) as err:
        store.get_version(tmp_path, "m")
    assert "\n" not in str(err.value)


def test_the_tracked_tree_stays_under_30_mib_so_a_gpu_run_can_carry_it():
    """A GPU run receives the tracked tree and the carried wheels in at most 64 MiB; the published
    versions hold their FP32 weights once (model.onnx) beside the INT8 engine, nothing derived."""
    import shutil
    import subprocess

    from quicknet.testing import REPO

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the tracked tree is what a clone holds")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    total = sum((REPO / n).stat().st_size for n in names.decode().split("\0") if n and (REPO / n).is_file())
    assert total < 30 * 2**20, f"tracked tree {total / 2**20:.1f} MiB"
    versions = sorted((REPO / "model_store").glob("*/*/metadata.json"))
    assert {v.parent.parent.name for v in versions} == {"quicknet", "quicknet-xs"}, versions
    for version in versions:
        meta = json.loads(version.read_text())
        engines = [f for f in meta["files"] if f.endswith((".onnx", ".pt", ".pt2"))]
        assert sorted(engines) == ["model.int8.onnx", "model.onnx"], (version, engines)
