"""The fused GPU engine (issue 27) on a CPU: its kernels' arithmetic in Triton's interpreter against
the folded PyTorch model, its kernels compiled for Hopper (sm_90) without a GPU, its file, the
service's choice and refusal, and publishing. The GPU step's dry run is in test_gpu_jobs.py."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere: kernels are decorated at import

import json
import logging
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from quicknet import store
from quicknet.build import gpu_engine
from quicknet.build.export import folded_spec
from quicknet.build.fold import fold
from quicknet.build.model import ArchConfig, QuickNet
from quicknet.errors import BuildError
from quicknet.fused import engine as fe
from quicknet.serve.backends.pytorch import build_folded
from quicknet.testing import REPO
from tests.trained import trained_looking

# The layers of quicknet at 1/16 width: every kind of fused layer (stem, plain, pooled, mean), fast
# in the interpreter (which runs one program at a time in numpy).
TINY = ArchConfig(name="quicknet-tiny", stem=16, stages=((16, 16), (32, 32), (32, 64)))
# quicknet-res at 1/16 width: shortcuts on plain, pooled and mean (last) blocks, as in the full one.
TINY_RES = ArchConfig(name="quicknet-res-tiny", stem=16, stages=((16, 16), (32, 32), (64, 64)), residual=True)


def _trained_looking(cfg: ArchConfig = TINY, seed: int = 0) -> QuickNet:
    """Untrained weights give near-constant logits (the check would pass on anything): random BN
    statistics, PReLU slopes and a classifier that spreads the logits."""
    torch.manual_seed(seed)
    return trained_looking(QuickNet(cfg), classifier_std=1.0)


def _spec(depthwise_bias: bool = False, equal_slopes_at: int | None = None) -> dict:
    spec = folded_spec(fold(_trained_looking()))
    if depthwise_bias:  # not what fold makes today; the packer folds it into the pointwise bias
        i = next(i for i, la in enumerate(spec["layers"]) if la["op"] == "conv" and la["groups"] > 1)
        spec["layers"][i]["bias"] = True
        spec["state_dict"][f"features.{i}.bias"] = torch.randn(spec["layers"][i]["out"]) * 0.5
    if equal_slopes_at is not None:  # fold writes LeakyReLU when every slope of a PReLU is equal
        i = [i for i, la in enumerate(spec["layers"]) if la["op"] == "prelu"][equal_slopes_at]
        spec["layers"][i] = {"op": "leaky_relu", "slope": 0.2}
        del spec["state_dict"][f"features.{i}.weight"]
    return spec


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp16 activations and matmul operands against fp32: within 2% of the logits' range, same top-1."""
    scale = float(want.abs().max())
    assert scale > 1.0, "logits must spread for the comparison to mean anything"
    assert float((got - want).abs().max()) <= 0.02 * scale
    assert torch.equal(got.argmax(1), want.argmax(1))


def _gpu_configs(layers: list[dict], size: str) -> list[dict | None]:
    """The tile shapes a GPU would time (not the interpreter's one big tile): several tiles per layer,
    so partial tiles, pooled windows and whole-image means across tiles are all exercised."""
    saved = os.environ.pop("TRITON_INTERPRET")
    try:
        return [fe.candidate_configs(la, size == "small")[-1] if la["kind"] != "head" else None for la in layers]
    finally:
        os.environ["TRITON_INTERPRET"] = saved


def test_the_kernels_compute_the_folded_model():
    """Stem (normalization at load, zero padding in normalized space), separable blocks with the
    depthwise in the matmul's operand, 2x2 pools and the global mean in the epilogue, per-channel
    PReLU and fixed-slope LeakyReLU, a depthwise bias: against the folded model in fp32."""
    spec = _spec(depthwise_bias=True, equal_slopes_at=2)
    layers, arrays = fe.pack(spec)
    assert [la["kind"] for la in layers] == ["stem"] + ["separable"] * 6 + ["head"]
    assert [la["pool"] for la in layers[1:-1]] == [False, True, False, True, False, False]
    assert layers[-2]["mean"] and not any(la["mean"] for la in layers[1:-2])
    reference = build_folded(spec)
    x = _images(3)  # 3: partial tiles everywhere
    with torch.inference_mode():
        want = reference(x)
        net = fe.FusedNet(layers, arrays, fe.default_configs(layers), "cpu")
        _close(net(x), want)
        _close(net(x, _gpu_configs(layers, "large")), want)


