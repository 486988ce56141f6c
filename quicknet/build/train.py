"""Training: SGD + Nesterov, warmup then linear decay, label smoothing, EMA of weights.

Weight decay skips BN parameters, PReLU slopes and depthwise filters (all small, per-channel
tensors whose decay only hurts). It trains channels_last (on 2 CPU cores quicknet-xs steps ~15%
faster than in NCHW); on CUDA in bf16 autocast, keeping loss/accuracy sums on the device so a step
never waits for the host.

Checkpoints are resumable at any step, not only at epoch ends: a stop (time limit, `stop_at_step`,
Ctrl-C between saves) records the epoch's shuffle order, the step reached, the loader's and the
global RNG states and the epoch's running sums, so `resume=True` continues exactly where the
straight run would have been (a fixed seed reproduces a CPU run bit for bit, resumed or not).

A checkpoint is three files so that none of the full model's exceeds 16 MiB (the GPU machine's
result limit): `checkpoint.pt` (architecture, EMA weights, bookkeeping; all that export needs),
and `model-<step>.pt` / `optimizer-<step>.pt`, which it names. The two step-named files are
written first and `checkpoint.pt` last, so an interrupted save never mixes steps.

`time_budget_s` plans the run to fit a wall-clock budget: after the first epoch (which includes
`torch.compile`'s compile time), or after `plan_after_epochs`, the steady epoch time and a *warm*
evaluation time are measured and the number of epochs is set to what fits (`plan_epochs`), so the
LR schedule decays to zero inside the budget instead of being cut off. The first evaluation ever
is cold (cuDNN autotuning a new batch shape, allocator growth: 3.6 s against 0.2 s warm on an
H200, 2026-12-04), so it is never the estimate; evaluation is charged per `eval_every` epochs.
After the plan, every evaluation checks it against the pace since (training, evaluation and saves
as they came): an epoch that has grown slower than planned, on a GPU that another job has started
to share say, would take the schedule past the budget and into the hard stop (`time_limit_s`) before
the LR reached zero, so the plan is shortened to what still fits (`replan_epochs`) and the LR
decays from its value then to zero at the new end (`_Schedule.shorten`). It is never lengthened.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from quicknet.build.config import TrainConfig
from quicknet.build.data import Dataset, TensorLoader
from quicknet.build.model import ArchConfig, QuickNet, build_model, get_config
from quicknet.build.progress import wanted as bar_wanted
from quicknet.errors import BuildError
from quicknet.fsutil import atomic_write

CHECKPOINT = "checkpoint.pt"
# What a run is: a resume with other values would train a different run under its record (the data
# and the steps an epoch, the schedule's shape, the augmentation). Time limits, threads, the device,
# compiling and how often to save or evaluate may change between stops.
SAME_ON_RESUME = (
    *("batch_size", "train_subset", "seed", "lr", "momentum", "weight_decay", "warmup_epochs"),
    *("label_smoothing", "ema_decay", "translate", "cutout"),
)
BUDGET_SAFETY = 0.93  # plan to use 93% of the budget left: epochs vary, and the last eval and save must fit


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    stopped_early: bool = False
    planned_epochs: int = 0


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BuildError(f"--device cuda: torch {torch.__version__} finds no CUDA GPU here; use --device cpu (or auto)")
    return device


def plan_epochs(
    *,
    budget_s: float,
    elapsed_s: float,
    done: int,
    steady_epoch_s: float,
    eval_s: float,
    eval_every: int,
    max_epochs: int,
    safety: float = BUDGET_SAFETY,
) -> int:
    """How many epochs in all (the `done` ones included) fit what is left of `budget_s`.

    Each further epoch costs `steady_epoch_s` of training and `eval_s / eval_every` of evaluation
    (`eval_s`: one warm round of evaluations); the last epoch always evaluates, so one round is
    set aside. Never fewer than `done`, never more than `max_epochs`.
    """
    left = budget_s - elapsed_s - eval_s
    per_epoch = steady_epoch_s + eval_s / max(1, eval_every)
    fit = done + int(safety * max(0.0, left) / max(per_epoch, 1e-9))
    return max(done, min(max_epochs, fit))


def replan_epochs(
    *,
    budget_s: float,
    elapsed_s: float,
    done: int,
    planned: int,
    since_elapsed_s: float,
    since_done: int,
    eval_s: float,
) -> int:
    """`planned`, or fewer where the epochs left no longer fit what is left of `budget_s` at the pace
    of the epochs since the plan (`since_done` epochs done at `since_elapsed_s`): what fits then,
    never fewer than `done`. The plan left a margin (BUDGET_SAFETY), so a pace within it keeps it;
    one round of evaluation is set aside for the last epoch, as when planning."""
    if done <= since_done or done >= planned:
        return planned
    pace = (elapsed_s - since_elapsed_s) / (done - since_done)
    left = budget_s - elapsed_s - eval_s
    if (planned - done) * pace <= left:
        return planned
    return max(done, done + int(max(0.0, left) / max(pace, 1e-9)))


def _param_groups(model: QuickNet, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            is_depthwise = isinstance(module, nn.Conv2d) and module.groups > 1
            small = isinstance(module, (nn.BatchNorm2d, nn.PReLU)) or is_depthwise or name == "bias"
            (no_decay if small else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class EMA:
    """Exponential moving average of weights and BN statistics, warmed up as min(decay, (1+n)/(10+n)).

    One fused `_foreach_lerp_` per step, and the update count lives on the host: averaging
    through a device-side counter would make every step wait for the GPU.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        self.updates = 0
        self._float = [t for t in self._tensors(self.module) if t.is_floating_point()]
        self._other = [t for t in self._tensors(self.module) if not t.is_floating_point()]

    @staticmethod
    def _tensors(module: nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = self._tensors(model)
        torch._foreach_lerp_(self._float, [t for t in live if t.is_floating_point()], 1 - d)
        for mine, theirs in zip(self._other, [t for t in live if not t.is_floating_point()], strict=True):
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict, weights: dict) -> None:
        self.module.load_state_dict(weights)
        self.updates = state["updates"]


