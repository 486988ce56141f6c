"""Training: SGD + Nesterov, warmup then linear decay, label smoothing, EMA of weights.

Weight decay skips BN parameters, PReLU slopes and depthwise filters (all small, per-channel
tensors whose decay only hurts). On CUDA it trains in bf16 autocast with channels_last.
A checkpoint is written atomically after every epoch; `resume=True` continues from it, and a
fixed seed reproduces a CPU run exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from quicknet.config import TrainConfig
from quicknet.data import Dataset, TensorLoader
from quicknet.fsutil import atomic_write
from quicknet.model import ArchConfig, QuickNet, build_model, get_config


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    stopped_early: bool = False


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _param_groups(model: QuickNet, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            is_depthwise = isinstance(module, nn.Conv2d) and module.groups > 1
            small = isinstance(module, (nn.BatchNorm2d, nn.PReLU)) or is_depthwise or name == "bias"
            (no_decay if small else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    def avg_fn(avg: torch.Tensor, new: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1 + int(n)) / (10 + int(n)))
        return avg * d + new * (1 - d)

    return torch.optim.swa_utils.AveragedModel(model, avg_fn=avg_fn, use_buffers=True)


@torch.no_grad()
def accuracy(model: nn.Module, loader: TensorLoader, device: str) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        with _autocast(device):
            logits = model(x.to(memory_format=torch.channels_last) if device == "cuda" else x)
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    return correct / max(total, 1)


def _autocast(device: str) -> torch.autocast:
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")


def load_checkpoint(path: Path, *, use_ema: bool = True) -> tuple[QuickNet, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = QuickNet(ArchConfig.from_dict(ckpt["arch"]))
    state = ckpt["ema"] if use_ema and ckpt.get("ema") else ckpt["model"]
    model.load_state_dict(state)
    return model.eval(), ckpt


def train(
    cfg: TrainConfig, data: Dataset, out_dir: Path, *, resume: bool = False, progress: bool = True
) -> TrainResult:
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"
    log_path = out_dir / "epochs.jsonl"
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if device == "cpu":
        torch.set_num_threads(cfg.threads)
    else:
        torch.backends.cudnn.benchmark = True

    train_split = data.train.sample(cfg.train_subset, cfg.seed) if cfg.train_subset else data.train
    test_split = data.test.sample(cfg.eval_subset) if cfg.eval_subset else data.test
    loader = TensorLoader(
        train_split,
        cfg.batch_size,
        train=True,
        device=device,
        seed=cfg.seed,
        translate=cfg.translate,
        cutout=cfg.cutout,
    )
    test_loader = TensorLoader(test_split, 1000, train=False, device=device)

    model = build_model(cfg.model).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    lr = cfg.lr * cfg.batch_size / 256
    opt = torch.optim.SGD(_param_groups(model, cfg.weight_decay), lr=lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ema = _ema(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    step_model = torch.compile(model) if cfg.compile else model

    start_epoch, history, elapsed = 0, [], 0.0
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ema is not None and ckpt.get("ema_full"):
            ema.load_state_dict(ckpt["ema_full"])
        loader.load_state_dict(ckpt["loader"])
        torch.set_rng_state(ckpt["rng"])
        start_epoch, history, elapsed = ckpt["epoch"], ckpt["history"], ckpt["seconds"]

    stopped_early = False
    t_start = time.perf_counter() - elapsed
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t_epoch = time.perf_counter()
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for x, y in bar:
            if device == "cuda":
                x = x.to(memory_format=torch.channels_last)
            with _autocast(device):
                logits = step_model(x)
                loss = criterion(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            seen += len(y)
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * len(y)
            rate = seen / (time.perf_counter() - t_epoch)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}")
            if cfg.time_limit_s and time.perf_counter() - t_start > cfg.time_limit_s:
                stopped_early = True
                break
        train_seconds = time.perf_counter() - t_epoch
        record = {
            "epoch": epoch + 1,
            "train_loss": round(loss_sum / max(seen, 1), 5),
            "train_acc": round(correct / max(seen, 1), 5),
            "lr": round(sched.get_last_lr()[0], 6),
            "images_per_s": round(seen / train_seconds, 1),
            "epoch_seconds": round(train_seconds, 2),
        }
        last = epoch + 1 == cfg.epochs or stopped_early
        if last or (epoch + 1) % cfg.eval_every == 0:
            record["test_acc"] = round(accuracy(model, test_loader, device), 5)
            if ema is not None:
                record["test_acc_ema"] = round(accuracy(ema.module, test_loader, device), 5)
        record["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        history.append(record)
        line = json.dumps(record)
        if progress:
            tqdm.write(line)
        with log_path.open("a") as f:
            f.write(line + "\n")
        _save_checkpoint(ckpt_path, cfg, model, ema, opt, sched, loader, epoch + 1, history, record["elapsed_s"])
        if stopped_early:
            break

    plot_curves(history, out_dir / "training_curves.png", title=f"{cfg.model} on {device}")
    return TrainResult(ckpt_path, history, time.perf_counter() - t_start, device, stopped_early)


def _save_checkpoint(path, cfg, model, ema, opt, sched, loader, epoch, history, seconds) -> None:
    state = {
        "arch": get_config(cfg.model).to_dict(),
        "train_config": asdict(cfg),
        "model": model.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "ema_full": ema.state_dict() if ema is not None else None,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "loader": loader.state_dict(),
        "rng": torch.get_rng_state(),
        "epoch": epoch,
        "history": history,
        "seconds": seconds,
    }
    with atomic_write(path) as f:
        torch.save(state, f)


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (label-smoothed CE)")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], marker="o", label="train (augmented)")
    for key, label in (("test_acc", "test"), ("test_acc_ema", "test, EMA")):
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            ax_acc.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
