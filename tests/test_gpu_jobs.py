"""The GPU jobs' dry runs: the same code paths on the CPU, so a GPU lease never runs a line first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from quicknet import store
from quicknet.build import gpu_engine
from quicknet.build.export import reference_logits
from quicknet.build.fold import fold
from quicknet.build.train import load_checkpoint
from quicknet.errors import BuildError
from quicknet.testing import FAST_MODEL

REPO = Path(__file__).resolve().parents[1]


def _results_folder_fits_the_device_limits(out: Path) -> list[Path]:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, [str(p.relative_to(out)) for p in files]
    assert all(p.stat().st_size <= 16 << 20 for p in files)
    assert all(len(p.relative_to(out).parts) <= 3 for p in files), "no deeper than two folders"
    return files


def test_gpu_train_dry_run_trains_every_arm_at_once_and_returns_what_the_build_continues_from(tmp_path):
    from quicknet.build.gpu_train import ARMS

    out, handoff = tmp_path / "out", tmp_path / "handoff"
    cmd = [sys.executable, "-m", "quicknet", "gpu-train", "--dry-run", "--out", str(out), "--handoff", str(handoff)]
    cmd += ["--compile-cache", str(tmp_path / "no-cache-yet")]  # as on the first draw: compiles cold, says so
    # torch.compile's on-disk caches of a machine that never compiled (a lent GPU machine is fresh)
    cold = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-cold"))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=cold)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    files = _results_folder_fits_the_device_limits(out)  # the hand-off stays on the machine, outside them
    expected = {"results.json", "results.md"} | {f"{arm}/{f}" for arm in ARMS for f in ("checkpoint.pt", "build.json")}
    assert {str(p.relative_to(out)) for p in files} == expected, "EMA checkpoints only: no optimizer, no step files"
    doc = json.loads((out / "results.json").read_text())
    assert {"gpu", "torch", "cuda_runtime", "python", "cpus", "device"} <= set(doc["environment"])
    assert doc["matmul"]["tflops"] >= 0  # a 256^3 fp32 matmul on 2 busy cores can round to 0.0 TFLOP/s
    assert doc["job_seconds"] > 0  # its time is `make gpu-rehearse`'s to print: tests assert no absolute time
    assert list(doc["arms"]) == list(ARMS)
    for name, arm in doc["arms"].items():
        assert arm["state"] == "done", arm
        assert [e["epoch"] for e in arm["epochs"]] == [1, 2, 3]
        assert arm["epochs"][1]["planned_epochs"] == 3, "planned after epoch 2, when every arm has compiled"
        assert arm["barrier_wait_s"] <= 90
        final = arm["final"]
        assert final["dataset"] == "CIFAR-10 (JPEG-q75 copy), standard 10k test split"
        assert set(final["time_to"]) == {"93.0%", "93.5%", "94.0%", "94.5%", "95.0%"}
        for key in ("top1", "top1_flip_tta", "top1_flip_translate_tta"):
            assert 0 <= final[key] <= 1, (name, key)
        assert final["epochs"] == 3 and final["images_per_s"] > 0
        assert set(doc["sharing"][name]["img_s_by_arms_training"]) <= {"1", "2", "3"}
        build = json.loads((out / name / "build.json").read_text())
        assert build["stages"]["train"]["epochs_run"] == 3 and build["stages"]["train"]["torch"]
        model, ckpt = load_checkpoint(out / name / "checkpoint.pt")  # what `quicknet export --run-dir` reads
        assert ckpt["arch"]["name"] == ARMS[name][1]["model"] and ckpt["train_config"]["cutout"] == 16
        images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        with torch.no_grad():  # quicknet-res's shortcuts too (tests/test_residual.py takes it further)
            folded = fold(model)(torch.from_numpy(images)).numpy()
        assert np.abs(folded - reference_logits(model, images)).max() < 1e-3, "the folded EMA is the model"
    assert doc["arms"]["quicknet-ls02"]["recipe"]["label_smoothing"] == 0.2
    markdown = (out / "results.md").read_text()
    assert "| arm |" in markdown and "flip+translate TTA" in markdown and "### quicknet-res" in markdown
    # the best arm (the first of equals) left for the serve run of the same draw, its checkpoint whole
    scores = [(arm["final"]["top1"], -i, name) for i, (name, arm) in enumerate(doc["arms"].items())]
    best = max(scores)[2]
    assert doc["handoff"] == json.loads((handoff / "handoff.json").read_text())
    assert doc["handoff"]["arm"] == best and doc["handoff"]["model"] == ARMS[best][1]["model"]
    assert (handoff / "checkpoint.pt").read_bytes() == (out / best / "checkpoint.pt").read_bytes()
    assert doc["handoff"]["checkpoint_sha256"] == store.sha256_file(handoff / "checkpoint.pt")
    assert f"left {best} (top-1 " in done.stdout and f"- handed to the serve run: {best} (top-1 " in markdown

    # what torch.compile built in the arm compiled with inductor, saved for a later run to load
    assert (
        doc["arms"]["quicknet"]["compile_cache"]["bytes"] == (handoff / "compile-cache" / "quicknet.bin").stat().st_size
    )
    assert doc["arms"]["quicknet"]["compile_cache"]["artifacts"]["inductor"] > 0
    assert all("bytes" in a["compile_cache"] or "error" in a["compile_cache"] for a in doc["arms"].values())
    assert doc["compile_cache_loaded"] == f"none in {tmp_path / 'no-cache-yet'}: compiling cold"
    assert f"warm start: none in {tmp_path / 'no-cache-yet'}: compiling cold\n" in done.stdout
    ls02 = doc["arms"]["quicknet-ls02"]["compile_cache"]  # the same model as quicknet: one blob for both
    assert "error" in ls02 or ls02["dropped"] == "the same graphs as quicknet's", ls02
    assert not (handoff / "compile-cache" / "quicknet-ls02.bin").exists()
    assert doc["arms"]["quicknet"]["compile_counters"]["inductor_misses"] > 0, "compiled cold"

    # the serve run on the same (warm) machine takes it: its store names the checkpoint it was folded from
    from benchmarks.gpu_serve import build_parser, choose_weights
    from quicknet.build import compile_cache

    (tmp_path / "serve").mkdir()
    back = compile_cache.bundle(handoff / "compile-cache", tmp_path / "serve")
    with zipfile.ZipFile(tmp_path / "serve" / back["file"]) as zf:
        assert (
            "quicknet.bin" in zf.namelist()
            and zf.read("quicknet.bin") == (handoff / "compile-cache" / "quicknet.bin").read_bytes()
        )
    assert back["file"] == "torch-compile-cache.cpu.zip"
    assert back["built_for"] == compile_cache.identity(doc["environment"])

    # ... and a later train run, on a machine whose caches are empty, starts warm from that zip: every
    # graph the arm compiled before comes from the cache (a GPU's cubins and autotuning with them)
    warm = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-warm"))
    cmd = [sys.executable, "-m", "quicknet", "gpu-train", "--dry-run", "--arms", "quicknet"]
    cmd += ["--out", str(tmp_path / "again"), "--compile-cache", str(tmp_path / "serve")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=warm)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["compile_cache_loaded"]["file"] == back["file"]
    assert again["compile_cache_loaded"]["arms"]["quicknet"]["inductor"] > 0
    counters = again["arms"]["quicknet"]["compile_counters"]
    assert counters["inductor_hits"] > 0 and counters["inductor_misses"] == 0, counters
    assert counters["aot_autograd_hits"] > 0 and counters["aot_autograd_misses"] == 0, counters
    assert "- warm start: torch-compile-cache.cpu.zip loaded in" in (tmp_path / "again" / "results.md").read_text()
    assert "warm start: torch-compile-cache.cpu.zip\n" in done.stdout
    hits = counters["inductor_hits"]
    assert f"quicknet: torch.compile {hits} graphs from the cache, 0 compiled; epoch 1 " in done.stdout, done.stdout

    too_small = compile_cache.bundle(handoff / "compile-cache", tmp_path / "serve", limit=100)
    assert "over the 100" in too_small and not (tmp_path / "serve" / back["file"]).exists()

    args = build_parser().parse_args(["--from-train", str(handoff)])
    chosen = choose_weights(tmp_path / "served", args)
    assert chosen["weights"] == f"trained: {best} from this draw's train run" and chosen["handoff"] == doc["handoff"]
    served = store.get_version(tmp_path / "served", store.default_model(tmp_path / "served"))
    assert served.name == args.model == ARMS[best][1]["model"]
    assert served.metadata["exported_from"]["sha256"] == doc["handoff"]["checkpoint_sha256"]
    from quicknet.build.gpu_engine import engine_source  # what the engine built from it will name

    assert engine_source(served)["checkpoint_sha256"] == doc["handoff"]["checkpoint_sha256"]
    # a copy that is not whole is not taken: the published model is served, and the results say why
    (handoff / "checkpoint.pt").write_bytes(b"cut short")
    args = build_parser().parse_args(["--from-train", str(handoff), "--model", FAST_MODEL])
    chosen = choose_weights(tmp_path / "fallback", args)
    assert chosen["handoff"].endswith("is not the checkpoint handoff.json names")
    assert chosen["weights"].startswith(f"published: {FAST_MODEL} v") and args.model == FAST_MODEL


def test_results_md_says_when_an_arms_plan_was_shortened():
    """An arm whose pace since its plan shortened it (quicknet/build/train.py, `replan_epochs`) says
    so in results.md beside the epochs it ran; one that kept its plan shows the plan alone."""
    from quicknet.build.gpu_report import render_markdown

    arms = {
        "quicknet": {"state": "done", "final": {"epochs": 22, "planned_epochs": 22, "first_planned_epochs": 56}},
        "quicknet-ls02": {"state": "done", "final": {"epochs": 80, "planned_epochs": 80, "first_planned_epochs": 80}},
    }
    markdown = render_markdown({"arms": arms})
    assert "| quicknet |  | done | 22 (22, shortened from 56) |" in markdown, markdown
    assert "| quicknet-ls02 |  | done | 80 (80) |" in markdown, markdown


def test_a_compile_cache_is_loaded_only_on_the_machine_it_was_built_for(tmp_path):
    """torch.compile's artifacts are keyed by GPU model, torch and Triton: a cache from anywhere else
    would only miss, so it is not loaded, and the run says why in one line; from a folder, the zip
    built for this machine is taken; a blob torch cannot read is that arm's line, not the run's end."""
    from quicknet.build.compile_cache import BUILT_FOR, identity, load, mark

    here = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0", "cuda_runtime": "13.0"}
    here["python"] = "3.12.3"
    h200 = dict(here, gpu="NVIDIA H200")

    def cache(path: Path, env: dict, blobs: dict[str, bytes]) -> Path:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(BUILT_FOR, json.dumps(identity(env)))
            for arm, blob in blobs.items():
                zf.writestr(f"{arm}.bin", blob)
        return path

    assert load(tmp_path / "nothing", here) == f"none in {tmp_path / 'nothing'}: compiling cold"
    unreadable = tmp_path / ("x" * 300)  # a name the file system refuses: OSError, not "no such file"
    assert load(unreadable, here) == f"{unreadable} unreadable (OSError): compiling cold"
    other = cache(tmp_path / "torch-compile-cache.1-nvidia-h200.zip", h200, {"quicknet": b"h200 kernels"})
    said = load(other, here)
    assert said.startswith("none built for this machine (NVIDIA H100 80GB HBM3, torch 2.11.0+cu130) among")
    assert "torch-compile-cache.1-nvidia-h200.zip (NVIDIA H200, torch 2.11.0+cu130)" in said
    assert load(other, dict(h200, torch="2.12.0+cu130")).startswith("none built for this machine")
    (tmp_path / "torch-compile-cache.0-broken.zip").write_bytes(b"not a zip")
    mine = cache(tmp_path / "torch-compile-cache.2-nvidia-h100.zip", dict(here, python="3.12.9"), {})
    with zipfile.ZipFile(mine, "a") as zf:
        zf.writestr("quicknet.bin", b"cut short")
    loaded = load(tmp_path, here)  # the folder, in name order: past the broken one and the H200's, the H100's
    assert loaded["file"] == mine.name and loaded["built_for"] == identity(here)
    assert loaded["arms"] == {"quicknet": "unreadable"}
    alone = load(tmp_path / "torch-compile-cache.0-broken.zip", here)
    assert alone.startswith("none built for this machine") and "broken.zip (unreadable: BadZipFile" in alone
    # damaged inside: its compressed bytes cut into (zlib's error, or zipfile's CRC check)
    damaged = tmp_path / "damaged" / "torch-compile-cache.x.zip"
    damaged.parent.mkdir()
    with zipfile.ZipFile(damaged, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(BUILT_FOR, json.dumps(identity(here)) * 50)
    raw = bytearray(damaged.read_bytes())
    raw[60:90] = bytes(30)
    damaged.write_bytes(bytes(raw))
    assert load(damaged.parent, here).startswith("none built for this machine"), "a line, not the run's end"
    # and the folder the arms save into cannot be marked: a line, and nothing is saved there
    (tmp_path / "a-file").write_text("")
    assert mark(tmp_path / "a-file" / "compile-cache", here).startswith("not saved: ")


def test_the_hand_off_is_the_best_finished_arm_and_never_an_earlier_runs(tmp_path):
    """The best EMA top-1 (not the first arm, nor the best flip-TTA score; the first of equals), among
    arms that finished with a score and a checkpoint; an earlier run's hand-off is withdrawn first,
    also by a run that fails before any arm trained."""
    from benchmarks.gpu_serve import handed_off
    from quicknet.build.gpu_train import hand_off, run

    dest = tmp_path / "handoff"

    def arm(state: str, top1: float | None, flip: float = 0.5) -> dict:
        return {"state": state, "final": {"top1": top1, "top1_flip_tta": flip}, "recipe": {"model": "quicknet"}}

    for name, weights in (("a", b"a"), ("b", b"b"), ("c", b"c"), ("failed", b"f")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.pt").write_bytes(weights)
    arms = {
        "a": arm("done", 0.90, flip=0.99),
        "b": arm("done", 0.93),
        "c": arm("done", 0.93),
        "failed": arm("failed", 0.99),
        "no-checkpoint": arm("done", 0.99),
    }
    left = hand_off(tmp_path, arms, dest)
    assert left["arm"] == "b" and left["top1"] == 0.93 and (dest / "checkpoint.pt").read_bytes() == b"b"
    assert handed_off(dest) == (dest / "checkpoint.pt", left)

    assert hand_off(tmp_path, {"failed": arms["failed"], "no-checkpoint": arms["no-checkpoint"]}, dest) is None
    assert handed_off(dest) == (None, f"no hand-off in {dest} (a fresh machine, or the train run left none)")
    hand_off(tmp_path, arms, dest)
    (dest / "compile-cache").mkdir()
    (dest / "compile-cache" / "quicknet.bin").write_bytes(b"an earlier run's")
    with pytest.raises(
        BuildError, match="--arms"
    ):  # fails before any arm starts (one line: `error: --arms ...`, exit 2)
        run(tmp_path / "out", None, None, 60.0, ["no-such-arm"], handoff=dest)
    assert not (dest / "handoff.json").exists() and not (dest / "compile-cache").exists()
    (dest / "handoff.json").write_text("{cut short")
    assert handed_off(dest) == (None, f"{dest / 'handoff.json'} is unreadable (JSONDecodeError)")


def test_a_killed_arms_half_written_copy_does_not_come_back(tmp_path):
    """atomic_write removes its temporary file on an exception, but not under SIGKILL (the parent
    ending an overrunning arm): the parent sweeps what is left."""
    from quicknet.build.gpu_train import _sweep_temporaries

    (tmp_path / "arm").mkdir()
    (tmp_path / "arm" / ".checkpoint.pt.x1y2z3.tmp").write_bytes(b"half a checkpoint")  # atomic_write's name
    (tmp_path / "arm" / "build.json").write_text("{}")
    _sweep_temporaries(tmp_path, ["arm", "never-started"])
    assert [p.name for p in (tmp_path / "arm").iterdir()] == ["build.json"]


def test_a_hand_off_the_serve_run_cannot_load_leaves_it_the_published_model(tmp_path):
    """A whole file that is no checkpoint: a line in the results, and the run goes on."""
    from benchmarks.gpu_serve import build_parser, choose_weights

    dest = tmp_path / "handoff"
    dest.mkdir()
    (dest / "checkpoint.pt").write_bytes(b"not a checkpoint")
    about = {"arm": "quicknet", "top1": 0.94, "checkpoint_sha256": store.sha256_file(dest / "checkpoint.pt")}
    (dest / "handoff.json").write_text(json.dumps(about))
    args = build_parser().parse_args(["--from-train", str(dest), "--model", FAST_MODEL])
    chosen = choose_weights(tmp_path / "store", args)
    assert chosen["weights"].startswith(f"published: {FAST_MODEL} v") and args.model == FAST_MODEL
    assert chosen["handoff"]["arm"] == "quicknet" and chosen["handoff"]["error"], chosen
    assert store.list_models(tmp_path / "store") == [FAST_MODEL], "nothing of the failed attempt is left"
    with pytest.raises(SystemExit):  # which weights: one or the other
        build_parser().parse_args(["--from-train", str(dest), "--checkpoint", "runs/x/checkpoint.pt"])


def _one_arm(tmp_path: Path) -> tuple[dict, Path]:
    """One gpu-train arm in this process (`arm_main`, as the parent starts it), quicknet-xs, the dry
    run's recipe, saving its compile cache into tmp_path/compile-cache: its last status and its
    results folder."""
    import dataclasses
    import time

    from quicknet.build import gpu_train

    cfg = dataclasses.replace(
        gpu_train.GPU_RECIPE, **gpu_train.DRY_RUN, **gpu_train.DRY_RUN_OTHER_ARMS, model=FAST_MODEL, save_every_s=0.0
    )
    work, out, barrier = tmp_path / "work", tmp_path / "out", tmp_path / "barrier"
    for folder in (work, out, barrier):
        folder.mkdir()
    spec = {"name": "arm", "cfg": dataclasses.asdict(cfg), "data": None, "work": str(work), "out": str(out)}
    spec |= {"barrier": str(barrier), "barrier_s": 5, "arms": ["arm"], "deadline": time.time() + 120}
    spec["compile_cache"] = str(tmp_path / "compile-cache")
    (work / "spec.json").write_text(json.dumps(spec))
    gpu_train.arm_main(str(work / "spec.json"))
    return json.loads((work / "status.json").read_text()), out


def test_an_arm_whose_compile_fails_trains_eagerly_after_freeing_the_attempt(tmp_path, monkeypatch):
    """torch.compile failing in the first epoch costs the arm its compile, not its training: it
    trains eagerly on the time left, says why, saves no compile cache, and the failed attempt (its
    model, optimizer and batches, on a GPU) is gone before the eager one starts, not held by the
    exception's traceback beside it."""
    import weakref

    from quicknet.build import pipeline

    real = pipeline.stage_train
    attempts: list[weakref.ref] = []

    class Weights:  # what the failed attempt had allocated
        pass

    def compile_fails(cfg, dataset, run_dir, **kw):
        if cfg.compile:
            attempt = Weights()
            attempts.append(weakref.ref(attempt))
            raise RuntimeError("BackendCompilerFailed: backend='inductor' raised: CompilationError")
        assert attempts and attempts[0]() is None, "the failed attempt is still held"
        return real(cfg, dataset, run_dir, **kw)

    monkeypatch.setattr(pipeline, "stage_train", compile_fails)
    status, _ = _one_arm(tmp_path)
    assert status["state"] == "done" and "CompilationError" in status["compile_error"], status
    assert status["recipe"]["compile"] is False and [e["epoch"] for e in status["epochs"]] == [1, 2, 3]
    assert (tmp_path / "barrier" / "arm.ready").exists(), "the other arms are not held up"
    assert "compile_cache" not in status and not (tmp_path / "compile-cache").exists(), "nothing compiled to keep"
    assert "compile_counters" not in status, "the eager epochs compiled nothing"
    assert 0 <= status["final"]["top1"] <= 1