def test_the_kernels_add_quicknet_res_shortcuts():
    """A shortcut around a separable block is the block's input added in its epilogue, before the
    pool or the global mean; without it the logits are another model's."""
    spec = folded_spec(fold(_trained_looking(TINY_RES)))
    layers, arrays = fe.pack(spec)
    blocks = layers[1:-1]
    assert [la["residual"] for la in blocks] == [True, True, False, True, False, True]
    assert [la["pool"] for la in blocks] == [False, True, False, True, False, False] and blocks[-1]["mean"]
    reference = build_folded(spec)
    x = _images(3)
    with torch.inference_mode():
        want = reference(x)
        net = fe.FusedNet(layers, arrays, fe.default_configs(layers), "cpu")
        _close(net(x), want)
        _close(net(x, _gpu_configs(layers, "large")), want)
        # 16-channel column tiles: each program adds its own channels of the shortcut (offs_n)
        narrow = [dict(cfg, BLOCK_N=16) if cfg else None for cfg in _gpu_configs(layers, "small")]
        _close(net(x, narrow), want)
        plain = [dict(la, residual=False) if la["kind"] == "separable" else la for la in layers]
        dropped = fe.FusedNet(plain, arrays, fe.default_configs(plain), "cpu")(x)
    assert float((dropped - want).abs().max()) > 0.1 * float(want.abs().max())


def test_a_tile_the_gpu_cannot_launch_is_passed_over_not_the_end_of_the_build(monkeypatch):
    """A candidate past the GPU's shared memory fails at launch (Triton's OutOfResources, raised before
    anything runs): it is recorded and not chosen; the first candidate (every layer's fallback)
    failing is a failed build."""
    from triton.runtime.errors import OutOfResources

    layers, arrays = fe.pack(_spec())
    net = fe.FusedNet(layers, arrays, fe.default_configs(layers), "cpu")
    real_candidates, real_run = fe.candidate_configs, net.run_layer

    def launch(index, layer, cfg, x, n):
        if cfg.get("too_big"):
            raise OutOfResources(262144, 232448, "shared memory")
        return real_run(index, layer, cfg, x, n)

    def candidates(layer, small, first_fails=False):
        good = real_candidates(layer, small)[0]
        return [dict(good, too_big=True), good] if first_fails else [good, dict(good, too_big=True)]

    monkeypatch.setattr(net, "run_layer", launch)
    monkeypatch.setattr(fe, "candidate_configs", candidates)
    tuning = gpu_engine.tune(net, {"small": 1}, deadline=float("inf"), device="cpu")
    for row in tuning["small"][:-1]:  # the head has no candidates
        assert row["ms"][0] > 0 and row["ms"][1] is None and "too_big" not in row["chosen"], row
        assert list(row["errors"]) == [1] and "shared memory" in row["errors"][1], row
    monkeypatch.setattr(fe, "candidate_configs", lambda layer, small: candidates(layer, small, first_fails=True))
    with pytest.raises(OutOfResources):
        gpu_engine.tune(net, {"small": 1}, deadline=float("inf"), device="cpu")


