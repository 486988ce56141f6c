"""ONNX Runtime: CPU (threads set explicitly), or the CUDA provider where onnxruntime-gpu is installed.

Two measured choices, made at load on the machine that serves:
- Precision (`--precision auto`, the default): static INT8 runs 1.5x FP32 for the trained full
  quicknet on this project's CPUs but about 1x for quicknet-xs, whose narrow layers spend as long in the
  quantize/dequantize ops around each convolution as INT8 saves inside it. So where the INT8
  model costs at most 0.5 point of published accuracy, both are timed (batch 1 and the largest
  batch, a few runs each) and the faster serves; `fp32` or `int8` force one.
- Threads: a one-image batch may run on a single-thread session. Waking a second intra-op thread
  (they spin only while a run lasts, so idle threads leave the CPU to the server) can cost more than it saves on
  one image (quicknet-xs here: +5% img/s FP32, +30% INT8 on one thread), or not (the full
  quicknet: 1.35x faster on two). Timed at load, the choice was wrong one start in three for the
  full model (the rest of the server starting takes the second core: 110 instead of 146 req/s at
  one request at a time, for the server's whole life). So it is made in service
  (`OneImageChoice`): the first one-image batches take turns on both sessions, the faster by
  median keeps serving and the other is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np

from quicknet.serve.backends.base import BackendError, warmup_sizes
from quicknet.serve.config import Settings
from quicknet.store import ModelVersion

INT8_MAX_ACCURACY_LOSS = 0.005

log = logging.getLogger("quicknet.backends")


def _session(ort, path: str, threads: int, providers: list[str]):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Threads spin while a run lasts and stop when it returns: each of a model's ~40 operators wakes
    # the other thread, and a futex wake per operator made one image 1.25x slower (the full model
    # on 2 cores: 5.9 -> 4.7 ms FP32, 3.6 -> 2.9 ms INT8); spinning past the run would take the CPU
    # from the server between batches. `dynamic_block_base` splits each operator's work into
    # shrinking blocks, so one late thread does not hold up the other (2-5% more).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.add_session_config_entry("session.dynamic_block_base", "4")
    try:
        return ort.InferenceSession(path, opts, providers=providers)
    except Exception as e:  # ORT raises its own exception family for bad or unsupported models
        raise BackendError(f"ONNX Runtime could not load {path.rsplit('/', 1)[-1]}: {e}") from None


def seconds_per_image(sessions: list, input_name: str, batch: int, runs: int) -> list[float]:
    """Each session's best time per image over `runs`, the sessions taking turns: a burst of load
    elsewhere (the other processes of the service starting on the same cores) slows them alike
    instead of making whichever ran during it look slower for the rest of the server's life
    (timed one after the other, one start in four of two fronts chose the full model's one-thread
    session, 1.5x slower on one image)."""
    x = np.zeros((batch, 32, 32, 3), dtype=np.uint8)
    for session in sessions:
        session.run(None, {input_name: x})
    best = [float("inf")] * len(sessions)
    for _ in range(runs):
        for i, session in enumerate(sessions):
            t0 = time.perf_counter()
            session.run(None, {input_name: x})
            best[i] = min(best[i], time.perf_counter() - t0)
    return [b / batch for b in best]


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, session, single, path: str, settings: Settings, provider: str, choice: dict):
        self.session = session
        # one-image batches: a one-thread session or this one, chosen in service; None: this one
        self.single = OneImageChoice(single, session) if single is not None else None
        self.path = path
        self.provider = provider
        self.threads = settings.threads
        self.max_batch_size = settings.max_batch_size
        self.input_name = session.get_inputs()[0].name
        self.choice = choice

    @classmethod
    def load(cls, version: ModelVersion, settings: Settings) -> OnnxRuntimeBackend:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime is not installed: pip install -e '.[serve]'") from None
        artifacts = version.metadata.get("artifacts", {})
        fp32 = "onnx-optimized" if artifacts.get("onnx-optimized") else "onnx"
        keys = {"fp32": fp32, "int8": "onnx-int8"}
        wanted = ["fp32", "int8"] if settings.precision == "auto" else [settings.precision]
        if settings.precision == "auto" and not _int8_allowed(version, fp32):
            wanted = ["fp32"]
        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        sessions = {}
        for precision in wanted:
            fname = artifacts.get(keys[precision])
            if not fname or not version.file(fname).is_file():
                if settings.precision == "auto" and precision == "int8":
                    continue
                raise BackendError(
                    f"{version.name} v{version.version} has no {keys[precision]} model; "
                    "republish it or pick another precision"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda and precision == "fp32" else []
            providers = providers or ["CPUExecutionProvider"]
            path = str(version.file(fname))
            main = _session(ort, path, settings.threads, providers)
            single = _session(ort, path, 1, providers) if settings.threads > 1 and not cuda else None
            sessions[precision] = (main, single, path)
        choice = {"precision": next(iter(sessions)), "rule": settings.precision}
        if len(sessions) == 2:  # auto: the faster of the two, timed here on this machine, in turns
            name = next(iter(sessions.values()))[0].get_inputs()[0].name
            # one image: each precision's faster session (one thread or all; in service the same choice is made again)
            each = [[s for s in (single, main) if s is not None] for main, single, _ in sessions.values()]
            timed = seconds_per_image(each[0] + each[1], name, 1, 5)
            ones = [min(timed[: len(each[0])]), min(timed[len(each[0]) :])]
            mosts = seconds_per_image([main for main, _, _ in sessions.values()], name, settings.max_batch_size, 2)
            timings = {
                precision: {"batch_1_ms": round(one * 1e3, 3), "max_batch_ms_per_image": round(most * 1e3, 4)}
                for precision, one, most in zip(sessions, ones, mosts, strict=True)
            }
            speedup = (timings["fp32"]["batch_1_ms"] / timings["int8"]["batch_1_ms"]) * (
                timings["fp32"]["max_batch_ms_per_image"] / timings["int8"]["max_batch_ms_per_image"]
            )
            choice = {"precision": "int8" if speedup > 1 else "fp32", "rule": "auto", "timings": timings}
        main, single, path = sessions.pop(choice["precision"])
        sessions.clear()
        _return_freed_memory()  # the timed-and-dropped sessions' arenas: ~50 MB a model otherwise kept
        return cls(main, single, path, settings, main.get_providers()[0], choice)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        feeds = {self.input_name: np.ascontiguousarray(batch, dtype=np.uint8)}
        if len(batch) == 1 and self.single is not None:
            return self.single.run(feeds)
        return self.session.run(None, feeds)[0]

    def warmup(self) -> None:
        for n in warmup_sizes(self.max_batch_size):
            self.infer(np.zeros((n, 32, 32, 3), dtype=np.uint8))
        if self.single is not None:
            self.single.start()  # the trials begin with traffic: start-up's load would bias them

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "provider": self.provider,
            "file": self.path,
            "threads": self.threads,
            "batch_1_threads": self.single.threads(self.threads) if self.single is not None else self.threads,
            "precision": self.choice["precision"],
            "precision_choice": self.choice,
        }


class OneImageChoice:
    """Which session runs one-image batches: one intra-op thread or all of them, measured on the
    server's own traffic. Until `start()` (the warm-up is over) the all-threads session serves.
    Then one-image calls take turns on the two, `TRIALS` each (for the full model ~0.2 s of serving
    at one request at a time; a trial on the slower session costs at most its difference); the
    faster by median serves from then on and the other session is dropped (its memory with it).
    Thread-safe enough for `instances > 1`: two calls racing on the tally only add a sample."""

    TRIALS = 16

    def __init__(self, one_thread, all_threads):
        self._sessions = (one_thread, all_threads)
        self._all_threads = all_threads
        self._times: tuple[list[float], list[float]] = ([], [])
        self.chosen = None  # the settled session
        self._started = False

    def start(self) -> None:
        self._started = True

    def threads(self, all_threads: int) -> int | str:
        if self.chosen is None:
            return "deciding" if self._started else all_threads
        return all_threads if self.chosen is self._all_threads else 1

    def run(self, feeds: dict) -> np.ndarray:
        if self.chosen is not None:
            return self.chosen.run(None, feeds)[0]
        sessions, times = self._sessions, self._times  # read once: another instance's call may settle it
        if not self._started or sessions[0] is None:
            return (self.chosen or self._all_threads).run(None, feeds)[0]
        turn = 0 if len(times[0]) <= len(times[1]) else 1
        t0 = time.perf_counter()
        out = sessions[turn].run(None, feeds)[0]
        times[turn].append(time.perf_counter() - t0)
        if self.chosen is None and min(len(times[0]), len(times[1])) >= self.TRIALS:
            one, every = (float(np.median(t)) for t in times)
            self.chosen = sessions[0 if one < every else 1]
            self._sessions = (None, None)  # the loser's last reference here: its memory goes back
            log.info(
                "one-image batches run on %s: median %.2f ms on one thread, %.2f ms on all (%d trials each)",
                "one thread" if one < every else "all threads",
                one * 1e3,
                every * 1e3,
                self.TRIALS,
            )
            if one >= every:
                _return_freed_memory()
        return out


def _return_freed_memory() -> None:
    """glibc keeps freed heap memory for reuse; hand it back to the OS (Linux, glibc only)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def _int8_allowed(version: ModelVersion, fp32_key: str) -> bool:
    """The INT8 model may serve by default only if its published accuracy is within 0.5 point of FP32's."""
    accuracy = version.metadata.get("accuracy", {})
    int8 = accuracy.get("onnx-int8", {}).get("top1")
    fp32 = accuracy.get(fp32_key, accuracy.get("onnx", {})).get("top1")
    return int8 is not None and fp32 is not None and int8 >= fp32 - INT8_MAX_ACCURACY_LOSS
