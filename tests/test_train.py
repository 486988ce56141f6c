from __future__ import annotations

import itertools
import json
from dataclasses import asdict

import pytest
import torch

from quicknet.build.config import TrainConfig
from quicknet.build.data import Dataset, TensorLoader
from quicknet.build.train import _Schedule, accuracy, load_checkpoint, plan_epochs, replan_epochs, train
from quicknet.errors import BuildError

CKPT = "checkpoint.pt"
TINY = dict(model="quicknet-xs", batch_size=64, eval_subset=256, ema_decay=0.0)
RESUME = dict(TINY, epochs=2, train_subset=256, ema_decay=0.9)  # 4 steps an epoch, EMA on
# 2 steps an epoch of 16 images: for runs a fake clock times, where a real step's cost buys nothing
SHORT_STEPS = dict(TINY, batch_size=16, train_subset=32)
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


def test_tiny_run_overfits_128_images(cifar: Dataset, tmp_path):
    # lr is scaled by batch/256, so 0.2 at batch 32 is 0.025; 25 epochs of 4 steps. Evaluated every
    # 5th epoch: the curve still has its points. 128 images memorised to 100% in ~21 s on 2 cores
    # (256 images, 200 steps, took ~35 s); 20 epochs at lr 0.3 reached only 92%.
    cfg = TrainConfig(
        **{**TINY, "batch_size": 32},
        epochs=25,
        lr=0.2,
        train_subset=128,
        eval_every=5,
        translate=0,
        cutout=0,
        label_smoothing=0.0,
    )
    result = train(cfg, cifar, tmp_path, progress=False)
    model, _ = load_checkpoint(result.checkpoint)
    subset = cifar.train.sample(128, seed=cfg.seed)
    acc = accuracy(model, TensorLoader(subset, 128, train=False), "cpu")
    assert acc >= 0.9, f"memorised only {acc:.2%} of 128 training images"
    lines = [json.loads(x) for x in (tmp_path / "epochs.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, 26))
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert {"test_loss", "lr", "images_per_s", "elapsed_s"} <= set(lines[-1])
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("setting", ["0", "1"])
def test_training_draws_its_bar_only_where_progress_is_wanted(cifar: Dataset, tmp_path, monkeypatch, capfd, setting):
    """`progress` prints each epoch's record; the bar's frames go to stderr only on a terminal or
    with QUICKNET_PROGRESS=1 (a log file of `quicknet build` had them with 0, and off a terminal)."""
    monkeypatch.setenv("QUICKNET_PROGRESS", setting)
    train(TrainConfig(**TINY, epochs=1, train_subset=64), cifar, tmp_path, progress=True)
    out, err = capfd.readouterr()
    assert '"epoch": 1' in out, out
    assert ("epoch 1/1" in err) == (setting == "1"), err


def test_resuming_what_is_not_there_or_another_model_is_one_line(cifar: Dataset, tmp_path, capfd):
    """A mistyped --run-dir with --resume trained from scratch without a word; a run of another model
    was a state_dict size mismatch. A stop says how to go on; a finished run, that nothing is left."""
    cfg = TrainConfig(**TINY, epochs=1, train_subset=128)  # 2 steps an epoch
    with pytest.raises(BuildError, match="^nothing to resume: .*checkpoint.pt not found .leave out --resume"):
        train(cfg, cifar, tmp_path / "typo", resume=True, progress=False)
    assert not (tmp_path / "typo").exists(), "a refused resume makes no folder"
    (tmp_path / "a file").write_text("x")
    for where in (tmp_path / "a file", tmp_path / "a file" / "run"):
        with pytest.raises(BuildError, match=f"^cannot make the run folder {where}: "):
            train(cfg, cifar, where, progress=False)
    run = tmp_path / "xs"
    stopped = train(cfg, cifar, run, progress=True, stop_at_step=1)
    assert stopped.stopped_early
    err = capfd.readouterr().err
    assert f"stopped at epoch 1, step 1 of 2: --resume continues from {run / 'checkpoint.pt'}" in err, err
    other = TrainConfig(**{**TINY, "model": "quicknet"}, epochs=1, train_subset=128)
    with pytest.raises(
        BuildError, match=f"^{run} holds a quicknet-xs run, not quicknet: resume it with --model quicknet-xs"
    ):
        train(other, cifar, run, resume=True, progress=False)
    capfd.readouterr()
    train(cfg, cifar, tmp_path / "again", progress=True, stop_at_step=1)
    assert "over the one there" not in capfd.readouterr().err, "a new folder has nothing to replace"
    train(cfg, cifar, tmp_path / "again", progress=True, stop_at_step=1)
    err = capfd.readouterr().err
    assert f"a new run in {tmp_path / 'again'}, over the one there (--resume continues that one instead)" in err, err
    changed = TrainConfig(**{**TINY, "batch_size": 32}, epochs=1, train_subset=256)
    with pytest.raises(BuildError, match=r"--resume continues .*'s run as it started, with --batch-size 64 "):
        train(changed, cifar, run, resume=True, progress=False)  # it trained another run under the record
    finished = train(cfg, cifar, run, resume=True, progress=False)
    assert not finished.stopped_early and finished.history[-1]["epoch"] == 1
    capfd.readouterr()
    again = train(TrainConfig(**TINY, epochs=3, train_subset=128), cifar, run, resume=True, progress=True)
    assert again.planned_epochs == 1 and len(again.history) == 1
    err = capfd.readouterr().err
    assert f"{run} has finished its 1 planned epochs: nothing to resume; --epochs 3 does not lengthen it" in err, err


def test_a_resume_on_cuda_reads_its_checkpoint_on_the_host(tmp_path, monkeypatch):
    """A CUDA run's --resume would have died at torch.set_rng_state ("RNG state must be a
    torch.ByteTensor"): checkpoint.pt was read onto the run's device, and the RNG states it holds must
    stay CPU tensors. It is read on the host; the model and optimizer files go to the device. Here,
    with no GPU, reading onto "cuda" fails at once, so the run is stopped where it builds its model."""
    from quicknet.build import train as train_module

    cfg = TrainConfig(**TINY, epochs=1)
    torch.save({"train_config": asdict(cfg), "rng": {"cpu": torch.get_rng_state(), "cuda": None}}, tmp_path / CKPT)
    read_as, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: read_as.append(k.get("map_location")) or load(*a, **k))

    class Built(Exception):
        pass

    def build(*args):
        raise Built

    monkeypatch.setattr(train_module, "resolve_device", lambda _: "cuda")
    monkeypatch.setattr(train_module, "_build", build)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32  # train() sets them for CUDA
    try:
        with pytest.raises(Built):
            train(cfg, None, tmp_path, resume=True, progress=False)
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved
    assert read_as == ["cpu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: --device cuda is valid")
def test_device_cuda_without_a_gpu_is_one_line():
    """It was a torch RuntimeError traceback from deep in the model's .to()."""
    from quicknet.build.train import resolve_device

    with pytest.raises(BuildError, match=r"^--device cuda: torch .* finds no CUDA GPU here; use --device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"


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


def test_time_budget_plans_the_epochs(cifar: Dataset, tmp_path, monkeypatch):
    generous = train(
        TrainConfig(**TINY, epochs=3, train_subset=128, time_budget_s=1e6), cifar, tmp_path / "a", progress=False
    )
    assert [h["epoch"] for h in generous.history] == [1, 2, 3] and generous.planned_epochs == 3
    assert generous.history[0]["planned_epochs"] == 3
    spent = train(TrainConfig(**TINY, epochs=3, train_subset=128, time_budget_s=1e-6), cifar, tmp_path / "b")
    assert [h["epoch"] for h in spent.history] == [1] and spent.planned_epochs == 1
    assert not spent.stopped_early
    # A fake clock (a loaded machine must not change the plan): epoch 1 trains 2.25 s, its first
    # evaluation is cold (1.0 s) and is timed again warm (0.1 s; no EMA here), then an epoch is 0.5 s
    # of training and 0.1 of evaluation: 1 + int(0.93 * (6.2 - 3.35 - 0.1) / 0.6) = 5 epochs, ending
    # at 5.75 s. (Planning from the cold evaluation planned 2.)
    _replay_timings(
        monkeypatch, step_seconds=lambda i: 2.0 if i == 0 else 0.25, eval_seconds=lambda i: 1.0 if i == 0 else 0.1
    )
    budget = 6.2
    fitted = train(TrainConfig(**TINY, epochs=200, train_subset=128, time_budget_s=budget), cifar, tmp_path / "c")
    assert fitted.planned_epochs == 5 and not fitted.stopped_early
    assert [h["epoch"] for h in fitted.history] == [1, 2, 3, 4, 5]
    assert fitted.history[-1]["lr"] == 0.0, "the LR schedule decays to zero at the planned end"
    assert fitted.seconds == pytest.approx(5.75), f"{fitted.seconds:.1f}s for a {budget}s budget"


class _FakeClock:
    """`time` for quicknet.build.train: the clock moves only when the fakes below say so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def _replay_timings(monkeypatch, step_seconds, eval_seconds):
    """Training steps and evaluations take the given seconds of a fake clock: `step_seconds(i)` for
    the i-th training step, `eval_seconds(i)` for the i-th evaluation (both counted from 0)."""
    import quicknet.build.train as train_mod

    clock = _FakeClock()
    counts = {"steps": 0, "evals": 0}

    class TimedLoader(TensorLoader):
        def batches(self, order=None, start=0):
            for batch in super().batches(order, start):
                if self.train:
                    clock.now += step_seconds(counts["steps"])
                    counts["steps"] += 1
                yield batch

    def timed_evaluate(model, loader, device):
        clock.now += eval_seconds(counts["evals"])
        counts["evals"] += 1
        return 0.5, 1.0

    monkeypatch.setattr(train_mod, "time", clock)
    monkeypatch.setattr(train_mod, "TensorLoader", TimedLoader)
    monkeypatch.setattr(train_mod, "evaluate", timed_evaluate)


def test_the_planner_replays_the_first_gpu_run(cifar: Dataset, tmp_path, monkeypatch):
    """2026-12-04 on an H200: epoch 1 took 46.1 s (torch.compile), 1.32 s a steady epoch, and the
    first evaluation (model, then EMA) 3.6 s cold against 0.2 s warm; 353.4 s to plan in. Planning
    from the cold evaluation gave 58 epochs and ended at 161 s of 390; a warm one plans 186."""
    spe = 2  # 128 images at batch 64: the fake clock stands in for 98 steps of 512
    _replay_timings(
        monkeypatch,
        step_seconds=lambda i: 46.08 - 0.66 if i == 0 else 1.32 / spe,
        eval_seconds=lambda i: 3.5 if i == 0 else 0.1,
    )
    cfg = TrainConfig(**{**TINY, "ema_decay": 0.999}, epochs=200, train_subset=128, time_budget_s=353.4)
    result = train(cfg, cifar, tmp_path, progress=False, stop_at_step=spe)
    first = result.history[0]
    assert first["steady_epoch_seconds"] == 1.32 and first["elapsed_s"] == pytest.approx(49.68)
    assert first["planned_epochs"] == 186, first


def test_the_planner_charges_evaluation_per_eval_every():
    common = dict(budget_s=353.4, elapsed_s=49.68, done=1, steady_epoch_s=1.32, eval_s=0.2, max_epochs=1000)
    assert plan_epochs(**common, eval_every=1) == 186
    # 0.05 s of evaluation an epoch instead of 0.2: 1 + 0.93 * 303.52 / 1.37 epochs
    assert plan_epochs(**common, eval_every=4) == 207
    assert plan_epochs(**common, eval_every=1, safety=1.0) == 200  # 1 + 303.52 / 1.52
    assert plan_epochs(**{**common, "max_epochs": 100}, eval_every=1) == 100
    assert plan_epochs(**{**common, "elapsed_s": 400.0}, eval_every=1) == 1, "a spent budget plans what is done"


@pytest.mark.parametrize("eval_every", [1, 2])
def test_the_planner_can_wait_for_a_shared_gpu(cifar: Dataset, tmp_path, monkeypatch, eval_every):
    """With `plan_after_epochs=2` the plan is made from the second epoch as measured (other arms on
    the GPU have finished compiling by then), and the first one's slow half is never used; with
    `eval_every=2` epoch 2 holds the first, cold evaluation, which is not the estimate either."""
    _replay_timings(
        monkeypatch,
        step_seconds=lambda i: {0: 60.0, 1: 0.5}.get(i, 2.0),  # epoch 2: 4 s, three arms sharing
        eval_seconds=lambda i: 3.5 if i == 0 else 0.3,
    )
    cfg = TrainConfig(
        **{**TINY, "ema_decay": 0.999},
        epochs=200,
        train_subset=128,
        time_budget_s=400.0,
        plan_after_epochs=2,
        eval_every=eval_every,
    )
    result = train(cfg, cifar, tmp_path, progress=False, stop_at_step=4)
    assert "planned_epochs" not in result.history[0]
    second = result.history[1]
    assert second["steady_epoch_seconds"] == 4.0 and second["eval_seconds"] == pytest.approx(0.6)
    left = 400.0 - second["elapsed_s"] - 0.6
    assert second["planned_epochs"] == 2 + int(0.93 * left / (4.0 + 0.6 / eval_every))


def test_the_plan_is_shortened_when_the_epochs_grow_slower(cifar: Dataset, tmp_path, monkeypatch):
    """An arm planned from an epoch 2 it had the GPU to itself for (the others still compiling past
    the barrier), then shared three ways: 1 s an epoch planned, 3 s run. The plan as made would end
    at ~203 s; the hard stop at 115 s would cut it with the LR far from zero. At the first evaluation
    after the plan the pace says so, and the schedule ends inside the budget, at LR zero."""
    _replay_timings(
        monkeypatch,
        step_seconds=lambda i: {0: 30.0}.get(i, 0.5 if i < 4 else 1.5),
        eval_seconds=lambda i: 3.5 if i == 0 else 0.2,
    )
    cfg = TrainConfig(
        **SHORT_STEPS,
        epochs=200,
        time_budget_s=100.0,
        time_limit_s=115.0,  # as gpu-train sets it: HARD_STOP_MARGIN_S past the budget
        plan_after_epochs=2,
        eval_every=2,
    )
    result = train(cfg, cifar, tmp_path, progress=False)
    h = {r["epoch"]: r for r in result.history}
    assert h[2]["planned_epochs"] == 56, h[2]  # 2 + int(0.93 * (100 - 35.2 - 0.2) / (1 + 0.2 / 2))
    # epoch 4: 3.1 s an epoch since the plan; (56 - 4) x 3.1 > 100 - 41.4 - 0.2: 4 + int(58.4 / 3.1)
    assert h[4]["replanned"] and h[4]["planned_epochs"] == 22, h[4]
    assert result.planned_epochs == 22 and not result.stopped_early
    assert max(h) == 22 and h[22]["lr"] == 0.0 and result.seconds <= 100.0, (max(h), h[22], result.seconds)
    # from epoch 4's LR in a straight line to zero at epoch 22: no jump where the plan changed
    assert h[5]["lr"] == pytest.approx(h[4]["lr"] * (22 - 5) / (22 - 4), abs=1e-6), (h[4]["lr"], h[5]["lr"])
    lrs = [h[e]["lr"] for e in range(2, 23)]
    assert all(a > b for a, b in itertools.pairwise(lrs)), f"the LR decays all the way: {lrs}"
    assert sum("replanned" in r for r in result.history) == 1, "one shortening was enough"


def test_a_resumed_run_measures_its_pace_past_its_start_up(cifar: Dataset, tmp_path, monkeypatch):
    """The run above stopped at epoch 6 (after its plan was shortened to 22) and resumed in a new
    process, which compiles again (30 s) and evaluates cold again (3.5 s) before 3 s epochs. Measured
    from the resume, that start-up made the pace 19 s an epoch and ended the run at epoch 8; measured
    from the first evaluation after it, the pace is 3.1 s and the plan loses only the epochs the 33 s
    cost: 12 epochs, ending at LR zero inside the budget."""
    steps = {"before": lambda i: {0: 30.0}.get(i, 0.5 if i < 4 else 1.5), "after": lambda i: 30.0 if i == 0 else 1.5}
    cfg = TrainConfig(
        **SHORT_STEPS, epochs=200, time_budget_s=100.0, time_limit_s=115.0, plan_after_epochs=2, eval_every=2
    )
    _replay_timings(monkeypatch, step_seconds=steps["before"], eval_seconds=lambda i: 3.5 if i == 0 else 0.2)
    first = train(cfg, cifar, tmp_path, progress=False, stop_at_step=12)
    assert first.stopped_early and first.planned_epochs == 22 and len(first.history) == 6
    _replay_timings(monkeypatch, step_seconds=steps["after"], eval_seconds=lambda i: 3.5 if i == 0 else 0.2)
    resumed = train(cfg, cifar, tmp_path, resume=True, progress=False)
    h = {r["epoch"]: r for r in resumed.history}
    assert "replanned" not in h[8], "the first evaluation after the resume starts the pace; it plans nothing"
    # epoch 10: 3.1 s an epoch since epoch 8 (85.6 s); 12 x 3.1 > 100 - 91.8 - 0.2: 10 + int(8.0 / 3.1)
    assert h[10]["replanned"] and h[10]["planned_epochs"] == 12, h[10]
    assert max(h) == 12 and h[12]["lr"] == 0.0 and not resumed.stopped_early and resumed.seconds <= 100.0


def test_replanning_keeps_a_plan_that_fits_and_never_lengthens_one():
    common = dict(budget_s=100.0, elapsed_s=41.4, done=4, since_elapsed_s=35.2, since_done=2, eval_s=0.2)
    assert replan_epochs(**common, planned=56) == 22  # 3.1 s an epoch: 4 + int(58.4 / 3.1)
    assert replan_epochs(**common, planned=22) == 22  # 18 x 3.1 = 55.8 <= 58.4: it fits
    assert replan_epochs(**common, planned=10) == 10, "a plan that fits is kept, never lengthened to 22"
    assert replan_epochs(**{**common, "elapsed_s": 101.0}, planned=56) == 4, "past the budget: stop at what is done"
    assert replan_epochs(**{**common, "elapsed_s": 99.0}, planned=56) == 4, "no epoch fits: stop at what is done"
    assert replan_epochs(**{**common, "since_done": 4}, planned=56) == 56, "no epoch since the plan: no pace yet"


def test_a_shortened_schedule_continues_its_line_and_is_kept_in_the_scheduler_state():
    schedule = _Schedule(warmup=10, total_steps=110)
    before = schedule(40)  # 0.7
    schedule.shorten(40, 60)
    assert schedule(40) == pytest.approx(before) and schedule(50) == pytest.approx(before / 2)
    assert schedule(60) == 0.0 and schedule(70) == 0.0 and schedule(5) == pytest.approx(0.55), "warmup unchanged"
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    state = torch.optim.lr_scheduler.LambdaLR(opt, schedule).state_dict()
    fresh = _Schedule(warmup=10, total_steps=110)  # what a resumed run builds, then loads
    resumed_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    torch.optim.lr_scheduler.LambdaLR(resumed_opt, fresh).load_state_dict(state)
    assert [fresh(s) for s in (40, 50, 60)] == [schedule(s) for s in (40, 50, 60)]
