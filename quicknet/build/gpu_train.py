"""`quicknet gpu-train`: train several QuickNet recipes ("arms") at once on one GPU, time-boxed.

Written for a GPU machine lent for minutes, with no network and its own Python (torch, numpy,
pillow, tqdm; matplotlib too, which the arms leave alone; no project extras): everything it
needs is the repo and the data file inside it. One command; each arm is its own process (its
own CUDA context: one arm's crash or compiler failure costs only that arm) and saves as it goes.
What comes back fits the device tool's limit of 8 files of at most 16 MiB, two folders deep:

    <out>/results.json            environment, probes, every arm's recipe, epochs, final numbers,
                                  and what sharing the GPU cost each arm
    <out>/results.md              the same as tables
    <out>/<arm>/checkpoint.pt     the arm's EMA weights (what `quicknet export --run-dir <out>/<arm>`
                                  reads), mirrored after every save; no optimizer state: nothing
                                  resumes on a machine that is given back
    <out>/<arm>/build.json        its train stage record, which `quicknet publish` needs

At most 3 arms (2 + 2 x 3 = 8 files). Each arm trains in a scratch folder under /tmp; only the
two files above are copied out.

`--handoff DIR` leaves the best arm (EMA top-1 without TTA) for the serve run of the same draw,
outside what comes back: `DIR/checkpoint.pt` (a copy of that arm's) and, written last,
`DIR/handoff.json` (the arm, its model, its top-1, the checkpoint's SHA-256); and beside them
`DIR/compile-cache/<arm>.bin`, what torch.compile built in each arm (`compile_cache.save`), which
the serve run brings back (the 8 files here are taken). The device machine
keeps git-ignored folders between calls while it is warm, so `benchmarks.gpu_serve --from-train
DIR` finds them there and builds the fused engine from the weights that will be published; on a
fresh machine the folder is simply not there.

`--compile-cache gpu-cache` starts the arms warm from an earlier draw's compile cache, the zip built
for this GPU, torch and Triton (`quicknet/build/compile_cache.py` says what it saves and how).

The recipe and why (evidence: the first run, ../shared/gpu-runs/2026-12-04/train/, 91.14% EMA top-1
after 58 epochs on CIFAR-10 (JPEG-q75 copy), standard 10k test split; airbench's
legacy/airbench94.py and airbench96.py, KellerJordan/cifar10-airbench; tysam-code/hlb-CIFAR10):
- batch 512, Nesterov SGD, peak LR 0.4 (0.2 per 256), 2 warmup epochs then linear decay to zero:
  unchanged from the first run, which trained stably at 38k img/s;
- cutout 16 (was 12, which the one-pixel bug made 11x11): the first run overfitted (train top-1
  99.0%, EMA test loss lowest at epoch 48 and rising), and 16 is DeVries & Taylor's size for
  CIFAR-10; airbench96 uses 12 for a 10-layer net trained 37 epochs;
- label smoothing 0.1, EMA 0.999 of weights and BN statistics (the EMA is what is exported);
- evaluation every 2 epochs: 0.2 s warm against 1.3 s an epoch of training alone, 15% if every
  epoch; time to 93% is then known to within 2 epochs;
- planned after epoch 2 (`plan_after_epochs=2`), not 1: the arms compile at the same time, and an
  arm that finishes compiling first would otherwise measure its steady epoch on a GPU the others
  do not use yet, plan too many epochs and be cut off by the hard stop before the LR reaches zero.
  After epoch 1 each arm waits (at most BARRIER_S) until every arm has finished its own, so epoch 2
  is measured with all of them training. The 2 warmup epochs do not depend on the plan. Should an
  arm's epochs still grow slower than planned (the barrier timed out, an arm joined late), its next
  evaluation shortens the plan to what fits (`quicknet/build/train.py`), rather than the hard stop
  cutting the schedule before the LR reaches zero; results.md then says "shortened from".
- TTA reported separately from the plain EMA top-1: flip (2 views), and flip + one-pixel translate
  (6 views, weighted as airbench's tta_level 2).

The arms (ARMS), one change each against the first, so each result names its cause:
1. `quicknet`: the reconstruction as published, planner and cutout fixed, cutout 16, full schedule;
2. `quicknet-res`: identity shortcuts around the 6 separable blocks that keep their width
   (Xception's modules; airbench96 added residual connections to reach 96% and hlb-CIFAR10's
   SpeedyResNet has them): same parameters and MACs, gradients reach the stem through 6 fewer
   nonlinear blocks;
3. `quicknet-ls02`: label smoothing 0.2 (airbench94/95/96 and hlb-CIFAR10 all use 0.2): the
   cheapest regularizer against the overfitting seen (mixup/cutmix need longer schedules than the
   ~100 epochs an arm gets here to pay off).

The budget (`--budget-s 420` inside the device call's `timeout_s=500`; the 80 s between them are
Python start-up and the tool's own margin). Measured 2026-12-04 (one arm): data 2.7 s, probes 2 s,
epoch 1 with torch.compile 46 s, a warm epoch 1.32 s of training + 0.2 s of evaluation. Here:
  ~10 s  the parent: imports, data decoded once (the arms read the decoded cache), probes;
  ~8 s   each arm starts (torch import, data to the GPU), the arms in parallel;
  ~60 s  epoch 1 with three compiles at once (16 cores; inductor workers split between the arms);
  <=BARRIER_S the wait for the slowest arm's first epoch;
  ~300 s the planned epochs: with three arms time-sliced on one GPU an arm gets a third of it or
         somewhat more (one process leaves gaps between kernels that another fills), ~3-4 s an
         epoch for quicknet, so ~80-100 epochs each; results.json says what it was;
  ARM_FINISH_S  each arm's last save, three TTA passes over 10k images, copying out;
  PARENT_FINISH_S  the parent's last results.
Each arm plans against the same deadline and has a hard stop HARD_STOP_MARGIN_S past its plan; the
parent ends an arm still running ARM_FINISH_S after that hard stop's finish should have ended, so
the job ends at most MAX_OVERRUN_S (25 s) past its budget, and only when an arm overran its plan.

What sharing cost: each epoch record carries its wall-clock end, so the parent counts how many arms
were training during it; results give each arm's median img/s by that count against a solo
estimate (gpu_report.SOLO_IMG_S: the first run's 37,981 img/s for quicknet alone, batch 512, compiled).

`--dry-run` runs every arm on the CPU at once (16 images, three epochs of two steps, planned after
the second, the first arm compiled with inductor and the others traced, DRY_RUN_OTHER_ARMS) in about
a minute on 2 busy cores; it is part of the tests. `--arms` picks a subset (one arm alone
measures the solo rate).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from quicknet.build import compile_cache
from quicknet.build.config import TrainConfig
from quicknet.build.gpu_report import DATASET, render_markdown, sharing
from quicknet.errors import BuildError

log = logging.getLogger("quicknet.build.gpu_train")

GPU_RECIPE = TrainConfig(
    model="quicknet",
    epochs=200,
    batch_size=512,
    lr=0.2,
    warmup_epochs=2.0,
    label_smoothing=0.1,
    ema_decay=0.999,
    translate=4,
    cutout=16,
    device="cuda",
    compile=True,
    save_every_s=30.0,
    eval_every=2,
    plan_after_epochs=2,
)
# name: (what it changes against the first arm, the TrainConfig fields it sets)
ARMS: dict[str, tuple[str, dict]] = {
    "quicknet": ("the reconstruction (planner and cutout fixed, cutout 16)", {"model": "quicknet"}),
    "quicknet-res": ("identity shortcuts around same-width separable blocks", {"model": "quicknet-res"}),
    "quicknet-ls02": ("label smoothing 0.2", {"model": "quicknet", "label_smoothing": 0.2}),
}
MAX_ARMS = 3  # results.json + results.md + 2 files an arm <= the device tool's 8
DRY_RUN = dict(
    epochs=3, batch_size=8, train_subset=16, eval_subset=16, device="cpu", compile=True, warmup_epochs=1.0, threads=1
)
# In a dry run the first arm compiles with inductor as on the GPU (kernels for the CPU, though: C++,
# not Triton), the others are only traced (dynamo + AOTAutograd: graph breaks, shapes, the backward):
# three inductor compiles on 2 cores take 3 minutes, and the GPU codegen runs first on the lease anyway.
DRY_RUN_OTHER_ARMS = dict(compile_backend="aot_eager")
THRESHOLDS = (0.93, 0.935, 0.94, 0.945, 0.95)
PARENT_FINISH_S = 10.0  # after the arms: the last results files
ARM_FINISH_S = 20.0  # after an arm's training: last save, three TTA passes, copies
HARD_STOP_MARGIN_S = 15.0  # an arm's time limit sits this far past its planned end
BARRIER_S = 90.0  # the longest an arm waits after epoch 1 for the others to finish compiling
# How far past --budget-s the parent may end an overrunning arm: the deadline every arm plans against
# is PARENT_FINISH_S before the budget's end, and an arm still running HARD_STOP_MARGIN_S + ARM_FINISH_S
# after it is ended (then the parent writes its last results).
MAX_OVERRUN_S = HARD_STOP_MARGIN_S + ARM_FINISH_S - PARENT_FINISH_S
HANDOFF_JSON = "handoff.json"  # written after the checkpoint beside it: its presence says the copy is whole


def train_flops_per_image(model: str) -> float:
    """Forward + backward ≈ 3x the forward multiply-adds, 2 FLOPs each."""
    from quicknet.build.model import count_macs, get_config

    return 6.0 * count_macs(get_config(model))


def time_to(history: list[dict], threshold: float, key: str = "test_acc_ema") -> float | None:
    """Seconds from the start of training (compile included) to the first epoch at `threshold`."""
    for h in history:
        if h.get(key) is not None and h[key] >= threshold:
            return h["elapsed_s"]
    return None


def tta_accuracies(checkpoint: Path, data, device: str, batch: int = 1000) -> dict:
    """EMA top-1 without TTA, with flip (2 views) and with flip + one-pixel translate (6 views:
    half the weight on the flipped pair, a quarter each on the pairs shifted up-left and
    down-right, reflect-padded; airbench's tta_level 2), in one pass over the split."""
    import torch
    import torch.nn.functional as F

    from quicknet.build.data import TensorLoader
    from quicknet.build.train import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    model = model.to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    correct = {"none": 0, "flip": 0, "flip_translate": 0}
    total = 0

    def pair(x):
        return model(x).float(), model(x.flip(3)).float()

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        for x, y in TensorLoader(data, batch, train=False, device=device):
            if device == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            plain, flipped = pair(x)
            padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
            shifted = [sum(pair(padded[:, :, d : d + 32, d : d + 32])) / 2 for d in (0, 2)]
            mirror = (plain + flipped) / 2
            views = {"none": plain, "flip": mirror, "flip_translate": mirror / 2 + (shifted[0] + shifted[1]) / 4}
            for k, logits in views.items():
                correct[k] += int((logits.argmax(1) == y).sum())
            total += len(y)
    return {k: round(v / max(total, 1), 5) for k, v in correct.items()}


# --- the arms' processes -------------------------------------------------------------------------


def _write_json(path: Path, doc: dict) -> None:
    from quicknet.fsutil import write_text_atomic

    write_text_atomic(path, json.dumps(doc, indent=2, default=str) + "\n")


def _copy_out(src: Path, dest: Path) -> None:
    from quicknet.fsutil import atomic_write

    with src.open("rb") as f, atomic_write(dest) as g:
        shutil.copyfileobj(f, g, 1 << 20)


def _wait_for_arms(barrier: Path, names: list[str], timeout_s: float) -> float:
    """Mark this arm's first epoch done; wait until every arm's is (or has ended). Seconds waited."""
    t = time.perf_counter()
    while time.perf_counter() - t < timeout_s and not all((barrier / f"{n}.ready").exists() for n in names):
        time.sleep(0.2)
    return round(time.perf_counter() - t, 2)


def arm_main(spec_path: str) -> None:
    """One arm, in its own process: train into a scratch folder, mirror the EMA checkpoint out,
    write progress to `status.json` (the parent merges it into the results)."""
    from quicknet.build import data as data_mod
    from quicknet.build.pipeline import stage_train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    name, work, out, barrier = spec["name"], Path(spec["work"]), Path(spec["out"]), Path(spec["barrier"])
    status_path = work / "status.json"
    status: dict = {"name": name, "state": "starting", "pid": os.getpid(), "started": time.time(), "epochs": []}
    _write_json(status_path, status)
    cfg = TrainConfig(**spec["cfg"])
    dataset = data_mod.load(Path(spec["data"]) if spec["data"] else None)
    run_dir = work / "run"
    mirrored = {"mtime": None}

    def mirror() -> None:
        src = run_dir / "checkpoint.pt"
        if src.is_file() and src.stat().st_mtime_ns != mirrored["mtime"]:
            mirrored["mtime"] = src.stat().st_mtime_ns
            _copy_out(src, out / "checkpoint.pt")

    def on_epoch(record: dict) -> None:
        record = {**record, "wall_end": round(time.time(), 2)}
        status["epochs"].append(record)
        mirror()
        if record["epoch"] == 1:
            (barrier / f"{name}.ready").touch()
            status["barrier_wait_s"] = _wait_for_arms(barrier, spec["arms"], spec["barrier_s"])
        _write_json(status_path, status)

    def plan(cfg: TrainConfig) -> TrainConfig:
        left = spec["deadline"] - time.time() - ARM_FINISH_S
        return dataclasses.replace(cfg, time_budget_s=left, time_limit_s=left + HARD_STOP_MARGIN_S)

    def _train_eagerly(cfg: TrainConfig, why: str) -> dict:
        """A compiler failure in the first epoch must not cost the arm: train eagerly on what is left."""
        log.error("arm %s: training with torch.compile failed (%s); retrying without it", name, why)
        status["compile_error"] = why
        _free_failed_attempt()
        shutil.rmtree(run_dir, ignore_errors=True)
        (barrier / f"{name}.ready").touch()
        status["epochs"].clear()
        eager = plan(dataclasses.replace(cfg, compile=False))
        status.update(recipe=asdict(eager), train_started=time.time())
        _write_json(status_path, status)
        return stage_train(eager, dataset, run_dir, progress=False, on_epoch=on_epoch, plot=False)

    cfg = plan(cfg)
    status.update(state="training", recipe=asdict(cfg), train_started=time.time())
    _write_json(status_path, status)
    summary, compile_failed = None, None
    try:
        summary = stage_train(cfg, dataset, run_dir, progress=False, on_epoch=on_epoch, plot=False)
    except Exception as e:
        if status["epochs"]:
            # Failed after training began (a CUDA error at epoch 80, a full disk): what it saved and
            # mirrored stands; retraining over it with the seconds left would replace trained
            # weights with barely trained ones.
            done = len(status["epochs"])
            log.error("arm %s failed after epoch %d (%s); its last saved checkpoint stands", name, done, e)
            status["error"] = "".join(traceback.format_exception_only(e)).strip()
        elif not cfg.compile:
            raise
        else:  # retried after this block: the exception's traceback holds the failed attempt's frames
            compile_failed = "".join(traceback.format_exception_only(e)).strip()
    if compile_failed:
        summary = _train_eagerly(cfg, compile_failed)
    status.update(state="evaluating", train_ended=time.time())
    if cfg.compile and not compile_failed:
        status["compile_counters"] = compile_cache.counters()
    _write_json(status_path, status)
    mirror()
    if (run_dir / "build.json").is_file():
        _copy_out(run_dir / "build.json", out / "build.json")
    history = status["epochs"]
    test_split = dataset.test.sample(cfg.eval_subset) if cfg.eval_subset else dataset.test  # as training scored
    saved = (out / "checkpoint.pt").is_file()
    tta = tta_accuracies(out / "checkpoint.pt", test_split, cfg.device) if history and saved else {}
    if summary is None:  # failed late: the checkpoint holds the epochs up to its last save
        from quicknet.build.train import load_checkpoint

        epochs = len(load_checkpoint(out / "checkpoint.pt")[1]["history"]) if saved else 0
        summary = {"epochs_run": epochs, "planned_epochs": None, "stopped_early": True, "train_seconds": None}
    steady = [h["images_per_s"] for h in history[1:]] or [h["images_per_s"] for h in history]
    img_s = statistics.median(steady) if steady else 0.0
    status["final"] = {
        "dataset": dataset.source,
        "top1": tta.get("none"),
        "top1_flip_tta": tta.get("flip"),
        "top1_flip_translate_tta": tta.get("flip_translate"),
        "top1_raw_weights": history[-1].get("test_acc") if history else None,
        "epochs": summary["epochs_run"],
        "planned_epochs": summary["planned_epochs"],
        # the plan made after epoch 2, where the pace since then shortened it (quicknet/build/train.py)
        "first_planned_epochs": next((h["planned_epochs"] for h in history if "planned_epochs" in h), None),
        "stopped_early": summary["stopped_early"],
        "train_seconds": summary["train_seconds"],
        "images_per_s": img_s,
        "tflops": round(img_s * train_flops_per_image(cfg.model) / 1e12, 2),
        "time_to": {f"{t:.1%}": time_to(history, t) for t in THRESHOLDS},
    }
    status.update(state="failed" if "error" in status else "done", ended=time.time())
    _write_json(status_path, status)
    # After the results are written (a slow save must not cost them), and only from a compile that
    # trained the arm to its end (not the eager fallback's, nor a failed arm's).
    if spec.get("compile_cache") and cfg.compile and not compile_failed and status["state"] == "done":
        status["compile_cache"] = compile_cache.save(Path(spec["compile_cache"]) / f"{name}.bin")
        _write_json(status_path, status)


# --- the parent ----------------------------------------------------------------------------------


def _arm_configs(base: TrainConfig, names: list[str]) -> dict[str, tuple[str, TrainConfig]]:
    unknown = [n for n in names if n not in ARMS]
    if unknown or not names or len(names) > MAX_ARMS or len(set(names)) != len(names):
        raise BuildError(f"--arms: 1 to {MAX_ARMS} different names of {', '.join(ARMS)} (got {','.join(names)})")
    return {n: (ARMS[n][0], dataclasses.replace(base, **ARMS[n][1])) for n in names}


def run(
    out: Path,
    data_path: Path | None,
    base: TrainConfig,
    budget_s: float,
    arm_names: list[str],
    *,
    dry_run: bool = False,
    handoff: Path | None = None,
    warm_from: Path | None = None,
) -> dict:
    """The whole job. Writes results as it goes; returns the final results document. With
    `handoff`, the best arm is left there for the serve run (`hand_off`), and what the arms compiled
    beside it; with `warm_from`, an earlier draw's is loaded before they start (`compile_cache.load`)."""
    from quicknet.build import data as data_mod
    from quicknet.build import gpu_probe

    t0 = time.perf_counter()
    deadline = time.time() + budget_s - PARENT_FINISH_S
    if handoff is not None:  # first: a run that fails or is killed must not leave an earlier run's best arm
        _withdraw(handoff)
    arms_cfg = _arm_configs(base, arm_names)
    if dry_run:
        arms_cfg = {
            n: (change, cfg if i == 0 else dataclasses.replace(cfg, **DRY_RUN_OTHER_ARMS))
            for i, (n, (change, cfg)) in enumerate(arms_cfg.items())
        }
    out.mkdir(parents=True, exist_ok=True)
    results = gpu_probe.ResultsFile(out, "gpu-train", render_markdown)
    results.update(command=gpu_probe.command_line(), budget_s=budget_s, dry_run=dry_run, recipe=asdict(base))

    # Decoded once here (forked decoders, before CUDA starts); the arms read the decoded cache.
    dataset = data_mod.load(data_path)
    results.update(
        data={"source": dataset.source, "sha256": dataset.checksum, "seconds": round(time.perf_counter() - t0, 1)}
    )
    del dataset
    env_doc = gpu_probe.environment()
    results.update(environment=env_doc, matmul=gpu_probe.matmul_tflops(0.2 if dry_run else 2.0))
    if warm_from is not None:  # before the arms start: they read what it writes into the caches
        results.update(compile_cache_loaded=compile_cache.load(warm_from, env_doc))
    saved_into = handoff / compile_cache.FOLDER if handoff is not None else None
    if saved_into is not None and (why := compile_cache.mark(saved_into, env_doc)):  # nothing saved unmarked
        results.update(compile_cache_saved=why)
        saved_into = None
    _release_gpu()

    work = Path(tempfile.mkdtemp(prefix="quicknet-gpu-train-"))
    barrier = work / "barrier"
    barrier.mkdir()
    env = dict(os.environ)
    cpus = len(os.sched_getaffinity(0))
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, cpus // len(arms_cfg))))  # compiles share the cores
    repo = str(Path(__file__).resolve().parents[2])  # `-m quicknet.build.gpu_train` from any working directory
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    procs: dict[str, subprocess.Popen] = {}
    arms: dict[str, dict] = {}
    for name, (change, cfg) in arms_cfg.items():
        (work / name).mkdir()
        (out / name).mkdir(exist_ok=True)
        spec = {
            "name": name,
            "cfg": asdict(cfg),
            "data": str(data_path) if data_path else None,
            "work": str(work / name),
            "out": str(out / name),
            "barrier": str(barrier),
            "barrier_s": BARRIER_S,
            "arms": list(arms_cfg),
            "deadline": deadline,
            "compile_cache": str(saved_into) if saved_into is not None else None,
        }
        (work / name / "spec.json").write_text(json.dumps(spec))
        logf = (work / name / "arm.log").open("w")
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "quicknet.build.gpu_train", str(work / name / "spec.json")],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
        )
        arms[name] = {"change": change, "state": "starting", "epochs": []}
    results.update(arms=arms)

    printed = dict.fromkeys(arms, 0)
    failed: dict[str, dict] = {}
    while True:
        running = {n for n, p in procs.items() if p.poll() is None}
        for name in arms:
            status = _read_status(work / name / "status.json")
            if status:
                arms[name] = {"change": arms[name]["change"], **status, **failed.get(name, {})}
            for h in arms[name].get("epochs", [])[printed[name] :]:
                if "test_acc_ema" in h or "planned_epochs" in h or h["epoch"] == 1:  # the device returns 12k chars
                    keys = ("epoch", "elapsed_s", "images_per_s", "test_acc_ema", "planned_epochs", "replanned")
                    print(json.dumps({"arm": name} | {k: h[k] for k in keys if k in h}), flush=True)
            printed[name] = len(arms[name].get("epochs", []))
            if name not in running and name not in failed:
                (barrier / f"{name}.ready").touch()  # an ended arm holds nobody up
                code = procs[name].returncode
                if code != 0:
                    tail = (work / name / "arm.log").read_text(errors="replace")[-3000:]
                    last = tail.strip().splitlines()[-1] if tail.strip() else ""
                    failed[name] = {"state": "failed", "error": f"exit code {code}: {last}"}
                    arms[name].update(failed[name])
                    print(f"arm {name} failed (exit code {code}); its log ends:\n{tail}", flush=True)
                else:
                    failed[name] = {}
        results.update(arms=arms, sharing=sharing(arms))
        if not running:
            break
        # An arm's plan ends ARM_FINISH_S before the deadline and its hard stop comes HARD_STOP_MARGIN_S
        # later, a few seconds more since its clock starts after its data reached the GPU; then it
        # finishes (last save, TTA, copies) in ARM_FINISH_S. Past all that, with as much again to spare,
        # it is ended (MAX_OVERRUN_S past the budget at most, inside the call's margin).
        if time.time() > deadline + PARENT_FINISH_S + MAX_OVERRUN_S:  # = deadline + HARD_STOP_MARGIN_S + ARM_FINISH_S
            for name in running:
                procs[name].kill()
        time.sleep(0.5 if dry_run else 2.0)
    shutil.rmtree(work, ignore_errors=True)
    _sweep_temporaries(out, list(arms))
    if saved_into is not None:
        _one_compile_cache_per_model(arms, saved_into)
    if handoff is not None:
        try:
            results.update(handoff=hand_off(out, arms, handoff) or "no arm finished with a checkpoint and a score")
        except OSError as e:  # the arms' results stand; the serve run then serves the published model
            results.update(handoff=f"not left in {handoff}: {type(e).__name__}: {e}")
    results.update(arms=arms, sharing=sharing(arms), job_seconds=round(time.perf_counter() - t0, 1))
    return results.doc


