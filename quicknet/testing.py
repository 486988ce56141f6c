"""What the tests and the benchmarks share: the real server (`quicknet serve`) started as a
subprocess on 127.0.0.1 with free ports, a store of the small shipped model, metric readers.

The top layer (nothing under `quicknet/` imports it) and meant for a checkout of the repository:
`REPO` is the checkout, and importing this module copies its `quicknet-xs` into a temporary store
(unless `QUICKNET_TEST_STORE` names one).
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SHIPPED_STORE = REPO / "model_store"  # what `make serve` serves: the full quicknet by default
# Tests serve the small shipped model: on 2 cores the full quicknet costs ~15x the CPU an image,
# and what the tests check (protocols, limits, lifecycle) does not depend on the network's size.
# Tests of the shipped default itself (the README's commands, its accuracy) use SHIPPED_STORE.
FAST_MODEL = "quicknet-xs"


def _store_of(name: str) -> Path:
    """A store holding `name` alone (a copy of its shipped versions), its DEFAULT; removed at exit."""
    import atexit
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="quicknet-test-store-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    shutil.copytree(SHIPPED_STORE / name, root / name, ignore=shutil.ignore_patterns(".staging-*"))
    (root / "DEFAULT").write_text(name + "\n")
    return root


STORE = Path(os.environ.get("QUICKNET_TEST_STORE") or _store_of(FAST_MODEL))
# the newest version of it there (the shipped store keeps one: a republish replaces it)
FAST_VERSION = max(int(p.name) for p in (STORE / FAST_MODEL).iterdir() if p.name.isdigit())


def publish_shipped(root: Path, name: str):
    """The shipped small model's files and metadata published again into `root` as the next version
    of `name` (a second model, or a second version, for tests and benchmarks that need one)."""
    from quicknet import store

    shipped = store.get_version(STORE, FAST_MODEL)
    meta = {k: v for k, v in shipped.metadata.items() if k not in ("files", "name", "version")}
    return store.publish(root, name, [shipped.file(f) for f in shipped.metadata["files"]], meta)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    log_path: Path
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_server(
    log_dir: Path,
    *,
    store: Path | None = None,
    ready_timeout: float = 120,
    wait_ready: bool = True,
    env: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
    **settings: object,
) -> Server:
    """`quicknet serve` with `settings` as QUICKNET_* variables; returns once ready (or at once).
    With TLS settings, `tls` is the client context readiness is asked with."""
    http_port, grpc_port = free_port(), free_port()
    extra_env = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUICKNET_")}
    env.update(
        QUICKNET_MODEL_STORE=str(store or STORE),
        QUICKNET_HTTP_HOST="127.0.0.1",
        QUICKNET_GRPC_HOST="127.0.0.1",
        QUICKNET_HTTP_PORT=str(http_port),
        QUICKNET_GRPC_PORT=str(grpc_port),
    )
    env.update({f"QUICKNET_{k.upper()}": str(v) for k, v in settings.items()})
    env.update(extra_env)
    log_path = log_dir / f"server-{http_port}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "quicknet", "serve"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(proc, http_port, grpc_port, log_path, "https" if tls is not None else "http")
    if not wait_ready:
        return server
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1, verify=tls or True).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready after {ready_timeout}s:\n{server.log()}")


def metric(text: str, name: str, /, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name = head.split("{")[0]
        if metric_name != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


async def queued_images(client, url: str, attempts: int = 500) -> float:
    """Poll `/metrics` until the engine's queue holds images (or give up); returns how many."""
    import asyncio

    queued = 0.0
    for _ in range(attempts):
        await asyncio.sleep(0.01)
        queued = metric((await client.get(f"{url}/metrics")).text, "quicknet_queue_images")
        if queued > 0:
            break
    return queued
