"""Training settings, importable without torch (the CLI builds its flags from these fields)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    model: str = "quicknet"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.2  # peak LR for batch 256; scaled linearly with batch size
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0  # BN nets at high LR diverge without a short ramp
    label_smoothing: float = 0.1
    ema_decay: float = 0.999  # 0 disables; warmed up as min(decay, (1+n)/(10+n))
    translate: int = 4
    cutout: int = 8
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    threads: int = 2  # CPU intra-op threads; oversubscription collapses throughput
    time_limit_s: float | None = None  # stop early (finishing the epoch's bookkeeping) past this
    train_subset: int | None = None  # first N shuffled training images, for smoke runs
    eval_subset: int | None = None
    eval_every: int = 1