def _one_compile_cache_per_model(arms: dict[str, dict], folder: Path) -> None:
    """Arms that train the same model compile the same graphs (only the model is compiled, not its
    loss: quicknet-ls02's artifacts are quicknet's); the first arm's blob is kept, the others' would
    only double the zip that comes back and is committed."""
    kept: dict[str, str] = {}
    for name, arm in arms.items():
        model, saved = arm.get("recipe", {}).get("model"), arm.get("compile_cache")
        if not isinstance(saved, dict) or "bytes" not in saved:
            continue
        if model in kept:
            (folder / f"{name}.bin").unlink(missing_ok=True)
            saved["dropped"] = f"the same graphs as {kept[model]}'s"
        else:
            kept[model] = name


def _sweep_temporaries(out: Path, names: list[str]) -> None:
    """What a killed arm was still writing (atomic_write's `.<name>.*.tmp`): it must not come back
    as a ninth file, nor hide that the arm's last copy did not finish."""
    for name in names:
        for tmp in (out / name).glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _withdraw(dest: Path) -> None:
    """Remove an earlier hand-off's `handoff.json` (what makes the serve run take the folder) and its
    compile caches."""
    if dest.is_dir():
        (dest / HANDOFF_JSON).unlink(missing_ok=True)
        shutil.rmtree(dest / compile_cache.FOLDER, ignore_errors=True)