def test_the_packer_refuses_what_it_cannot_fuse():
    spec = _spec()
    pooled_last = dict(spec, layers=[*spec["layers"], {"op": "maxpool", "kernel": 2}])
    with pytest.raises(BuildError, match="last separable block, unpooled"):
        fe.pack(pooled_last)
    odd = dict(spec, layers=[dict(spec["layers"][0], kernel=5), *spec["layers"][1:]])
    with pytest.raises(BuildError, match="cannot run layer 0"):
        fe.pack(odd)
    res = folded_spec(fold(_trained_looking(TINY_RES)))
    first = res["layers"][2]
    assert first["op"] == "residual"
    pooled_inside = dict(first, layers=[*first["layers"], {"op": "maxpool", "kernel": 2}])
    with pytest.raises(BuildError, match="shortcuts around one separable block, not layer 2"):
        fe.pack(dict(res, layers=[*res["layers"][:2], pooled_inside, *res["layers"][3:]]))
    widening = dict(first, layers=[first["layers"][0], dict(first["layers"][1], out=32), first["layers"][2]])
    with pytest.raises(BuildError, match=r"cannot run layer 2\.body\.1"):
        fe.pack(dict(res, layers=[*res["layers"][:2], widening, *res["layers"][3:]]))


def test_the_kernels_compile_for_hopper_without_a_gpu():
    """Triton's own ptxas builds the kernels for sm_90 here: the largest tiles use wgmma (Hopper's
    tensor-core instruction), and a pooled and a mean block compile (the reshapes in the epilogue), with
    quicknet-res's shortcut too."""
    script = """
import json
from benchmarks.fused_size import compile_layer
tiles = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
def block(cin, side, pool, mean, residual=False):
    layer = {"kind": "separable", "cin": cin, "cout": cin, "h": side, "w": side, "pool": pool, "mean": mean}
    return compile_layer(layer | {"residual": residual}, tiles)
stem = {"kind": "stem", "cout": 256, "h": 32, "w": 32}
built = {
    "plain": block(256, 32, False, False),
    "pool": block(512, 16, True, False),
    "mean": block(1024, 8, False, True),
    "residual pool": block(512, 16, True, False, residual=True),
    "residual mean": block(1024, 8, False, True, residual=True),
    "stem": compile_layer(stem, dict(tiles, BLOCK_N=128, num_stages=2)),
}
# what the engine file keeps of each: the cache folder its cubin sits in (named in base32, not by c.hash)
import tempfile, zipfile
from pathlib import Path
from quicknet.fused import engine as fe
keys = {k: fe.cache_key(c) for k, c in built.items()}
packed = fe.write_artifact(Path(tempfile.mkdtemp()) / "e.zip", {}, fe.triton_cache_dir(), set(keys.values()))
cubins = {n.split("/")[1] for n in zipfile.ZipFile(packed).namelist() if n.endswith(".cubin")}
print(json.dumps({k: {"wgmma": "wgmma" in c.asm["ptx"], "cubin": len(c.asm["cubin"]), "packed": keys[k] in cubins}
                  for k, c in built.items()}))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    built = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(b["wgmma"] and b["cubin"] > 0 for b in built.values()), built
    assert all(b["packed"] for b in built.values()), "the engine file carries each compiled kernel"


def _store_with_engine(tmp_path, identity: dict | None = None, checkpoint_sha256: str | None = None):
    """A version holding the folded weights and an engine built here (interpreter), optionally
    recorded as built for another machine, or from a checkpoint (as the serve run's `--from-train`)."""
    from quicknet.build.export import export_folded_weights

    model = _trained_looking()
    folded = fold(model)
    spec = folded_spec(folded)
    work = tmp_path / "work"
    work.mkdir()
    weights = export_folded_weights(folded, work / "model.folded.pt")
    path, doc = gpu_engine.build(
        spec,
        work,
        source={"file": weights.name, "sha256": store.sha256_file(weights)}
        | ({"checkpoint_sha256": checkpoint_sha256} if checkpoint_sha256 else {}),
        reference=build_folded(spec),
        tune_batches={"small": 1},
        check_images=2,
    )
    if identity is not None:
        fe.write_artifact(path, {k: v for k, v in doc.items() if k != "format"} | {"built_for": identity}, None, set())
    meta = {"labels": [str(i) for i in range(10)], "artifacts": {"torch": weights.name, "fused-gpu": path.name}}
    root = tmp_path / "store"
    mv = store.publish(root, "tiny", [weights, path], meta)
    return mv, spec, doc


def test_the_engine_file_records_its_machine_and_the_service_serves_it_there(tmp_path, monkeypatch, caplog):
    from quicknet.serve import gpu
    from quicknet.serve.backends import BackendError, choose
    from quicknet.serve.backends.fused import FusedBackend
    from quicknet.serve.config import Settings

    mv, spec, doc = _store_with_engine(tmp_path)
    store.verify_files(mv)  # the engine is a hashed file of the version like every artifact
    with zipfile.ZipFile(mv.file(mv.metadata["artifacts"]["fused-gpu"])) as zf:  # its weights are the version's
        assert zf.namelist() == ["engine.json"]  # (the interpreter compiles no kernels)
    assert set(fe.IDENTITY_KEYS) <= set(doc["built_for"]) and doc["built_for"]["kernels_sha256"] == fe.kernels_digest()
    assert doc["check"]["top1_agreement"] == 1.0 and doc["configs"]["small"][0]["BLOCK_M"] == 1024
    assert fe.mismatch(doc["built_for"], fe.current_identity()) == []
    monkeypatch.setattr(gpu, "gpu_present", lambda: True)  # choose() asks NVML first
    settings = Settings(backend="auto", max_batch_size=4, threads=1)
    assert choose(mv, settings) == "fused"
    backend = FusedBackend.load(mv, settings)
    assert backend.describe()["backend"] == "fused" and backend.describe()["built_for"] == doc["built_for"]
    x = _images(2, seed=3)
    with torch.inference_mode():
        want = build_folded(spec)(x)
    _close(torch.from_numpy(backend.infer(x.numpy())), want)
    # past the batch its kernels' grids and int32 offsets allow: the eager engine, said in one line
    largest = settings.model_copy(update={"max_batch_size": fe.MAX_BATCH})
    huge = settings.model_copy(update={"max_batch_size": fe.MAX_BATCH + 1})
    with caplog.at_level(logging.WARNING, logger="quicknet.backends"):
        assert choose(mv, largest) == "fused" and not caplog.records
        assert choose(mv, huge) != "fused"  # the eager engine's branch decides (no CUDA here)
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"batches of up to {fe.MAX_BATCH} images, and --max-batch-size is {fe.MAX_BATCH + 1}" in line
    assert line.endswith("serving the eager torch engine")
    with pytest.raises(BackendError, match=f"batches of up to {fe.MAX_BATCH} images.*serve with --backend torch"):
        FusedBackend.load(mv, huge)


def test_an_engine_built_for_another_machine_is_refused_in_one_line(tmp_path, monkeypatch, caplog):
    from quicknet.serve import gpu
    from quicknet.serve.backends import BackendError, choose
    from quicknet.serve.backends.fused import FusedBackend
    from quicknet.serve.config import Settings

    other = fe.current_identity() | {"gpu": "NVIDIA H200", "compute_capability": "9.0", "driver": "580.159.04"}
    mv, _, _ = _store_with_engine(tmp_path, identity=other)
    monkeypatch.setattr(gpu, "gpu_present", lambda: True)
    settings = Settings(backend="auto", max_batch_size=4, threads=1)
    with caplog.at_level(logging.WARNING, logger="quicknet.backends"):
        assert choose(mv, settings) != "fused"  # the eager engine's branch decides (no CUDA here)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "quicknet.backends"]
    assert "built for another machine" in line and "gpu 'NVIDIA H200'" in line and "driver '580.159.04'" in line
    assert "serving the eager torch engine" in line and "\n" not in line
    with pytest.raises(BackendError, match="built for another machine.*serve with --backend torch"):
        FusedBackend.load(mv, settings)


def test_an_engine_beside_other_weights_is_refused_in_one_line(tmp_path, monkeypatch, caplog):
    """The engine carries no weights: beside another model file (other bytes under the name it was
    built from) it is refused, and packing weights of another layer plan into it refuses too."""
    from quicknet.build.export import export_folded_weights
    from quicknet.serve import gpu
    from quicknet.serve.backends import BackendError, choose
    from quicknet.serve.backends.fused import FusedBackend
    from quicknet.serve.config import Settings

    mv, _, doc = _store_with_engine(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    weights = export_folded_weights(fold(_trained_looking(seed=1)), other / "model.folded.pt")
    engine = mv.file(mv.metadata["artifacts"]["fused-gpu"])
    meta = {k: v for k, v in mv.metadata.items() if k not in ("name", "version", "files")}
    beside_other = store.publish(tmp_path / "store", "tiny", [weights, engine], meta)
    monkeypatch.setattr(gpu, "gpu_present", lambda: True)
    settings = Settings(backend="auto", max_batch_size=4, threads=1)
    with caplog.at_level(logging.WARNING, logger="quicknet.backends"):
        assert choose(beside_other, settings) != "fused"
    (line,) = [r.getMessage() for r in caplog.records if r.name == "quicknet.backends"]
    assert "was built from another model file than this version's 'model.folded.pt'" in line and "\n" not in line
    with pytest.raises(BackendError, match="built from another model file"):
        FusedBackend.load(beside_other, settings)
    no_source = {k: v for k, v in doc.items() if k not in ("format", "source")}  # a hand-made file
    unnamed = fe.write_artifact(other / "model.fused.x.smcpu.zip", no_source, None, set())
    meta["artifacts"] = {**meta["artifacts"], "fused-gpu": unnamed.name}
    nameless = store.publish(tmp_path / "store", "tiny", [mv.file("model.folded.pt"), unnamed], meta)
    with pytest.raises(BackendError, match="does not name the model file it was built from"):
        FusedBackend.load(nameless, settings)
    wider = ArchConfig(name="quicknet-tiny2", stem=16, stages=((16, 16), (32, 32), (32, 128)))
    with pytest.raises(BuildError, match="not the ones the fused engine was built for"):
        fe.weights_for(doc, folded_spec(fold(_trained_looking(wider))))
    assert fe.weights_for(doc, folded_spec(fold(_trained_looking(seed=1))))  # same plan, other values: packs


def test_attach_publishes_a_gated_engine_built_from_the_versions_onnx(tmp_path, capsys):
    root = tmp_path / "store"
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"stands in for the version's model.onnx")
    meta = {"labels": ["a"], "artifacts": {"onnx": "model.onnx"}, "accuracy": {"checkpoint": {"top1": 0.9400}}}
    source = store.publish(root, "quicknet", [onnx], meta)
    digest = source.metadata["files"]["model.onnx"]["sha256"]

    def engine(name: str, sha256: str, top1: float, images: int = 10000, file: str = "model.onnx"):
        gate = {"images": images, "top1": top1, "checkpoint_top1": 0.94, "max_loss": 0.001}
        gate["passed"] = images >= 10000 and top1 >= 0.939
        doc = {"built_for": {"gpu": "NVIDIA H200"}, "source": {"file": file, "sha256": sha256}, "gate": gate}
        return fe.write_artifact(tmp_path / name, doc, None, set())

    published = gpu_engine.attach(root, "quicknet", None, engine("model.fused.a.sm90.zip", digest, 0.9395))
    assert published.version == 2 and published.metadata["artifacts"]["fused-gpu"] == "model.fused.a.sm90.zip"
    assert published.metadata["artifacts"]["onnx"] == "model.onnx"
    assert published.metadata["accuracy_gates"]["fused-gpu"] == {
        "max_loss": 0.001,
        "top1": 0.9395,
        "checkpoint_top1": 0.94,
    }
    store.verify_files(store.get_version(root, "quicknet", 2))
    with pytest.raises(BuildError, match="not built from quicknet v1 \\(it names 'model.onnx'\\)"):
        gpu_engine.attach(root, "quicknet", 1, engine("b.zip", "0" * 64, 0.9395))
    with pytest.raises(BuildError, match="not built from quicknet v1 \\(it names 'model.folded.pt'\\)"):
        gpu_engine.attach(root, "quicknet", 1, engine("b2.zip", digest, 0.9395, file="model.folded.pt"))
    with pytest.raises(BuildError, match="gate on the 10k test split did not pass"):
        gpu_engine.attach(root, "quicknet", 1, engine("c.zip", digest, 0.9380))
    with pytest.raises(BuildError, match="gate on the 10k test split did not pass"):
        gpu_engine.attach(root, "quicknet", 1, engine("d.zip", digest, 0.95, images=2000))
    # the command a user runs after the GPU run: the same, refusals in one line and exit 2
    from quicknet.cli import main

    flags = ["--store", str(root), "--store-model", "quicknet", "--version", "1"]
    assert main(["attach-engine", str(engine("e.zip", digest, 0.9380)), *flags]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["attach-engine", str(engine("model.fused.f.sm90.zip", digest, 0.9401)), *flags]) == 0
    assert "published quicknet version 3" in capsys.readouterr().out
    assert store.get_version(root, "quicknet").metadata["artifacts"]["fused-gpu"] == "model.fused.f.sm90.zip"


def test_an_engine_built_from_a_checkpoint_serves_the_version_exported_from_it(tmp_path, monkeypatch, capsys):
    """The same draw's serve run builds the engine from the train run's best checkpoint (folded
    there); back here that checkpoint is exported and published. The engine attaches to that version
    by the checkpoint's SHA-256 (`exported_from`), names the version's model.onnx (what a server packs
    its weights from) and keeps what it was gated with; a server then serves it with those weights."""
    from quicknet.build.export import export_onnx
    from quicknet.cli import main
    from quicknet.serve import gpu
    from quicknet.serve.backends import choose
    from quicknet.serve.backends.fused import FusedBackend
    from quicknet.serve.config import Settings

    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"stands in for the arm's EMA weights")
    trained = store.sha256_file(checkpoint)
    (tmp_path / "gpu").mkdir()
    built, spec, doc = _store_with_engine(tmp_path / "gpu", checkpoint_sha256=trained)
    gate = {"images": 10000, "top1": 0.9402, "checkpoint_top1": 0.9401, "max_loss": 0.001, "passed": True}
    name = built.metadata["artifacts"]["fused-gpu"]
    engine = fe.write_artifact(tmp_path / name, {**doc, "gate": gate}, None, set())  # as a 10k gate records it
    assert doc["source"]["file"] == "model.folded.pt" and doc["source"]["checkpoint_sha256"] == trained

    root = tmp_path / "store"
    onnx = export_onnx(fold(_trained_looking()), tmp_path / "model.onnx")  # the same weights, exported here

    def publish(exported_from: str | None) -> int:
        meta = {"labels": [str(i) for i in range(10)], "artifacts": {"onnx": "model.onnx"}}
        meta["accuracy"] = {"checkpoint": {"top1": 0.9400, "images": 10000}}
        meta |= {"exported_from": {"file": "checkpoint.pt", "sha256": exported_from}} if exported_from else {}
        return store.publish(root, "tiny", [onnx], meta).version

    flags = ["--store", str(root), "--store-model", "tiny", "--version"]
    for other in (None, "0" * 64):  # published before versions named their checkpoint; another checkpoint
        version = publish(other)
        assert main(["attach-engine", str(engine), *flags, str(version)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"not built from tiny v{version} (it names 'model.folded.pt')" in err
    version = publish(trained)
    assert main(["attach-engine", str(engine), *flags, str(version)]) == 0
    published = store.get_version(root, "tiny")
    assert published.version == version + 1
    attached = fe.read_doc(published.file(published.metadata["artifacts"]["fused-gpu"]))
    onnx_sha = published.metadata["files"]["model.onnx"]["sha256"]
    assert attached["source"] == {"model": "tiny", "version": version, "file": "model.onnx", "sha256": onnx_sha} | {
        "checkpoint_sha256": trained
    }
    assert attached["gated_with"] == doc["source"] and attached["layers"] == doc["layers"]
    assert published.metadata["gpu_engine"]["built_from"] == doc["source"]
    assert published.metadata["accuracy_gates"]["fused-gpu"]["top1"] == 0.9402
    store.verify_files(published)

    monkeypatch.setattr(gpu, "gpu_present", lambda: True)
    settings = Settings(backend="auto", max_batch_size=4, threads=1)
    assert choose(published, settings) == "fused"
    x = _images(2, seed=4)
    with torch.inference_mode():
        want = build_folded(spec)(x)
    _close(torch.from_numpy(FusedBackend.load(published, settings).infer(x.numpy())), want)


def test_rebinding_an_engine_keeps_its_compiled_kernels(tmp_path):
    cache = tmp_path / "cache"
    (cache / "k1").mkdir(parents=True)
    (cache / "k1" / "separable.json").write_text("{}")
    (cache / "k1" / "separable.cubin").write_bytes(bytes(range(256)))
    doc = {"built_for": {"gpu": "NVIDIA H200"}, "source": {"file": "model.folded.pt", "sha256": "a" * 64}}
    path = fe.write_artifact(tmp_path / "model.fused.h200.sm90.zip", doc, cache, {"k1"})
    source = {"file": "model.onnx", "sha256": "b" * 64}
    again = fe.rebound(path, tmp_path / "rebound.zip", source)
    with zipfile.ZipFile(path) as a, zipfile.ZipFile(again) as b:
        assert a.namelist() == b.namelist()
        assert all(a.read(n) == b.read(n) for n in a.namelist() if n != "engine.json")
    assert fe.read_doc(again) == {**fe.read_doc(path), "source": source, "gated_with": doc["source"]}


def test_the_roofline_estimates_for_the_full_quicknet():
    """The issue's estimate for the eager engine (~15.5 MB of activations per image) and what fusing
    leaves (each kernel reads its input and writes its pooled output once); FLOPs as the model's MACs."""
    from benchmarks.gpu_engine import estimate_bytes, estimate_flops
    from quicknet.build.model import build_model, count_macs, get_config

    layers, _ = fe.pack(folded_spec(fold(build_model("quicknet").eval())))
    eager, fused = estimate_bytes(layers, fused=False), estimate_bytes(layers, fused=True)
    assert 15.0e6 < eager < 16.5e6 and 3.5e6 < fused < 4.5e6
    assert estimate_flops(layers) == pytest.approx(2 * count_macs(get_config("quicknet")), rel=0.01)


def test_the_compiled_kernels_travel_in_the_file_and_hit_tritons_cache(tmp_path, monkeypatch):
    """The build keeps each kernel's metadata and machine code (not its IRs); loading puts them into
    Triton's cache with the group file Triton's own cache manager looks up, for that cache's path."""
    from triton import knobs
    from triton.runtime.cache import FileCacheManager

    built = tmp_path / "built-cache" / "KEY1"
    built.mkdir(parents=True)
    (built / "separable_kernel.json").write_text('{"name": "separable_kernel"}')
    (built / "separable_kernel.cubin").write_bytes(b"\x7fELF machine code")
    (built / "separable_kernel.llir").write_text("; LLVM IR, large, not kept")
    (built / "__grp__separable_kernel.json").write_text('{"child_paths": {}}')
    path = fe.write_artifact(tmp_path / "e.zip", {"built_for": {}}, built.parent, {"KEY1"})
    serving = tmp_path / "serving-cache"
    monkeypatch.setattr(knobs.cache, "dir", str(serving))
    doc = fe.read_artifact(path, fe.triton_cache_dir())
    assert doc["format"] == fe.FORMAT
    group = FileCacheManager("KEY1").get_group("separable_kernel.json")
    assert set(group) == {"separable_kernel.json", "separable_kernel.cubin"}
    assert (serving / "KEY1" / "separable_kernel.cubin").read_bytes() == b"\x7fELF machine code"