@torch.no_grad()
def evaluate(model: nn.Module, loader: TensorLoader, device: str) -> tuple[float, float]:
    """Top-1 and mean cross-entropy (no smoothing) on `loader`; one host sync at the end."""
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    loss = torch.zeros((), device=device)
    total = 0
    for x, y in loader:
        with _autocast(device):
            logits = model(x.to(memory_format=torch.channels_last))
        correct += (logits.argmax(1) == y).sum()
        loss += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        total += len(y)
    return correct.item() / max(total, 1), loss.item() / max(total, 1)


def accuracy(model: nn.Module, loader: TensorLoader, device: str) -> float:
    return evaluate(model, loader, device)[0]


def _autocast(device: str) -> torch.autocast:
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")


def _load(path: Path, device: str = "cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=False)


def load_checkpoint(path: Path, *, use_ema: bool = True) -> tuple[QuickNet, dict]:
    """The trained model (EMA weights when there are some) in eval mode, and the checkpoint record."""
    path = Path(path)
    ckpt = _load(path)
    model = QuickNet(ArchConfig.from_dict(ckpt["arch"]))
    state = ckpt["ema"] if use_ema and ckpt.get("ema") else _load(path.parent / ckpt["files"]["model"])["model"]
    model.load_state_dict(state)
    return model.eval(), ckpt


class _Schedule:
    """Linear warmup (from 10%) then linear decay to zero at `total_steps`, which a time budget
    may set after the first epoch; the warmup never depends on it. `shorten` moves the end earlier
    without a jump. LambdaLR keeps this object's attributes in its state_dict, so a resumed run
    continues on the same line."""

    def __init__(self, warmup: int, total_steps: int):
        self.warmup = warmup
        self.total_steps = total_steps
        self.shortened_at: int | None = None  # from this step, a straight line from its factor
        self.factor_then = 1.0

    def shorten(self, step: int, total_steps: int) -> None:
        """Reach zero at `total_steps` instead, decaying from the factor `step` has now."""
        self.factor_then = self(step)
        self.shortened_at = step
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if self.shortened_at is not None and step >= self.shortened_at:
            left = max(1, self.total_steps - self.shortened_at)
            return max(0.0, self.factor_then * (self.total_steps - step) / left)
        if step < self.warmup:
            return 0.1 + 0.9 * step / self.warmup
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup))


