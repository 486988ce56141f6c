"""`--workers N`: one engine process and N front processes, supervised.

- Ports are checked here first (a busy port is one line, before anything loads); the fronts then
  all bind them with SO_REUSEPORT, and the kernel spreads connections across them.
- Metrics: every child writes to `PROMETHEUS_MULTIPROC_DIR` (a fresh folder, set before any child
  starts), so `/metrics` on any front shows the whole service. A dead child's live gauges go.
- A front that dies is restarted. An engine that dies takes the fronts out of readiness (they
  answer 503 / UNAVAILABLE at once, never hang) and is restarted; the fronts reconnect and turn
  ready when it is warm again. Exit code 2 from a child means a configuration or model error that
  a restart cannot fix: the service stops with it.
- SIGTERM / SIGINT: the fronts drain first (every accepted request is answered; the engine is
  still running), then the engine stops; exit 0 when every child did.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path

from quicknet.serve.config import Settings
from quicknet.serve.ports import free_ports

log = logging.getLogger("quicknet.supervisor")
FATAL = 2  # a child's "do not restart me" exit code
RESTART_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


def name_process(name: str) -> None:
    """The name `ps`, `top` and /proc show for this process (Linux, 15 characters at most), so an
    operator, and `benchmarks.cpu`, can tell the engine process from the fronts: their command
    lines are all multiprocessing's. Threads started after this inherit it."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(name[:15])


def _child_main(process_name: str, entry: Callable[[Settings, str], int], settings: Settings, path: str) -> None:
    """A child's target: `entry` is `main.run_engine` or `main.run_front`, handed in by `main.run`
    (pickled by name, so the child imports `main` itself: this module never imports it)."""
    name_process(process_name)
    raise SystemExit(entry(settings, path))


class _Child:
    def __init__(self, ctx, name: str, target, args: tuple):
        self.ctx, self.name, self.target, self.args = ctx, name, target, args
        self.process: multiprocessing.process.BaseProcess | None = None
        self.restarts = 0
        self.started_at = 0.0

    def start(self) -> None:
        self.process = self.ctx.Process(target=self.target, args=self.args, name=self.name, daemon=False)
        self.process.start()
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def stop(self, timeout_s: float) -> int | None:
        p = self.process
        if p is None:
            return 0
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
            p.join(timeout_s)
        if p.is_alive():
            log.error("%s did not stop within %.0fs; killing it", self.name, timeout_s)
            p.kill()
            p.join()
        return p.exitcode


def supervise(
    settings: Settings, run_engine: Callable[[Settings, str], int], run_front: Callable[[Settings, str], int]
) -> int:
    http_port, grpc_port = free_ports(settings)
    settings = settings.model_copy(update={"http_port": http_port, "grpc_port": grpc_port})
    workdir = Path(tempfile.mkdtemp(prefix="quicknet-"))
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    os.environ["QUICKNET_SUPERVISED"] = "1"
    path = str(workdir / "engine.sock")
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads or an event loop
    engine = _Child(ctx, "engine", _child_main, ("quicknet-engine", run_engine, settings, path))
    fronts = [
        _Child(ctx, f"front-{i}", _child_main, ("quicknet-front", run_front, settings, path))
        for i in range(settings.front_workers)
    ]

    stopping = False

    def on_signal(signum, _frame) -> None:
        nonlocal stopping
        if not stopping:
            log.info("received %s: draining the fronts, then the engine", signal.Signals(signum).name)
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info("starting 1 engine process and %d front processes (REST :%d, gRPC :%d)", len(fronts), http_port, grpc_port)
    code = 0
    try:
        engine.start()
        for front in fronts:
            front.start()
        while not stopping:
            children = [c for c in (engine, *fronts) if c.process is not None]
            wait([c.process.sentinel for c in children], timeout=0.5)
            for child in children:
                if stopping or child.alive():
                    continue
                exitcode = child.process.exitcode
                _forget(child.process.pid)
                if exitcode == FATAL:
                    log.error("%s cannot run (exit %d): stopping the service", child.name, exitcode)
                    stopping, code = True, 1
                    break
                delay = RESTART_BACKOFF_S[min(child.restarts, len(RESTART_BACKOFF_S) - 1)]
                if time.monotonic() - child.started_at > 60:
                    child.restarts = 0  # it ran a good while: a fresh crash, not a crash loop
                log.error("%s exited with %s; restarting it in %.1fs", child.name, exitcode, delay)
                time.sleep(delay)
                child.restarts += 1
                child.start()
    finally:
        drain = settings.drain_seconds + 10
        results = [front.stop(drain) for front in fronts]
        results.append(engine.stop(drain))
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(workdir, ignore_errors=True)
    if code == 0 and any(r not in (0, None) for r in results):
        log.error("a process did not stop cleanly (exit codes %s)", results)
        code = 1
    log.info("stopped")
    return code


def _forget(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