def test_an_arm_that_fails_after_training_began_keeps_what_it_saved(tmp_path, monkeypatch):
    """A failure at epoch 2 (a CUDA error, a full disk) must not retrain over the arm's checkpoint
    with the seconds left, as the compiler-failure fallback once did for any failure: the
    mirrored checkpoint stands, is scored, and the arm says why it stopped."""

    from quicknet.build import pipeline

    real = pipeline.stage_train

    def failing_at_epoch_2(cfg, dataset, run_dir, **kw):
        seen = kw.pop("on_epoch")

        def on_epoch(record):
            seen(record)
            if record["epoch"] == 2:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

        return real(cfg, dataset, run_dir, on_epoch=on_epoch, **kw)

    monkeypatch.setattr(pipeline, "stage_train", failing_at_epoch_2)
    status, out = _one_arm(tmp_path)  # a failed arm's compile is not kept
    assert status["state"] == "failed" and "illegal memory access" in status["error"], status
    assert "compile_cache" not in status and not (tmp_path / "compile-cache").exists()
    assert "compile_error" not in status, "retrained over the trained arm"
    _, ckpt = load_checkpoint(out / "checkpoint.pt")
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2]
    assert status["final"]["epochs"] == 2 and 0 <= status["final"]["top1"] <= 1