@dataclass
class _Parts:
    """What a run trains with, built from its config: the data, the model and its optimization."""

    loader: TensorLoader
    test_loader: TensorLoader
    steps_per_epoch: int
    model: QuickNet
    step_model: nn.Module  # the model as each step calls it: compiled, or the model itself
    opt: torch.optim.Optimizer
    schedule: _Schedule
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: EMA | None
    criterion: nn.Module


def _build(cfg: TrainConfig, data: Dataset, device: str) -> _Parts:
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
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise BuildError(f"batch size {cfg.batch_size} is larger than the {len(train_split.labels)} training images")

    model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last)
    lr = cfg.lr * cfg.batch_size / 256
    opt = torch.optim.SGD(_param_groups(model, cfg.weight_decay), lr=lr, momentum=cfg.momentum, nesterov=True)
    schedule = _Schedule(max(1, int(cfg.warmup_epochs * steps_per_epoch)), cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    step_model = torch.compile(model, backend=cfg.compile_backend) if cfg.compile else model
    return _Parts(loader, test_loader, steps_per_epoch, model, step_model, opt, schedule, sched, ema, criterion)


def _resumable(ckpt_path: Path, cfg: TrainConfig) -> dict:
    """The checkpoint of a run to resume, loaded once for `_restore`, if it is there and `cfg` is the
    run it started as: one line otherwise, not a fresh start in a mistyped folder nor a state_dict
    size mismatch."""
    if not ckpt_path.is_file():
        raise BuildError(f"nothing to resume: {ckpt_path} not found (leave out --resume to start a new run)")
    # On the host whatever `device` is: its RNG states must stay CPU ByteTensors (torch.set_rng_state,
    # the loader's Generator.set_state refuse a CUDA tensor); load_state_dict copies the EMA weights
    # into the device's own tensors. The model and optimizer files are read onto the device (_restore).
    ckpt = _load(ckpt_path)
    started = ckpt.get("train_config", {})
    theirs = started.get("model")
    if theirs and theirs != cfg.model:
        raise BuildError(
            f"{ckpt_path.parent} holds a {theirs} run, not {cfg.model}: resume it with --model {theirs} "
            "(or train a new run in another --run-dir)"
        )
    now = asdict(cfg)
    changed = [f for f in SAME_ON_RESUME if f in started and started[f] != now[f]]
    if changed:
        was = " ".join(f"--{f.replace('_', '-')} {started[f]}" for f in changed)
        got = ", ".join(str(now[f]) for f in changed)
        raise BuildError(
            f"--resume continues {ckpt_path.parent}'s run as it started, with {was} (got {got}): give the same "
            "values, or train a new run in another --run-dir"
        )
    return ckpt


def _restore(parts: _Parts, out_dir: Path, ckpt: dict, device: str) -> tuple[int, dict, list[dict], float]:
    """A stopped run's state as its last save (`ckpt`, its checkpoint.pt) left it, into `parts`;
    returns its planned epochs, position, history and seconds spent."""
    parts.model.load_state_dict(_load(out_dir / ckpt["files"]["model"], device)["model"])
    parts.opt.load_state_dict(_load(out_dir / ckpt["files"]["optimizer"], device)["optimizer"])
    parts.sched.load_state_dict(ckpt["scheduler"])
    if parts.ema is not None:
        parts.ema.load_state_dict(ckpt["ema_state"], ckpt["ema"])
    parts.loader.load_state_dict(ckpt["loader"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if device == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["planned_epochs"], ckpt["position"], ckpt["history"], ckpt["seconds"]


@dataclass
class _Pass:
    """One epoch's pass over the training set, as far as it got (all of it unless `stopped`)."""

    order: object  # the epoch's shuffle order, kept for a resume mid-epoch
    step: int
    seen: int
    correct: torch.Tensor  # running sums stay on the device: a step never waits for the host
    loss_sum: torch.Tensor
    t_epoch: float  # perf_counter() when the epoch began, less what a resumed epoch had spent
    t_half: float | None  # when the first epoch's second half began (a planned run only)
    stopped: bool


def _train_pass(
    parts: _Parts,
    cfg: TrainConfig,
    epoch: int,
    position: dict,
    planned_epochs: int,
    t_start: float,
    stop_at_step: int | None,
    show_bar: bool,
    device: str,
) -> _Pass:
    """Epoch `epoch` from `position` (its start, or where a stopped run left it) to its end, or to
    the time limit or `stop_at_step`."""
    from tqdm import tqdm

    steps_per_epoch = parts.steps_per_epoch
    parts.model.train()
    start_step = position["step"]
    order = position["order"] if start_step else parts.loader.epoch_order()
    partial = position["partial"] or {"seen": 0, "correct": 0, "loss_sum": 0.0, "seconds": 0.0}
    seen = partial["seen"]
    correct = torch.as_tensor(partial["correct"], device=device)
    loss_sum = torch.as_tensor(partial["loss_sum"], device=device, dtype=torch.float32)
    t_epoch = time.perf_counter() - partial["seconds"]
    half = steps_per_epoch // 2
    t_half = None
    bar = tqdm(
        parts.loader.batches(order, start_step),
        total=steps_per_epoch,
        initial=start_step,
        desc=f"epoch {epoch + 1}/{planned_epochs}",
        disable=not show_bar,
        leave=False,
    )
    step = start_step
    stopped = False
    for x, y in bar:
        x = x.to(memory_format=torch.channels_last)
        with _autocast(device):
            logits = parts.step_model(x)
            loss = parts.criterion(logits, y)
        parts.opt.zero_grad(set_to_none=True)
        loss.backward()
        parts.opt.step()
        parts.sched.step()
        if parts.ema is not None:
            parts.ema.update(parts.model)
        step += 1
        seen += len(y)
        correct += (logits.argmax(1) == y).sum()
        loss_sum += loss.detach().float() * len(y)
        if step == half and epoch == 0 and cfg.time_budget_s:
            _sync(device)
            t_half = time.perf_counter()
        if show_bar and step % 20 == 0:  # the only mid-epoch host sync, and only with a progress bar
            rate = seen / (time.perf_counter() - t_epoch)
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", img_s=f"{rate:.0f}")
        global_step = epoch * steps_per_epoch + step
        out_of_time = cfg.time_limit_s and time.perf_counter() - t_start > cfg.time_limit_s
        if step < steps_per_epoch and (out_of_time or global_step == stop_at_step):
            stopped = True
            break
    bar.close()
    return _Pass(order, step, seen, correct, loss_sum, t_epoch, t_half, stopped)


def _score(record: dict, parts: _Parts, history: list[dict], device: str, plan_now: bool) -> float:
    """Test accuracy and loss, the raw weights' and the EMA's, into `record`; returns what a warm
    evaluation takes (for the planner: the first one of a process is cold, so it is not that)."""
    cold = not any("test_acc" in h for h in history)  # the first evaluation of this process
    t_eval = time.perf_counter()
    record["test_acc"], record["test_loss"] = (round(v, 5) for v in evaluate(parts.model, parts.test_loader, device))
    warm_eval = time.perf_counter() - t_eval  # when cold: replaced below
    if parts.ema is not None:
        t_ema = time.perf_counter()
        acc, loss_value = evaluate(parts.ema.module, parts.test_loader, device)
        record["test_acc_ema"], record["test_loss_ema"] = round(acc, 5), round(loss_value, 5)
        ema_seconds = time.perf_counter() - t_ema  # the same shapes a second time: warm
        warm_eval = 2 * ema_seconds if cold else warm_eval + ema_seconds
    elif cold and plan_now:
        t_again = time.perf_counter()
        evaluate(parts.model, parts.test_loader, device)  # only to time a warm evaluation
        warm_eval = time.perf_counter() - t_again
    return warm_eval


def train(
    cfg: TrainConfig,
    data: Dataset,
    out_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_at_step: int | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    plot: bool = True,
) -> TrainResult:
    """Train (or resume) into `out_dir`. `stop_at_step` stops after that global step as the time
    limit would, checkpointing the exact position; `on_epoch` sees each epoch's record; `plot`
    draws the curves at the end (gpu-train's arms do not: matplotlib's first import there builds
    its font cache, seconds of the arms' 20 s to finish)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    device = resolve_device(cfg.device)
    resumed = _resumable(ckpt_path, cfg) if resume else None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where the folder goes, or in its path
        raise BuildError(f"cannot make the run folder {out_dir}: {e.strerror}") from None
    log_path = out_dir / "epochs.jsonl"
    torch.manual_seed(cfg.seed)
    if device == "cpu":
        torch.set_num_threads(cfg.threads)
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if not resume and ckpt_path.is_file() and progress:
        print(f"a new run in {out_dir}, over the one there (--resume continues that one instead)", file=sys.stderr)
    parts = _build(cfg, data, device)
    steps_per_epoch = parts.steps_per_epoch
    planned_epochs = cfg.epochs
    position = {"epoch": 0, "step": 0, "order": None, "partial": None}
    history: list[dict] = []
    elapsed = 0.0
    if resumed is not None:
        planned_epochs, position, history, elapsed = _restore(parts, out_dir, resumed, device)
        del resumed  # its tensors are the model's, the optimizer's and the EMA's now
    parts.schedule.total_steps = planned_epochs * steps_per_epoch
    if resume and position["epoch"] >= planned_epochs and progress:
        longer = (
            f"; --epochs {cfg.epochs} does not lengthen it (its LR has decayed to zero)"
            if cfg.epochs > planned_epochs
            else ""
        )
        print(f"{out_dir} has finished its {planned_epochs} planned epochs: nothing to resume{longer}", file=sys.stderr)
    # (elapsed s, epochs done) when the plan was made: the pace it is checked against is measured
    # from there (`replan_epochs`). A resumed planned run measures from its first evaluation instead,
    # past its start-up, torch.compile and first (cold) evaluation, which later epochs do not pay.
    planned_at: tuple[float, int] | None = None
    rebase_pace = bool(cfg.time_budget_s) and any("planned_epochs" in h for h in history)

    def save(global_step: int) -> None:
        _save_checkpoint(
            out_dir,
            global_step,
            arch=get_config(cfg.model).to_dict(),
            train_config=asdict(cfg),
            model=parts.model,
            ema=parts.ema,
            opt=parts.opt,
            sched=parts.sched,
            loader=parts.loader,
            position=position,
            history=history,
            seconds=time.perf_counter() - t_start,
            planned_epochs=planned_epochs,
        )

    # `progress` prints each epoch's record; the bar as well only on a terminal or where
    # QUICKNET_PROGRESS=1 asks for it (quicknet/build/progress.py): logs stay free of bar frames
    show_bar = progress and bar_wanted()
    stopped_early = False
    t_start = time.perf_counter() - elapsed
    last_save = time.perf_counter()
    epoch = position["epoch"]
    while epoch < planned_epochs and not stopped_early:
        run = _train_pass(parts, cfg, epoch, position, planned_epochs, t_start, stop_at_step, show_bar, device)
        if run.stopped:  # mid-epoch: keep the exact position, record no epoch
            stopped_early = True
            position = {
                "epoch": epoch,
                "step": run.step,
                "order": run.order,
                "partial": {
                    "seen": run.seen,
                    "correct": run.correct,
                    "loss_sum": run.loss_sum,
                    "seconds": time.perf_counter() - run.t_epoch,
                },
            }
            save(epoch * steps_per_epoch + run.step)
            break
        _sync(device)
        t_trained = time.perf_counter()
        train_seconds = t_trained - run.t_epoch
        record = {
            "epoch": epoch + 1,
            "train_loss": round(run.loss_sum.item() / max(run.seen, 1), 5),
            "train_acc": round(run.correct.item() / max(run.seen, 1), 5),
            "lr": round(parts.sched.get_last_lr()[0], 6),
            "images_per_s": round(run.seen / train_seconds, 1),
            "epoch_seconds": round(train_seconds, 2),
        }
        last = epoch + 1 == planned_epochs
        plan_now = bool(cfg.time_budget_s) and not last and epoch + 1 == max(1, cfg.plan_after_epochs)
        warm_eval = 0.0
        if last or plan_now or (epoch + 1) % cfg.eval_every == 0:
            warm_eval = _score(record, parts, history, device, plan_now)
        if plan_now:
            # epoch 1: its second half (compiled, warm); later: the whole epoch
            steady = 2 * (t_trained - run.t_half) if epoch == 0 and run.t_half else train_seconds
            planned_epochs = plan_epochs(
                budget_s=cfg.time_budget_s,
                elapsed_s=time.perf_counter() - t_start,
                done=epoch + 1,
                steady_epoch_s=steady,
                eval_s=warm_eval,
                eval_every=cfg.eval_every,
                max_epochs=cfg.epochs,
            )
            parts.schedule.total_steps = planned_epochs * steps_per_epoch
            record["planned_epochs"] = planned_epochs
            record["steady_epoch_seconds"] = round(steady, 2)
            record["eval_seconds"] = round(warm_eval, 3)
            planned_at = (time.perf_counter() - t_start, epoch + 1)
        elif rebase_pace and warm_eval:
            planned_at, rebase_pace = (time.perf_counter() - t_start, epoch + 1), False
        elif planned_at is not None and warm_eval and not last:
            shorter = replan_epochs(
                budget_s=cfg.time_budget_s,
                elapsed_s=time.perf_counter() - t_start,
                done=epoch + 1,
                planned=planned_epochs,
                since_elapsed_s=planned_at[0],
                since_done=planned_at[1],
                eval_s=warm_eval,
            )
            if shorter < planned_epochs:
                parts.schedule.shorten((epoch + 1) * steps_per_epoch, shorter * steps_per_epoch)
                planned_epochs = record["planned_epochs"] = shorter
                record["replanned"] = True
        record["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        history.append(record)
        line = json.dumps(record)
        if progress:
            tqdm.write(line)
        with log_path.open("a") as f:
            f.write(line + "\n")
        epoch += 1
        position = {"epoch": epoch, "step": 0, "order": None, "partial": None}
        save_step = epoch * steps_per_epoch
        out_of_time = cfg.time_limit_s and time.perf_counter() - t_start > cfg.time_limit_s
        if epoch < planned_epochs and (out_of_time or (stop_at_step is not None and save_step >= stop_at_step)):
            stopped_early = True
        if epoch == planned_epochs or stopped_early or time.perf_counter() - last_save >= cfg.save_every_s:
            save(save_step)  # 3 files of up to 14 MB each for the full model: not free on every short epoch
            last_save = time.perf_counter()
        if on_epoch is not None:
            on_epoch(record)

    if stopped_early and progress:
        where = f"epoch {position['epoch'] + 1}, step {position['step']} of {steps_per_epoch}"
        print(f"stopped at {where}: --resume continues from {ckpt_path}", file=sys.stderr)
    if plot:
        plot_curves(history, out_dir / "training_curves.png", title=f"{cfg.model} on {device}")
    return TrainResult(ckpt_path, history, time.perf_counter() - t_start, device, stopped_early, planned_epochs)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _save_checkpoint(out_dir: Path, step: int, *, model, ema, opt, sched, loader, **record) -> None:
    """Step-named model and optimizer files first, then `checkpoint.pt` naming them, then the old ones go."""
    files = {"model": f"model-{step:08d}.pt", "optimizer": f"optimizer-{step:08d}.pt"}
    with atomic_write(out_dir / files["model"]) as f:
        torch.save({"step": step, "model": model.state_dict()}, f)
    with atomic_write(out_dir / files["optimizer"]) as f:
        torch.save({"step": step, "optimizer": opt.state_dict()}, f)
    state = {
        **record,
        "step": step,
        "files": files,
        "ema": ema.module.state_dict() if ema is not None else None,
        "ema_state": ema.state_dict() if ema is not None else None,
        "scheduler": sched.state_dict(),
        "loader": loader.state_dict(),
        "rng": {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        },
    }
    with atomic_write(out_dir / CHECKPOINT) as f:
        torch.save(state, f)
    for old in [*out_dir.glob("model-*.pt"), *out_dir.glob("optimizer-*.pt")]:
        if old.name not in files.values():
            old.unlink(missing_ok=True)


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss (train and test), accuracy and learning rate per epoch. Skipped where matplotlib is
    missing (a serve-only install)."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    epochs = [h["epoch"] for h in history]

    def series(key: str) -> tuple[list, list]:
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])

    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(14, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train (label-smoothed)")
    for key, label in (("test_loss", "test"), ("test_loss_ema", "test, EMA")):
        xs, ys = series(key)
        if xs:
            ax_loss.plot(xs, ys, marker="o", label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["train_acc"] for h in history], marker="o", label="train (augmented)")
    for key, label in (("test_acc", "test"), ("test_acc_ema", "test, EMA")):
        xs, ys = series(key)
        if xs:
            ax_acc.plot(xs, ys, marker="o", label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1")
    ax_acc.legend()
    ax_lr.plot(epochs, [h["lr"] for h in history], marker="o")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate (end of epoch)")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
