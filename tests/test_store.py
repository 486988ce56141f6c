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


def test_publishing_where_a_file_stands_is_one_line(tmp_path, artifact):
    """A store path that is a file, or runs through one, or a file where the model's folder goes:
    a StoreError naming it (it was a NotADirectoryError traceback), and nothing written."""
    (tmp_path / "file").write_text("x")
    for root in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(StoreError, match=f"^cannot publish into model store {root}: {tmp_path / 'file'} is a file"):
            store.publish(root, "quicknet-xs", [artifact], {"labels": []})
    root = tmp_path / "store"
    root.mkdir()
    (root / "quicknet-xs").write_text("x")
    with pytest.raises(StoreError, match=f"^cannot publish into model store {root}: {root / 'quicknet-xs'} is a file"):
        store.publish(root, "quicknet-xs", [artifact], {"labels": []})
    assert (tmp_path / "file").read_text() == "x" and (root / "quicknet-xs").read_text() == "x"


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


def test_plan_and_cache_names_carry_gpu_and_versions():
    """The plans and the caches the build keeps beside them, so that a plan folder shared by pods on
    other GPUs or TensorRT versions (deploy/k8s/components/plan-cache) never hands one another's files."""
    name = store.plan_filename("NVIDIA H100 80GB HBM3", (9, 0), "10.16.1.11", "fp16")
    assert name == "model.nvidia-h100-80gb-hbm3.sm90.trt10.16.1.11.fp16.plan"
    timing, calibration = store.plan_cache_filenames("NVIDIA H100 80GB HBM3", (9, 0), "10.16.1.11")
    assert timing == "timing.nvidia-h100-80gb-hbm3.sm90.trt10.16.1.11.cache"
    assert calibration == "int8-calibration.trt10.16.1.11.cache"
    other_trt = store.plan_cache_filenames("NVIDIA H100 80GB HBM3", (9, 0), "10.8.0.43")
    other_gpu = store.plan_cache_filenames("NVIDIA H200", (9, 0), "10.16.1.11")
    assert other_trt[0] != timing and other_trt[1] != calibration and other_gpu[0] != timing


def test_a_file_written_atomically_is_whole_or_absent(tmp_path):
    """How plans and their caches are written (`fsutil.atomic_write`): a reader meanwhile, a pod
    sharing the plan folder, sees the old file whole, and a failed write leaves nothing behind."""
    from quicknet.fsutil import atomic_write

    target = tmp_path / "plans" / "model.plan"
    with atomic_write(target) as f:
        f.write(b"first")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"half of the second")
        assert target.read_bytes() == b"first"
        raise RuntimeError("the build failed")
    assert target.read_bytes() == b"first" and [p.name for p in target.parent.iterdir()] == ["model.plan"]


def _fake_tensorrt(monkeypatch) -> None:
    """What the plan code asks of TensorRT and of the GPU, where neither exists (here, CI)."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.16.1.11"))
    monkeypatch.setattr(store, "gpu_identity", lambda: ("NVIDIA H200", (9, 0)))


def test_a_plan_folder_holds_one_version_of_one_model(tmp_path, artifact, monkeypatch):
    """With --plan-dir (the GPU image's /plans) every version's plan has a folder of its own: one
    folder for all, as before, served the first plan built (one model's weights) as every model
    and every later version."""
    from quicknet.serve.backends import tensorrt
    from quicknet.serve.config import Settings

    _fake_tensorrt(monkeypatch)
    monkeypatch.setattr(tensorrt, "gpu_identity", store.gpu_identity)
    root, plans = tmp_path / "store", tmp_path / "plans"
    a1 = store.publish(root, "a", [artifact], {"labels": []})
    a2 = store.publish(root, "a", [artifact], {"labels": []})
    b1 = store.publish(root, "b", [artifact], {"labels": []})
    assert store.plan_folder(None, a1) == a1.path and store.plan_folder(plans, a2) == plans / "a" / "2"
    settings = Settings(plan_dir=plans)
    built = store.plan_folder(plans, a1) / store.plan_filename("NVIDIA H200", (9, 0), "10.16.1.11", "fp16")
    built.parent.mkdir(parents=True)
    built.write_bytes(b"plan")
    assert tensorrt.find_plan(a1, settings) == built
    assert tensorrt.find_plan(a2, settings) is None and tensorrt.find_plan(b1, settings) is None


def test_quicknet_plan_all_builds_each_models_latest_version_once(tmp_path, artifact, monkeypatch, capsys):
    """The GPU image's start: `quicknet plan --all --plan-dir /plans` builds what is missing, each
    version into its own folder, and a restart builds nothing again."""
    from quicknet.build import compile as compile_mod
    from quicknet.cli import main

    _fake_tensorrt(monkeypatch)
    monkeypatch.setattr(compile_mod, "import_tensorrt", lambda: __import__("tensorrt"))
    built = []

    def fake_build(onnx_path, out_dir, options):
        path = out_dir / store.plan_filename("NVIDIA H200", (9, 0), "10.16.1.11", "fp16")
        path.write_bytes(onnx_path.read_bytes())
        built.append(path)
        return path

    monkeypatch.setattr(compile_mod, "build_tensorrt_plan", fake_build)
    root, plans = tmp_path / "store", tmp_path / "plans"
    onnx = tmp_path / "model.onnx"
    for name, weights in (("a", b"a v1"), ("a", b"a v2"), ("b", b"b v1"), ("c", b"c v1")):
        onnx.write_bytes(weights)  # each version's own bytes: its plan must be built from them
        store.publish(root, name, [onnx], {"labels": []})
    store.set_default(root, "a")
    (root / "c" / "1" / "model.onnx").unlink()  # a broken version: said and skipped, the others built
    main(["plan", "--all", "--model-store", str(root), "--plan-dir", str(plans)])
    assert {p.relative_to(plans).parts[:2]: p.read_bytes() for p in built} == {("a", "2"): b"a v2", ("b", "1"): b"b v1"}
    assert "error: c: no plan built" in capsys.readouterr().err
    built.clear()
    main(["plan", "--all", "--model-store", str(root), "--plan-dir", str(plans)])
    assert built == [] and capsys.readouterr().out.count("nothing to build") == 2


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


def test_quicknet_plan_says_in_one_line_what_it_cannot_do(tmp_path, artifact, monkeypatch, capsys):
    from quicknet.build import compile as compile_mod
    from quicknet.cli import main

    _fake_tensorrt(monkeypatch)
    monkeypatch.setattr(compile_mod, "import_tensorrt", lambda: __import__("tensorrt"))
    root = tmp_path / "store"
    store.publish(root, "a", [artifact], {"labels": []})
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    for argv, said in (
        (["--all", "--model-store", str(tmp_path / "none")], "does not exist"),
        (["--all", "--store-model", "a", "--model-store", str(root)], "--all builds every model's latest version"),
        (["--model-store", str(root), "--plan-dir", str(blocked)], "a v1: no plan built in"),
    ):
        assert main(["plan", *argv]) != 0
        err = capsys.readouterr().err.strip()
        assert said in err and err.startswith("error: ") and "\n" not in err, err
