from __future__ import annotations

import json

import torch

from quicknet.config import TrainConfig
from quicknet.data import Dataset, TensorLoader
from quicknet.train import accuracy, load_checkpoint, train

TINY = dict(model="quicknet-xs", batch_size=64, eval_subset=256, ema_decay=0.0)


def _weights(path) -> dict:
    return torch.load(path, weights_only=False)["model"]


def test_tiny_run_overfits_512_images(cifar: Dataset, tmp_path):
    # lr is scaled by batch/256, so 0.2 at batch 32 is 0.025; 25 epochs = 400 steps (93.6% here, seeded)
    cfg = TrainConfig(
        **{**TINY, "batch_size": 32}, epochs=25, lr=0.2, train_subset=512, translate=0, cutout=0, label_smoothing=0.0
    )
    result = train(cfg, cifar, tmp_path, progress=False)
    model, _ = load_checkpoint(result.checkpoint)
    subset = cifar.train.sample(512, seed=cfg.seed)
    acc = accuracy(model, TensorLoader(subset, 256, train=False), "cpu")
    assert acc >= 0.9, f"memorised only {acc:.2%} of 512 training images"
    lines = [json.loads(x) for x in (tmp_path / "epochs.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, 26))
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_fixed_seed_reproduces_and_resume_continues_exactly(cifar: Dataset, tmp_path):
    cfg = TrainConfig(**TINY, epochs=2, train_subset=128)
    straight = train(cfg, cifar, tmp_path / "a", progress=False)
    again = train(cfg, cifar, tmp_path / "b", progress=False)
    first_half = train(
        TrainConfig(**TINY, epochs=2, train_subset=128, time_limit_s=1e-9), cifar, tmp_path / "c", progress=False
    )
    assert first_half.stopped_early and len(first_half.history) == 1
    resumed = train(cfg, cifar, tmp_path / "c", resume=True, progress=False)
    a, b, c = (_weights(r.checkpoint) for r in (straight, again, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed, different weights"
    assert resumed.history[-1]["epoch"] == 2
    assert straight.history[0]["train_loss"] == again.history[0]["train_loss"]
    assert set(a) == set(c)