def test_gpu_serve_dry_run_measures_every_step(tmp_path):
    out = tmp_path / "out"
    # no hand-off from a train run (a fresh machine): the published model, as the README's run finds it
    cmd = [sys.executable, "-m", "benchmarks.gpu_serve", "--dry-run", "--out", str(out), "--from-train", "nowhere"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _results_folder_fits_the_device_limits(out)
    doc = json.loads((out / "results.json").read_text())
    assert doc["matmul"]["tflops"] > 0 and "copy" in doc
    engine = doc["engine"]
    assert {(r["lanes"], r["batch"]) for r in engine} == {(1, 1), (1, 8), (2, 1), (2, 8)}
    assert all(r["img_s"] > 0 for r in engine)
    assert [v["variant"] for v in doc["variants"]] == ["compile", "aoti"]
    for variant in doc["variants"]:  # each compiled, loaded and ran: an error here would be the GPU run's first
        assert "error" not in variant and variant["rows"][0]["img_s"] > 0, variant
    service = doc["service"]
    # in order of what the run is for: the first front count, the peers, the fused engine, then the rest
    assert [s["step"] for s in doc["steps"]] == [
        "engine alone",
        "service, 2 front processes",
        "peers",
        "fused engine",
        "service, the other front counts",
        "service, a steady rate and the other cases",
        "torch compile",
        "torch aoti",
    ]
    assert all(s["seconds"] >= 0 for s in doc["steps"])
    assert "- steps: engine alone at " in (out / "results.md").read_text()
    assert service[0]["workers"] == 2 and {r["workers"] for r in service} == {1, 2}
    assert {
        (r["workers"], r["protocol"], r["images_per_request"]) for r in service if r["workers"] != doc["best_workers"]
    } <= {(w, p, 1) for w in (1, 2) for p in ("rest", "grpc")}
    best = {(r["protocol"], r["images_per_request"]) for r in service if r["workers"] == doc["best_workers"]}
    assert best == {("rest", 1), ("grpc", 1), ("kserve-grpc", 8)}
    # at the best front count, one image a request again at 80% of each protocol's best rate
    at_rate = [r for r in service if r.get("rate_rps")]
    assert {r["protocol"] for r in at_rate} == {"rest", "grpc"} and doc["rate_fraction"] == 0.8
    for r in at_rate:
        closed = [c for c in service if c["workers"] == r["workers"] and c["protocol"] == r["protocol"]]
        assert r["rate_rps"] == round(0.8 * max(c["requests_s"] for c in closed if not c.get("rate_rps")), 1)
        assert r["mode"] in ("rate-limited", "open") and r["ok"] > 0, r
    assert len(service) == 7
    for row in service:
        assert row["ok"] > 0 and row["rejected"] == 0, row
        assert row["mean_batch"] >= 1 and row["efficiency"] > 0
        # where the CPU went: one process, its loop works; with front processes the engine core's
        # runner threads do (its own counter says how much outside the engine call), not its loop
        assert row["engine_threads_cores"] > 0 and (row["fronts_cores"] > 0) == (row["workers"] > 1), row
        if row["workers"] == 1:
            assert row["engine_loop_cores"] > 0 and row["engine_core_us"] is None, row
        else:
            assert row["engine_core_us"] > 0, row
        assert 0 < row["machine_busy"] <= 1, row
        assert row["processes"] == ("server" if row["workers"] == 1 else "engine front front"), row
        assert row["limit"], row
        # the server's own account of the case (its histograms) and Little's law's share
        assert row["server_infer_ms"] > 0 and row["server_request_ms"] > 0, row
        assert (row["in_server_share"] > 0) if not row.get("rate_rps") else row["in_server_share"] is None, row
        if row["protocol"] != "rest":  # each front process reached over 4 connections at least
            assert row["grpc_channels"] >= 4 * row["workers"], row
    markdown = (out / "results.md").read_text()
    assert "The server's own account" in markdown and "| in_server_share |" in markdown
    logs = (out / "server.log").read_text()  # every server's log, not the last one's
    assert "===== quicknet serve --workers 1 " in logs and "===== quicknet serve --workers 2 " in logs
    assert "## The service" in markdown and "| engine_core_us |" in markdown and service[0]["limit"] in markdown
    assert "At 80% of the best closed-loop rate, one image a request: rest" in markdown
    # the fused engine step (issue 27): built (Triton's interpreter here), kept, measured, profiled
    fused = doc["fused"]
    assert "error" not in fused, fused
    # the fused engine timed alone; the eager engine's roofline is the engine-alone step's rows
    assert {(r["engine"], r["batch"]) for r in fused["rows"]} == {("fused", 1), ("fused", 2)}
    assert all(r["img_s"] > 0 and r["gb_s"] >= 0 for r in [*fused["rows"], *engine])
    assert fused["artifact"]["file"].startswith("model.fused.") and (out / fused["artifact"]["file"]).is_file()
    assert fused["build"]["check"]["top1_agreement"] == 1.0 and fused["build"]["gate"]["passed"] is False  # 2 images
    assert fused["build"]["kernels"] == {"compiled": 0, "packed": 0}, "the interpreter compiles nothing"
    assert fused["profile"]["fused"]["kernels_per_call"] > 0 and fused["profile"]["torch"]["top"]
    assert fused["bytes_per_image"]["fused"] < fused["bytes_per_image"]["torch"]
    assert "## The fused engine (issue 27)" in markdown and "Profile, fused" in markdown
    assert doc["fused_service_error"].startswith("not in a dry run")
    # built from the published model's own file, so it attaches to that version (here only the
    # gate refuses: 2 images, not the 10k split), and it carries no second copy of the weights
    published = store.get_version(REPO / "model_store", FAST_MODEL)
    assert doc["weights"] == f"published: {FAST_MODEL} v{published.version}"
    assert doc["handoff"].startswith("no hand-off")
    assert "- the train run's hand-off: none taken (no hand-off in nowhere" in markdown
    assert doc["compile_cache"] == "none in nowhere/compile-cache", "where the train run's arms save theirs"
    assert fused["source"]["sha256"] == published.metadata["files"]["model.onnx"]["sha256"]
    shutil.copytree(published.path, tmp_path / "store" / FAST_MODEL / str(published.version))
    with pytest.raises(BuildError, match="gate on the 10k test split did not pass"):
        gpu_engine.attach(tmp_path / "store", FAST_MODEL, published.version, out / fused["artifact"]["file"])
    with zipfile.ZipFile(out / fused["artifact"]["file"]) as zf:
        assert "weights.npz" not in zf.namelist()
    # the peers on the same machine (issue 24), the same torch engine, one image a request: plain
    # FastAPI; LitServe where it is installed (the GPU machine, from the carried wheels: `make
    # gpu-rehearse` runs it there), else its row says why
    import importlib.util

    fastapi, litserve = doc["peers"]
    assert fastapi["server"] == "fastapi + torch, no batching" and litserve["server"].startswith("litserve")
    assert fastapi["ok"] > 0 and fastapi["requests_s"] > 0 and fastapi["images_per_request"] == 1, fastapi
    if importlib.util.find_spec("litserve") is not None:
        assert litserve["ok"] > 0 and litserve["requests_s"] > 0, litserve
    else:
        assert litserve["error"].endswith("the peer exited") and "litserve" in " ".join(litserve["log"]), litserve
    assert "## Peers on this machine" in markdown and "x the best peer" in markdown


def test_the_cpu_account_names_the_saturated_part():
    from benchmarks.cpu import limit

    idle = {"workers": 2, "engine_loop_cores": 0.3, "front_loop_max_cores": 0.4, "fronts_cores": 0.8}
    idle["machine_busy"] = 0.5
    assert limit(idle).startswith("none at 90%")
    assert limit(idle | {"machine_busy": 0.95}).startswith("all cores")
    assert limit(idle | {"front_loop_max_cores": 0.97, "machine_busy": 0.95}) == "a front's event loop"
    assert limit(idle | {"engine_loop_cores": 0.99, "front_loop_max_cores": 0.97}) == "engine loop"
    assert limit(idle | {"workers": 1, "engine_loop_cores": 0.99}) == "the one process's event loop"
    assert limit(idle | {"engine_loop_cores": 0.99, "gpu_util": 0.93}) == "GPU"
    assert limit(idle | {"gpu_util": 0.89, "machine_busy": 0.9}).startswith("all cores")  # 90% is saturated
    core = idle | {"engine_core_us": 40.0, "requests_s": 25_000, "engine_loop_cores": 0.99}  # one core's worth
    assert limit(core).startswith("the engine core")
    assert limit(core | {"requests_s": 20_000}) == "engine loop"  # 0.8 of a core: not saturated


def test_gpu_wheels_carry_the_projects_pins():
    import re
    import tomllib

    pins = {}
    for extra in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"].values():
        for req in extra:
            match = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;]+)", req)
            if match:
                pins[match[1].lower()] = match[3]
    wheels = [
        line.split("==")
        for line in (REPO / "benchmarks" / "gpu-wheels.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    for name, version in wheels:
        if name in pins:
            assert pins[name] == version, f"{name}: {version} in gpu-wheels.txt, {pins[name]} in pyproject"
    assert {"fastapi", "uvicorn", "pydantic", "grpcio", "protobuf", "grpcio-health-checking"} <= {n for n, _ in wheels}


# What the GPU machine's own Python 3.12 has (the device notes: /work/.library/device/README.md).
GPU_MACHINE_OWN = (
    "torch",
    "triton",
    "numpy",
    "pillow",
    "grpcio",
    "protobuf",
    "prometheus-client",
    "httpx",
    "uvloop",
    "onnx",
    "onnxruntime",
)


def _closure(names) -> set[str]:
    """Distributions `names` need at run time (no extras), as installed here."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def test_gpu_wheels_and_the_machines_own_packages_cover_what_serve_imports():
    """`quicknet serve` on the GPU machine imports only what it has or what `make gpu-wheels` carries
    (fastapi 0.165, for one, imports opentelemetry-api at start)."""
    import json
    import subprocess
    import sys

    from packaging.utils import canonicalize_name

    probe = (  # each loaded module's file, to the distribution that installed it (namespaces resolved)
        "import importlib.metadata as md, json, os, sys\n"
        "import quicknet.serve.main, quicknet.serve.cli, quicknet.serve.backends.pytorch\n"
        "owner = {os.path.realpath(d.locate_file(f)): d.metadata['Name'] for d in md.distributions()\n"
        "         for f in (d.files or ()) if f.suffix in ('.py', '.so')}\n"
        "files = {os.path.realpath(f) for m in list(sys.modules.values()) if (f := getattr(m, '__file__', None))}\n"
        "print(json.dumps(sorted({owner[f] for f in files if f in owner})))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    imported = {canonicalize_name(n) for n in json.loads(out.stdout)} - {"quicknet-serving"}
    wheels = {
        canonicalize_name(line.split("==")[0])
        for line in (REPO / "benchmarks" / "gpu-wheels.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    # imported only when present, each inside a try: grpc (runtime protos), uvicorn (its reloader), anyio
    optional = {"grpcio-tools", "watchfiles", "sniffio"}
    missing = imported - _closure(GPU_MACHINE_OWN) - wheels - optional
    assert not missing, f"add to benchmarks/gpu-wheels.txt (at pyproject's pins): {sorted(missing)}"


def test_the_readme_gpu_runs_are_what_the_rehearsal_runs_and_fit_one_draw():
    """README "GPU runs" is what a session with a GPU runs as written: its two device-tool calls carry
    what `make gpu-rehearse` carries (git-ignored folders, so they travel only when named), pass
    flags the jobs accept (the rehearsal's serve run the same data flag), and their budgets, the
    machine's start and Python's included, fit one 15-minute draw, each inside its call's limit."""
    import re
    import shlex

    from benchmarks.gpu_serve import build_parser as serve_parser
    from quicknet.build.gpu_train import MAX_OVERRUN_S
    from quicknet.cli import build_parser

    readme = (REPO / "README.md").read_text().split("\n## GPU runs\n", 1)[1].split("\n## ", 1)[0]
    runs = re.findall(r"run  carry=(\[[^\]]*\])  timeout_s=(\d+)\n((?:         .*\n)+)", readme)
    assert len(runs) == 2 and "give_back" in readme
    rehearsal = (REPO / "benchmarks" / "gpu_rehearse.sh").read_text()
    budgets, handoff = [], {}
    for (carry, timeout_s, command), repo in zip(runs, ("train-repo", "serve-repo"), strict=True):
        folders = json.loads(carry)
        assert f'copy_repo "$work/{repo}" {" ".join(folders)}\n' in rehearsal, (repo, folders)
        query = ["git", "check-ignore", "--no-index", *(f"{f}/" for f in folders)]  # "/": folders, there or not
        ignored = subprocess.run(query, cwd=REPO, capture_output=True, text=True).stdout.split()
        assert ignored == [f"{f}/" for f in folders], (folders, ignored)
        words = shlex.split(" ".join(command.split()).split("&& ")[-1].replace("PYTHONUNBUFFERED=1 ", ""))
        assert words[:2] == ["python3", "-m"], words
        if words[2] == "quicknet":
            args = build_parser().parse_args(words[3:])
            assert args.command == "gpu-train" and args.data == "data/cifar10_jpeg.npz"
            handoff["left"] = args.handoff
            # an earlier draw's torch.compile artifacts travel in the tracked tree: no carry needed
            cache = args.compile_cache
            assert (REPO / cache).is_dir() and f"--compile-cache {cache}" in rehearsal, cache
            query = ["git", "check-ignore", "--no-index", f"{cache}/", f"{cache}/torch-compile-cache.nvidia-h100.zip"]
            assert not subprocess.run(query, cwd=REPO, capture_output=True, text=True).stdout.strip(), cache
        else:
            assert words[2] == "benchmarks.gpu_serve", words
            args = serve_parser().parse_args(words[3:])
            assert f"--dry-run --data {args.data} " in rehearsal, "the rehearsal gates as the run does"
            handoff["taken"] = args.from_train
        # the best arm waits on the warm machine in a git-ignored folder that neither call carries
        # (a carried path missing here is removed there)
        assert not set(handoff.values()) & set(folders), (handoff, folders)
        assert args.data.split("/")[0] in folders, "its data travels with it"
        # the train job can end MAX_OVERRUN_S past its budget (an arm at its hard stop, then finishing)
        longest = args.budget_s + (MAX_OVERRUN_S if words[2] == "quicknet" else 0)
        budgets.append(longest)
        assert longest + 30 <= int(timeout_s) <= 600, (longest, timeout_s)
    assert handoff["left"] == handoff["taken"], handoff
    assert f"--handoff {handoff['left']}" in rehearsal and f"--from-train {handoff['left']}" in rehearsal
    query = ["git", "check-ignore", "--no-index", f"{handoff['left']}/"]
    assert subprocess.run(query, cwd=REPO, capture_output=True, text=True).stdout.split() == [f"{handoff['left']}/"]
    start_s = 120  # a machine's start, 1-2 minutes of the draw; each call's Python and pip ~20 s more
    assert start_s + sum(b + 20 for b in budgets) <= 900, budgets
