"""`quicknet gpu-train`: train the full QuickNet on one GPU in one prepared, time-boxed run.

Written for a GPU machine lent for minutes, with no network and its own Python (torch, numpy,
pillow, tqdm; no matplotlib, no project extras): everything it needs is the repo and the data
file inside it. One command, saving as it goes, into a results folder of at most 8 files of at
most 16 MiB, no more than two folders deep:

    <out>/results.json   environment, probes, recipe, every epoch, time-to-accuracy, final numbers
    <out>/results.md     the same as tables
    <out>/run/           a run folder the build continues from on the CPU (`quicknet export
                         --run-dir <out>/run`, then compile, eval, publish): checkpoint.pt (EMA
                         weights), model-*.pt and optimizer-*.pt (to --resume), epochs.jsonl,
                         build.json

The recipe (GPU_RECIPE) and why:
- batch 512, Nesterov SGD, peak LR 0.4 (0.2 per 256), 2 warmup epochs then linear decay to zero:
  large enough to keep an H200 busy on 32x32 images, small enough for ~100 steps an epoch;
- label smoothing 0.1, EMA 0.999 of weights and BN statistics (the EMA is what is exported);
- translate ±4 (reflect), flip, cutout 12: cutout 16 is the standard for 200-epoch runs, 8 for a
  handful of epochs; a budget of minutes buys roughly 50-150 epochs, so between the two;
- bf16 autocast, channels_last, torch.compile: the step is memory-bound (depthwise convolutions,
  BN, PReLU), and compile fuses the elementwise work;
- the epoch count is planned from the measured epoch time so the LR schedule ends inside the
  budget (`time_budget_s`), with a hard stop (`time_limit_s`) behind it that checkpoints the exact step.
Everything is a flag (`quicknet gpu-train --help`), so the next run can change one thing.

`--dry-run` runs the same code on the CPU in well under two minutes (a tiny subset, two epochs of
a few steps, torch.compile included) and is part of the tests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from quicknet.config import TrainConfig

log = logging.getLogger("quicknet.gpu_train")

GPU_RECIPE = TrainConfig(
    model="quicknet",
    epochs=200,
    batch_size=512,
    lr=0.2,
    warmup_epochs=2.0,
    label_smoothing=0.1,
    ema_decay=0.999,
    translate=4,
    cutout=12,
    device="cuda",
    compile=True,
    save_every_s=30.0,
)
DRY_RUN = dict(epochs=2, batch_size=16, train_subset=64, eval_subset=64, device="cpu", compile=True, warmup_epochs=1.0)
THRESHOLDS = (0.94, 0.95, 0.957, 0.965)
FINISH_RESERVE_S = 25.0  # after training: flip-TTA eval, results files
HARD_STOP_MARGIN_S = 15.0  # the time limit sits this far past the planned end


def train_flops_per_image(model: str) -> float:
    """Forward + backward ≈ 3x the forward multiply-adds, 2 FLOPs each."""
    from quicknet.model import count_macs, get_config

    return 6.0 * count_macs(get_config(model))


def time_to(history: list[dict], threshold: float, key: str = "test_acc_ema") -> float | None:
    """Seconds from the start of training (compile included) to the first epoch at `threshold`."""
    for h in history:
        if h.get(key) is not None and h[key] >= threshold:
            return h["elapsed_s"]
    return None


def flip_tta_accuracy(checkpoint: Path, data, device: str) -> float:
    import torch

    from quicknet.data import TensorLoader
    from quicknet.train import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    model = model.to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    correct = total = 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        for x, y in TensorLoader(data, 1000, train=False, device=device):
            logits = model(x).float() + model(x.flip(3)).float()
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1)


def render_markdown(doc: dict) -> str:
    env = doc.get("environment", {})
    lines = [f"# gpu-train results ({doc.get('started', '')})", ""]
    lines.append(f"- machine: {env.get('gpu') or env.get('cpu')}, driver {env.get('driver')}, {env.get('cpus')} CPUs")
    lines.append(f"- torch {env.get('torch')}, CUDA {env.get('cuda_runtime')}, Python {env.get('python')}")
    if "matmul" in doc:
        m = doc["matmul"]
        lines.append(f"- dense {m['dtype']} matmul ceiling: {m['tflops']} TFLOP/s (n={m['n']})")
    if "data" in doc:
        lines.append(f"- data: {doc['data']['source']}, loaded in {doc['data']['seconds']} s")
    lines.append(f"- command: `{doc.get('command', '')}`")
    if "recipe" in doc:
        r = doc["recipe"]
        keys = ("model", "batch_size", "lr", "warmup_epochs", "label_smoothing", "ema_decay", "translate", "cutout")
        lines.append("- recipe: " + ", ".join(f"{k}={r[k]}" for k in keys))
    history = doc.get("epochs", [])
    if history:
        lines += [
            "",
            "| epoch | elapsed s | img/s | train loss | test top-1 | EMA top-1 | LR |",
            "|---|---|---|---|---|---|---|",
        ]
        for h in history:
            lines.append(
                f"| {h['epoch']} | {h['elapsed_s']} | {h['images_per_s']:,.0f} | {h['train_loss']} "
                f"| {h.get('test_acc', '')} | {h.get('test_acc_ema', '')} | {h['lr']} |"
            )
    if "final" in doc:
        f = doc["final"]
        lines += ["", "## Result", ""]
        lines.append(f"- top-1 (EMA, no TTA) on {f['dataset']}: **{f['top1']:.4f}**; with flip TTA: {f['top1_tta']}")
        lines.append(f"- epochs {f['epochs']} (planned {f['planned_epochs']}), training {f['train_seconds']} s")
        lines.append(
            f"- steady training throughput {f['images_per_s']:,.0f} img/s = {f['tflops']} TFLOP/s, "
            f"{f['fraction_of_matmul_ceiling']:.1%} of the matmul ceiling"
        )
        for t, s in f["time_to"].items():
            lines.append(
                f"- time to {t}: {'not reached' if s is None else f'{s} s'} (from training start, compile included)"
            )
    if "error" in doc:
        lines += ["", f"**error:** {doc['error']}"]
    return "\n".join(lines) + "\n"


def run(out: Path, data_path: Path | None, cfg: TrainConfig, budget_s: float, *, dry_run: bool = False) -> dict:
    """The whole job. Writes results as it goes; returns the final results document."""
    from quicknet import data as data_mod
    from quicknet import gpu_probe
    from quicknet.build import stage_train

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    results = gpu_probe.ResultsFile(out, "gpu-train", render_markdown)
    results.update(command=gpu_probe.command_line(), budget_s=budget_s, dry_run=dry_run)

    # Data first: decoding forks worker processes, which must happen before CUDA is initialised.
    dataset = data_mod.load(data_path)
    results.update(
        data={"source": dataset.source, "sha256": dataset.checksum, "seconds": round(time.perf_counter() - t0, 1)}
    )
    results.update(environment=gpu_probe.environment(), matmul=gpu_probe.matmul_tflops(0.2 if dry_run else 2.0))

    left = budget_s - (time.perf_counter() - t0) - FINISH_RESERVE_S
    cfg = dataclasses.replace(cfg, time_budget_s=left, time_limit_s=left + HARD_STOP_MARGIN_S)
    results.update(recipe=asdict(cfg))
    epochs: list[dict] = []

    def on_epoch(record: dict) -> None:
        epochs.append(record)
        results.update(epochs=epochs)
        print(json.dumps(record), flush=True)

    run_dir = out / "run"
    try:
        summary = stage_train(cfg, dataset, run_dir, progress=False, on_epoch=on_epoch)
    except Exception as e:
        if not cfg.compile:
            raise
        # A compiler failure must not cost the whole lease: train eagerly on what is left.
        log.error("training with torch.compile failed (%s); retrying without it", e)
        results.update(compile_error="".join(traceback.format_exception_only(e)).strip())
        for leftover in run_dir.glob("*"):
            leftover.unlink()
        epochs.clear()
        left = budget_s - (time.perf_counter() - t0) - FINISH_RESERVE_S
        cfg = dataclasses.replace(cfg, compile=False, time_budget_s=left, time_limit_s=left + HARD_STOP_MARGIN_S)
        results.update(recipe=asdict(cfg))
        summary = stage_train(cfg, dataset, run_dir, progress=False, on_epoch=on_epoch)

    history = epochs
    test_split = dataset.test.sample(cfg.eval_subset) if cfg.eval_subset else dataset.test  # as training scored
    steady = [h["images_per_s"] for h in history[1:]] or [h["images_per_s"] for h in history]
    img_s = sorted(steady)[len(steady) // 2] if steady else 0.0
    tflops = img_s * train_flops_per_image(cfg.model) / 1e12
    last = history[-1] if history else {}
    final = {
        "dataset": dataset.source,
        "top1": last.get("test_acc_ema", last.get("test_acc", 0.0)),
        "top1_raw_weights": last.get("test_acc"),
        "top1_tta": round(flip_tta_accuracy(run_dir / "checkpoint.pt", test_split, cfg.device), 5) if history else None,
        "epochs": summary["epochs_run"],
        "planned_epochs": summary["planned_epochs"],
        "stopped_early": summary["stopped_early"],
        "train_seconds": summary["train_seconds"],
        "images_per_s": img_s,
        "tflops": round(tflops, 2),
        "fraction_of_matmul_ceiling": tflops / max(results.doc["matmul"]["tflops"], 1e-9),
        "time_to": {f"{t:.1%}": time_to(history, t) for t in THRESHOLDS},
        "job_seconds": round(time.perf_counter() - t0, 1),
    }
    results.update(final=final)
    return results.doc


def main(args) -> None:
    """Entry point for `quicknet gpu-train` (flags from TrainConfig, defaults from GPU_RECIPE)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if args.dry_run:
        cfg = dataclasses.replace(cfg, **DRY_RUN)
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    from quicknet.gpu_probe import ResultsFile

    out = Path(args.out)
    try:
        doc = run(out, Path(args.data) if args.data else None, cfg, args.budget_s, dry_run=args.dry_run)
    except Exception as e:
        results = ResultsFile(out, "gpu-train", render_markdown)
        results.doc = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
        results.update(error="".join(traceback.format_exception_only(e)).strip())
        raise
    f = doc["final"]
    print(
        f"top-1 {f['top1']:.4f} (flip TTA {f['top1_tta']}) after {f['epochs']} epochs, "
        f"{f['train_seconds']} s of training; results in {out}"
    )