def hand_off(out: Path, arms: dict[str, dict], dest: Path) -> dict | None:
    """The best finished arm (EMA top-1 without TTA; the first listed on a tie) into `dest` for the
    serve run of the same draw: its checkpoint, then `handoff.json` naming it. None when no arm
    finished with a score and a checkpoint: nothing is written then, and an older hand-off's
    `handoff.json` is removed first, so the serve run never takes another run's weights for these."""
    from quicknet import store

    (dest / HANDOFF_JSON).unlink(missing_ok=True)
    scored = [
        (arm["final"]["top1"], name)
        for name, arm in arms.items()
        if arm.get("state") == "done"
        and arm.get("final", {}).get("top1") is not None
        and (out / name / "checkpoint.pt").is_file()
    ]
    if not scored:
        return None
    top1, name = max(scored, key=lambda t: t[0])  # max keeps the first of equals
    dest.mkdir(parents=True, exist_ok=True)
    _copy_out(out / name / "checkpoint.pt", dest / "checkpoint.pt")
    doc = {
        "arm": name,
        "model": arms[name].get("recipe", {}).get("model"),
        "top1": top1,
        "checkpoint_sha256": store.sha256_file(dest / "checkpoint.pt"),
        "dataset": DATASET,
    }
    _write_json(dest / HANDOFF_JSON, doc)
    return doc


