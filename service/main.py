"""One process, one event loop: REST (uvicorn) and gRPC (grpc.aio) over one runtime.

Start-up: both ports open at once (liveness answers during warm-up), readiness turns true only
after the engine has run every batch bucket. SIGTERM/SIGINT: readiness goes false (REST 503,
gRPC health NOT_SERVING), new work is refused, queued and in-flight work finishes within
`drain_seconds`, then both servers close and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from collections.abc import Generator

import uvicorn

from quicknet.errors import QuickNetError
from service.backends import BackendError
from service.config import Settings
from service.gpu import sample_forever
from service.grpc_server import create_server, set_health
from service.kserve import grpc as kserve_grpc
from service.kserve import rest as kserve_rest
from service.rest import create_app
from service.runtime import Runtime

log = logging.getLogger("quicknet.service")


class JsonFormatter(logging.Formatter):
    FIELDS = ("request_id", "status", "duration_ms")

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        return json.dumps(doc)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(JsonFormatter() if settings.log_json else logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: shutdown is ours to order (drain first)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    """Bind the REST socket ourselves, so a busy port is one clear line rather than uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise QuickNetError(
            f"cannot listen on {host}:{port} for REST ({e.strerror}); pick another --http-port"
        ) from None
    sock.set_inheritable(True)
    return sock


async def serve(settings: Settings) -> int:
    runtime = Runtime(settings)
    http_socket = _bind(settings.http_host, settings.http_port)
    grpc_server, health_servicer = create_server(runtime, lambda server: kserve_grpc.add_service(server, runtime))
    try:
        grpc_port = grpc_server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    except RuntimeError:
        http_socket.close()
        raise QuickNetError(
            f"cannot listen on {settings.grpc_host}:{settings.grpc_port} for gRPC (in use?); pick another --grpc-port"
        ) from None
    app = create_app(runtime, lambda app: kserve_rest.add_routes(app, runtime))
    http = _HttpServer(
        uvicorn.Config(
            app,
            host=settings.http_host,
            port=settings.http_port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=max(1, int(settings.drain_seconds)),
        )
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runtime.on_ready_change(lambda ready: loop.create_task(set_health(health_servicer, ready)))

    await grpc_server.start()
    await set_health(health_servicer, False)
    http_task = asyncio.create_task(http.serve(sockets=[http_socket]))
    log.info(
        "REST on http://%s:%d, gRPC on %s:%d", settings.http_host, settings.http_port, settings.grpc_host, grpc_port
    )
    gpu_sampler = asyncio.create_task(sample_forever())
    load_task = asyncio.create_task(runtime.load())
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({load_task, stop_task, http_task}, return_when=asyncio.FIRST_COMPLETED)

    code = 0
    if load_task.done() and load_task.exception() is not None:
        e = load_task.exception()
        if isinstance(e, (QuickNetError, BackendError)):
            log.error("cannot serve: %s", e)
        else:
            log.error("cannot serve", exc_info=e)
        code = 1
    elif http_task.done():
        log.error("the REST server stopped: %s", http_task.exception() or "port in use?")
        code = 1
    else:
        await stop_task
        log.info("shutting down: draining queued and in-flight work (up to %.0fs)", settings.drain_seconds)
    load_task.cancel()
    gpu_sampler.cancel()
    finished = await runtime.drain()
    if not finished:
        log.warning("drain period ended with work still queued; it is answered 503")
    http.should_exit = True
    await asyncio.gather(http_task, return_exceptions=True)
    await grpc_server.stop(grace=min(5.0, settings.drain_seconds))
    await runtime.close()
    log.info("stopped")
    return code


def run(settings: Settings) -> int:
    configure_logging(settings)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))
