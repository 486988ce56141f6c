"""ONNX Runtime: CPU (threads set explicitly), or the CUDA provider where onnxruntime-gpu is installed.

- The FP32 graph (`open_fp32`, `checked`): `model.onnx` with its PReLUs rewritten at load into
  operators ORT's blocked CPU kernels keep (`quicknet/ort_graph.py`: 1.22x the published graph
  for one image of the full quicknet, 1.71x for quicknet-xs at batch 8), served only once its
  logits match the file's; the file as published where the rewrite does not apply, or disagrees,
  or ORT cannot load or run it (one log line).
- Precision (`--precision auto`, the default): static INT8 (quantized from the same rewritten
  form) runs 1.7x FP32 for one image of the trained full quicknet on this project's CPUs, 2.2x at
  batch 8, but about 1x for quicknet-xs, whose narrow layers spend as long in the
  quantize/dequantize ops around each convolution as INT8 saves inside it. So where the INT8
  model costs at most 0.5 point of published accuracy, both are timed (batch 1 and the largest
  batch, a few runs each, at load on the machine that serves) and INT8 serves where it is clearly
  faster (`INT8_MIN_SPEEDUP`), else FP32; `fp32` or `int8` force one.
- Threads: every batch runs on `--threads` intra-op threads, which spin while a run lasts and
  stop when it returns. One image used to run on a one-thread session where that was faster
  (waking the second thread at each of the model's ~40 operators cost more than it saved on
  quicknet-xs), chosen by timing both at load, which the rest of the server starting on the same
  cores got wrong one start in three for the full model (110 instead of 146 req/s at one request
  at a time, for the server's whole life). With spinning during a run two threads are at least as
  fast as one on every published model here (one image: the full model 4.6 against 7.4 ms FP32,
  2.97 against 3.8 INT8; quicknet-xs 0.80 against 0.82), and the second session is gone with
  its ~20 MB. Every model's runs in a process take turns on its cores (`cores.py`): two models'
  threads spinning on the same cores at once lost a quarter of their joint throughput.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import numpy as np

from quicknet.ort_graph import REWRITE, blocked_prelu
from quicknet.serve.backends import cores
from quicknet.serve.backends.base import BackendError, warmup_sizes
from quicknet.serve.backends.derived import check_logits, probe_images, source_logits
from quicknet.serve.config import Settings
from quicknet.store import ModelVersion

INT8_MAX_ACCURACY_LOSS = 0.005
log = logging.getLogger("quicknet.backends")


def open_session(
    ort, model: str | bytes, threads: int, providers: tuple[str, ...] = ("CPUExecutionProvider",), name: str = ""
):
    """The engine's ONNX Runtime session on a file or a serialized graph (benchmarks open theirs
    here too, so they measure what serves)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No memory patterns: ORT would keep a planned block per input shape it has seen (every warm-up
    # bucket), 64 MB of the service's 307 at ready with both published models, for no speed here.
    opts.enable_mem_pattern = False
    # Threads spin while a run lasts and stop when it returns: each of a model's ~40 operators wakes
    # the other thread, and a futex wake per operator made one image 1.25x slower (the full model
    # on 2 cores: 5.9 -> 4.7 ms FP32, 3.6 -> 2.9 ms INT8); spinning past the run would take the CPU
    # from the server between batches. Spinning wants the cores to itself: with another busy process
    # on one of the 2 cores a batch of 64 ran 150 img/s spinning, 178 not (give the service its
    # cores: Kubernetes requests = limits). `dynamic_block_base` splits each operator's work into
    # shrinking blocks, so one late thread does not hold up the other (2-5% more).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.add_session_config_entry("session.dynamic_block_base", "4")
    try:
        return ort.InferenceSession(model, opts, providers=list(providers))
    except Exception as e:  # ORT raises its own exception family for bad or unsupported models
        shown = name or (model.rsplit("/", 1)[-1] if isinstance(model, str) else "the graph")
        raise BackendError(f"ONNX Runtime could not load {shown}: {e}") from None


def open_fp32(ort, path: str, threads: int) -> tuple[object, dict]:
    """The FP32 session on the CPU: `path`'s PReLUs rewritten for ORT's blocked kernels
    (`quicknet/ort_graph.py`), or `path` as published where the rewrite does not apply or ORT
    cannot load it (one log line). Returns (session, what it runs). A rewritten session serves only
    after `checked` (done once the load has chosen what serves: with auto precision the faster INT8
    model often serves instead, and its check would be wasted)."""
    name = path.rsplit("/", 1)[-1]

    def published(why: str, warn: bool = False) -> tuple[object, dict]:
        return _published(ort, path, threads, why, warn)

    try:
        import onnx
    except ImportError:
        return published("no onnx package to rewrite it")
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf's decode errors have no common base; ORT's own load says it better
        return published(f"onnx could not read it: {e}")
    rewritten = blocked_prelu(model)
    if not rewritten:
        return published("no per-channel PReLU")
    try:
        session = open_session(ort, model.SerializeToString(), threads, name=f"{name} rewritten ({REWRITE})")
    except BackendError as e:
        return published(str(e), warn=True)
    return session, {"graph": REWRITE, "prelus_rewritten": rewritten}


def checked(ort, session, graph: dict, path: str, threads: int) -> tuple[object, dict]:
    """A rewritten session's logits against `path`'s (`derived.check_logits`): the session where
    they agree, else `path` as published, with one log line (also where the rewritten graph fails
    to run)."""
    if graph["graph"] != REWRITE:
        return session, graph
    name = path.rsplit("/", 1)[-1]
    what = f"{name} rewritten ({REWRITE})"
    images = probe_images()
    expected = source_logits(path, images, threads)  # the published file's own errors are not a fallback's
    try:
        got = session.run(None, {session.get_inputs()[0].name: images})[0]
        delta = check_logits(got, expected, what)
    except Exception as e:  # BackendError from the check; ORT's own exception family from the run
        why = str(e) if isinstance(e, BackendError) else f"{what} failed to run: {type(e).__name__}: {e}"
        return _published(ort, path, threads, why, warn=True)
    return session, graph | {"max_logit_delta": delta}


def _published(ort, path: str, threads: int, why: str, warn: bool) -> tuple[object, dict]:
    """`path` as published, and why (its first line; logged where something went wrong)."""
    why = why.splitlines()[0]
    if warn:
        log.warning("%s; serving %s as published", why, path.rsplit("/", 1)[-1])
    return open_session(ort, path, threads), {"graph": "as published", "why": why}


# INT8 serves under `--precision auto` only this much faster than FP32 (the geometric mean of its
# speed-ups at one image and at the largest batch). Where the two are within timing noise, as on
# quicknet-xs, "the faster" flipped from one start to the next, and with it the scores the same
# version answers; FP32, the more accurate, serves then. quicknet-xs measured 0.96-1.00 on this
# project's CPUs, and 1.11 once while the host ran at a quarter of its speed, hence the margin;
# the full quicknet's INT8 measured 1.95-2.12: it still serves INT8.
INT8_MIN_SPEEDUP = 1.25


def int8_speedup(timings: dict) -> float:
    ratios = [timings["fp32"][k] / timings["int8"][k] for k in ("batch_1_ms", "max_batch_ms_per_image")]
    return math.sqrt(ratios[0] * ratios[1])


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

    def __init__(self, session, path: str, settings: Settings, provider: str, choice: dict, graph: dict):
        self.session = session
        self.graph = graph
        self.path = path
        self.provider = provider
        self.threads = settings.threads
        self.max_batch_size = settings.max_batch_size
        self.input_name = session.get_inputs()[0].name
        self.choice = choice
        self.gate = cores.gate() if provider == "CPUExecutionProvider" else None

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
            if precision == "fp32" and providers == ["CPUExecutionProvider"]:
                sessions[precision] = (*open_fp32(ort, path, settings.threads), path)
            else:
                graph = {"graph": "as published"}
                sessions[precision] = (open_session(ort, path, settings.threads, tuple(providers)), graph, path)
        choice = {"precision": next(iter(sessions)), "rule": settings.precision}
        if len(sessions) == 2:  # auto: the faster of the two, timed here on this machine, in turns
            timed = [session for session, _, _ in sessions.values()]
            name = timed[0].get_inputs()[0].name
            ones = seconds_per_image(timed, name, 1, 5)
            mosts = seconds_per_image(timed, name, settings.max_batch_size, 2)
            timings = {
                precision: {"batch_1_ms": round(one * 1e3, 3), "max_batch_ms_per_image": round(most * 1e3, 4)}
                for precision, one, most in zip(sessions, ones, mosts, strict=True)
            }
            speedup = int8_speedup(timings)
            choice = {"precision": "int8" if speedup >= INT8_MIN_SPEEDUP else "fp32", "rule": "auto"}
            choice |= {"int8_speedup": round(speedup, 3), "timings": timings}
        session, graph, path = sessions.pop(choice["precision"])
        sessions.clear()
        session, graph = checked(ort, session, graph, path, settings.threads)
        _return_freed_memory()  # the timed-and-dropped session's arena: ~50 MB a model otherwise kept
        return cls(session, path, settings, session.get_providers()[0], choice, graph)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.uint8)}
        if self.gate is None:
            return self.session.run(None, feed)[0]
        with self.gate.hold(self.threads):  # the process's cores, shared with its other models (cores.py)
            return self.session.run(None, feed)[0]

    def warmup(self) -> None:
        for n in warmup_sizes(self.max_batch_size):
            self.infer(np.zeros((n, 32, 32, 3), dtype=np.uint8))

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "provider": self.provider,
            "file": self.path,
            "threads": self.threads,
            "precision": self.choice["precision"],
            "precision_choice": self.choice,
            **self.graph,
        }


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