def _read_status(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _free_failed_attempt() -> None:
    """Before an arm retrains eagerly: the failed compile's model, optimizer and batches are freed,
    their GPU memory handed back to the driver (the other arms share the GPU), dynamo's state reset."""
    import torch

    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _release_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(args) -> None:
    """Entry point for `quicknet gpu-train` (flags from TrainConfig, defaults from GPU_RECIPE)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if args.dry_run:
        cfg = dataclasses.replace(cfg, **DRY_RUN)
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    from quicknet.build.gpu_probe import ResultsFile

    out = Path(args.out)
    names = [n.strip() for n in args.arms.split(",") if n.strip()]
    try:
        data = Path(args.data) if args.data else None
        handoff = Path(args.handoff) if args.handoff else None
        warm = Path(args.compile_cache) if args.compile_cache else None
        doc = run(out, data, cfg, args.budget_s, names, dry_run=args.dry_run, handoff=handoff, warm_from=warm)
    except Exception as e:
        results = ResultsFile(out, "gpu-train", render_markdown)
        results.doc = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
        results.update(error="".join(traceback.format_exception_only(e)).strip())
        raise
    for name, arm in doc["arms"].items():
        f = arm.get("final")
        if f:
            print(
                f"{name}: top-1 {f['top1']} (flip TTA {f['top1_flip_tta']}, flip+translate "
                f"{f['top1_flip_translate_tta']}) after {f['epochs']} epochs, {f['train_seconds']} s of training"
            )
        else:
            print(f"{name}: {arm.get('state')} {arm.get('error', '')}")
        c = arm.get("compile_counters")
        if c and arm.get("epochs"):  # what the warm start saved, in the lines the device tool returns
            print(f"{name}: torch.compile {compile_cache.describe(c)}; epoch 1 {arm['epochs'][0]['epoch_seconds']} s")
    loaded = doc.get("compile_cache_loaded")
    if loaded:
        print(f"warm start: {loaded['file'] if isinstance(loaded, dict) else loaded}")
    if isinstance(doc.get("handoff"), dict):
        h = doc["handoff"]
        print(f"left {h['arm']} (top-1 {h['top1']}) in {args.handoff} for the serve run (--from-train)")
    print(f"results in {out} ({doc['job_seconds']} s)")
    if not all(arm.get("state") == "done" for arm in doc["arms"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    arm_main(sys.argv[1])
