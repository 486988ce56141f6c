"""Training settings, importable without torch (the CLI builds its flags and help from these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _opt(default, help: str, valid: str | None = None, choices: tuple[str, ...] | None = None):
    """A field with its flag's help and what a value must be: for numbers a rule of VALID, for
    words its `choices`, which the CLI checks before anything runs (`--batch-size 0` is one line,
    not a ZeroDivisionError)."""
    return field(default=default, metadata={"help": help, "valid": valid, "choices": choices})


# what a number must be: (test, the words a refusal uses)
VALID = {
    "positive": (lambda v: v > 0, "greater than 0"),
    "non-negative": (lambda v: v >= 0, "0 or more"),
    "fraction": (lambda v: 0 <= v < 1, "from 0 up to (not including) 1"),
}


@dataclass
class TrainConfig:
    model: str = _opt("quicknet", "variant: quicknet, quicknet-res, quicknet-s or quicknet-xs")
    epochs: int = _opt(10, "epochs (with --time-budget-s: the most it may plan)", valid="positive")
    batch_size: int = _opt(256, "images per step", valid="positive")
    lr: float = _opt(0.2, "peak learning rate for batch 256; scaled linearly with the batch size", valid="positive")
    momentum: float = _opt(0.9, "SGD (Nesterov) momentum", valid="fraction")
    weight_decay: float = _opt(
        5e-4, "L2 on convolution and classifier weights (not BN, PReLU or depthwise)", valid="non-negative"
    )
    warmup_epochs: float = _opt(
        1.0, "linear warmup from 10%% of the peak LR; BN nets at high LR diverge without it", valid="non-negative"
    )
    label_smoothing: float = _opt(0.1, "cross-entropy label smoothing", valid="fraction")
    ema_decay: float = _opt(
        0.999, "EMA of the weights, exported instead of the raw ones (0 disables)", valid="fraction"
    )
    translate: int = _opt(4, "random translation in pixels, reflect padding (0 disables)", valid="non-negative")
    cutout: int = _opt(8, "side of the random square zeroed per image (0 disables)", valid="non-negative")
    seed: int = _opt(0, "seed for init, shuffling and augmentation; a CPU run reproduces bit for bit")
    device: str = _opt("auto", "auto (CUDA if available), cuda or cpu", choices=("auto", "cuda", "cpu"))
    compile: bool = _opt(False, "torch.compile the training step (1.5x on this CPU; minutes of compile on a GPU)")
    compile_backend: str = _opt(
        "inductor",
        "torch.compile backend: inductor (generates kernels), aot_eager (traces only; dry runs)",
        choices=("inductor", "aot_eager"),
    )
    threads: int = _opt(2, "CPU intra-op threads; oversubscription collapses throughput", valid="positive")
    time_limit_s: float | None = _opt(
        None, "hard stop after this many seconds, checkpointed at the exact step", valid="positive"
    )
    time_budget_s: float | None = _opt(
        None,
        "plan the number of epochs after the first one so the whole schedule fits this many seconds",
        valid="positive",
    )
    save_every_s: float = _opt(
        0.0, "checkpoint at an epoch's end only if this long since the last (0: every epoch)", valid="non-negative"
    )
    train_subset: int | None = _opt(None, "train on a fixed random subset of N images (smoke runs)", valid="positive")
    eval_subset: int | None = _opt(None, "evaluate on a fixed random subset of N test images", valid="positive")
    eval_every: int = _opt(1, "evaluate every N epochs (and after the last)", valid="positive")
    plan_after_epochs: int = _opt(
        1,
        "with --time-budget-s: plan after this many epochs (2 when other jobs share the GPU and may "
        "still be compiling during the first; the warmup should cover them)",
        valid="positive",
    )
