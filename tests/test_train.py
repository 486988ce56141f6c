from __future__ import annotations

import json

import pytest
import torch

from quicknet.config import TrainConfig
from quicknet.data import Dataset, TensorLoader
from quicknet.train import accuracy, load_checkpoint, train

TINY = dict(model="quicknet-xs", batch_size=64, eval_subset=256, ema_decay=0.0)
RESUME = dict(TINY, epochs=2, train_subset=256, ema_decay=0.9)  # 4 steps an epoch, EMA on
COMPARED = ("epoch", "train_loss", "train_acc", "lr", "test_acc", "test_loss", "test_acc_ema", "test_loss_ema")


def _every_tensor(run_dir) -> dict[str, torch.Tensor]:
    """Weights, EMA weights and BN statistics, and optimizer momentum of a run's checkpoint."""
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    out = {f"model.{k}": v for k, v in torch.load(run_dir / ckpt["files"]["model"])["model"].items()}
    out |= {f"ema.{k}": v for k, v in (ckpt["ema"] or {}).items()}
    optimizer = torch.load(run_dir / ckpt["files"]["optimizer"])["optimizer"]
    out |= {f"momentum.{i}": s["momentum_buffer"] for i, s in optimizer["state"].items()}
    return out


def _curve(history: list[dict]) -> list[dict]:
    return [{k: h.get(k) for k in COMPARED} for h in history]


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
    assert {"test_loss", "lr", "images_per_s", "elapsed_s"} <= set(lines[-1])
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_fixed_seed_reproduces(cifar: Dataset, tmp_path):
    cfg = TrainConfig(**RESUME)
    a = train(cfg, cifar, tmp_path / "a", progress=False)
    b = train(cfg, cifar, tmp_path / "b", progress=False)
    ta, tb = _every_tensor(tmp_path / "a"), _every_tensor(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), "same seed, different weights"
    assert _curve(a.history) == _curve(b.history)


@pytest.mark.parametrize(
    "stop",
    [
        {"stop_at_step": 4},  # the epoch boundary
        {"stop_at_step": 6},  # mid-epoch: 2 of the second epoch's 4 steps
        {"time_limit_s": 1e-9},  # the time limit, hit after the very first step
    ],
    ids=["epoch-boundary", "mid-epoch", "time-limit"],
)
def test_stop_and_resume_equals_the_straight_run(cifar: Dataset, tmp_path, stop):
    cfg = TrainConfig(**RESUME)
    straight = train(cfg, cifar, tmp_path / "straight", progress=False)
    run = tmp_path / "stopped"
    first_cfg = TrainConfig(**RESUME, time_limit_s=stop.get("time_limit_s"))
    first = train(first_cfg, cifar, run, progress=False, stop_at_step=stop.get("stop_at_step"))
    assert first.stopped_early
    assert len(first.history) == (1 if stop.get("stop_at_step") in (4, 6) else 0)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == stop.get("stop_at_step", 1)
    resumed = train(cfg, cifar, run, resume=True, progress=False)
    assert not resumed.stopped_early
    a, b = _every_tensor(tmp_path / "straight"), _every_tensor(run)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs in {len(different)} tensors, e.g. {different[:3]}"
    assert _curve(resumed.history) == _curve(straight.history)
    assert len(list(run.glob("model-*.pt"))) == 1, "superseded step files are removed"


def test_time_budget_plans_the_epochs(cifar: Dataset, tmp_path):
    generous = train(
        TrainConfig(**TINY, epochs=3, train_subset=128, time_budget_s=1e6), cifar, tmp_path / "a", progress=False
    )
    assert [h["epoch"] for h in generous.history] == [1, 2, 3] and generous.planned_epochs == 3
    assert generous.history[0]["planned_epochs"] == 3
    spent = train(TrainConfig(**TINY, epochs=3, train_subset=128, time_budget_s=1e-6), cifar, tmp_path / "b")
    assert [h["epoch"] for h in spent.history] == [1] and spent.planned_epochs == 1
    assert not spent.stopped_early
    budget = 4.0  # a few epochs of this tiny run: the plan must end the schedule inside it
    fitted = train(TrainConfig(**TINY, epochs=200, train_subset=128, time_budget_s=budget), cifar, tmp_path / "c")
    assert 1 <= fitted.planned_epochs < 200 and not fitted.stopped_early
    assert [h["epoch"] for h in fitted.history] == list(range(1, fitted.planned_epochs + 1))
    assert fitted.history[-1]["lr"] == 0.0, "the LR schedule decays to zero at the planned end"
    assert fitted.seconds <= budget * 1.5, f"{fitted.seconds:.1f}s for a {budget}s budget"
