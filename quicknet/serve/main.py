"""The server's processes.

`--workers 1`: one process, one event loop: REST (uvicorn) and gRPC (grpc.aio) over one runtime,
the engines and their batchers in the same process (`sources.local.LocalSource`).

`--workers N` (N > 1): a supervisor (`quicknet.serve.supervisor`) starts one engine process
(`serve_engine`: every model's engine and batcher) and N front processes (`serve` with an
`EngineClient` as the model source), each serving REST and gRPC on the same ports (SO_REUSEPORT).

Start-up: the ports open at once (liveness answers during warm-up); readiness turns true only
after the engine has run every batch bucket. SIGTERM (or SIGINT): readiness goes false (REST 503,
gRPC health NOT_SERVING), new work is refused, accepted work finishes within `drain_seconds`,
then the servers close and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Generator

import grpc
import uvicorn

from quicknet.errors import QuickNetError
from quicknet.serve import metrics, ports, tracing, web
from quicknet.serve.classifier import grpc as classifier_grpc
from quicknet.serve.classifier import rest as classifier_rest
from quicknet.serve.config import Settings
from quicknet.serve.engine import Engine
from quicknet.serve.gpu import sample_forever
from quicknet.serve.kserve import grpc as kserve_grpc
from quicknet.serve.kserve import rest as kserve_rest
from quicknet.serve.logs import configure_logging
from quicknet.serve.runtime import ModelSource, Runtime
from quicknet.serve.sources.local import LocalSource
from quicknet.serve.transport import grpc as grpc_transport
from quicknet.serve.transport.app import create_app
from quicknet.serve.transport.connections import protocol_for

log = logging.getLogger("quicknet.service")

# The fronts, explicitly: each declares its own routes or servicers and its protocol tag.
REST_FRONTS = (classifier_rest, kserve_rest, web)  # web: the page at / and the API docs
GRPC_FRONTS = (classifier_grpc, kserve_grpc)


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: shutdown is ours to order (drain first)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """Bind the REST socket ourselves, so a busy port is one clear line rather than uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ports.taken(host, port, "REST", "http_port", e.strerror) from None
    sock.set_inheritable(True)
    return sock


def _tls_options(settings: Settings) -> dict:
    if not settings.tls:
        return {}
    options = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    if settings.tls_client_ca is not None:
        options |= {"ssl_ca_certs": str(settings.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def _cannot_serve(e: BaseException) -> None:
    """A failed start: one line for what a user can fix, the traceback for anything else."""
    if isinstance(e, QuickNetError):
        log.error("cannot serve: %s", e)
    else:
        log.error("cannot serve", exc_info=e)


def _watch_parent(stop: asyncio.Event) -> asyncio.Task | None:
    """A child process stops (gracefully) when its supervisor is gone, instead of lingering."""
    parent = os.getppid()
    if os.environ.get("QUICKNET_SUPERVISED") != "1":
        return None

    async def watch() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        log.warning("supervisor is gone; stopping")
        stop.set()

    return asyncio.create_task(watch())


CLOSE_LINGER_S = 1.0


async def _let_clients_leave(http: uvicorn.Server, seconds: float) -> None:
    """Draining, every REST answer says `Connection: close`. Stop accepting connections, then give
    clients still holding kept-alive ones up to `seconds` to hear that and hang up, before uvicorn
    closes what is left. Otherwise a client that sends its next request just as the server closes
    an idle connection loses it (a read error, though the server never read the request); a new
    connection is refused outright, which a client knows it can retry. Ends when none is open."""
    for listener in http.servers:
        listener.close()
    deadline = time.monotonic() + seconds
    while http.server_state.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def _stop_event(*, ignore_sigint: bool = False) -> asyncio.Event:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if ignore_sigint:  # a terminal's Ctrl-C reaches every process; only the supervisor orders the shutdown
        loop.add_signal_handler(signal.SIGINT, lambda: None)
    else:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    return stop


_DEVICES = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}


def ready_line(settings: Settings, grpc_port: int, runtime: Runtime) -> str:
    """What a person reads when the service is up: where the page, the API docs and gRPC are, and
    what answers `/classify`: `ready: http://localhost:8000/ (web), /docs (API), gRPC :8001, model
    quicknet v1 (onnxruntime, cpu, int8)`. The engines' full descriptions are the lines above it."""
    host = settings.http_host
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"  # every interface: this machine's own name for it opens in a browser here
    elif ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.tls else "http"

    def engine(handle) -> str:
        d = handle.info.description
        device = d.get("device") or _DEVICES.get(d.get("provider", ""), d.get("provider"))
        parts = [str(p) for p in (d.get("backend"), device, d.get("precision")) if p]
        return f"{handle.name} v{handle.version}" + (f" ({', '.join(parts)})" if parts else "")

    default = runtime.default
    line = f"ready: {scheme}://{host}:{settings.http_port}/ (web), /docs (API), gRPC :{grpc_port}"
    if default is not None:
        line += f", model {engine(default)}"
        others = [engine(m) for m in runtime.all_models() if m is not default]
        if others:
            line += "; also " + ", ".join(others)
    return line


def _grpc_server(runtime: Runtime) -> tuple[grpc.aio.Server, grpc_transport.Health, int]:
    """The gRPC fronts' server, bound to its port (TLS where set); a port in use is one line."""
    settings = runtime.settings
    server, health = grpc_transport.create_server(runtime, GRPC_FRONTS)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    credentials = grpc_transport.credentials(settings)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        raise ports.taken(settings.grpc_host, settings.grpc_port, "gRPC", "grpc_port", "in use?") from None
    return server, health, port


def _http_server(runtime: Runtime) -> _HttpServer:
    """uvicorn over the REST fronts' app, with our HTTP protocol's limits and timeouts."""
    settings = runtime.settings
    config = uvicorn.Config(
        create_app(runtime, REST_FRONTS),
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=max(1, int(settings.drain_seconds)),
        timeout_keep_alive=settings.http_idle_timeout_s,
        http=protocol_for(
            settings.header_timeout_s,
            settings.http_idle_timeout_s,
            settings.body_read_timeout_s,
            settings.max_header_bytes,
        ),
        **_tls_options(settings),
    )
    return _HttpServer(config)


async def serve(settings: Settings, make_source: Callable[[Runtime], ModelSource], *, supervised: bool = False) -> int:
    """REST + gRPC over one runtime, its models from `make_source` (this process, or the engine process)."""
    tracing.configure(settings)  # before the servers are built: they wrap their handlers if it is on
    runtime = Runtime(settings)
    source = make_source(runtime)
    if not supervised:  # the supervisor checked them for its fronts; gRPC's own failure logs a line first
        ports.free_ports(settings)
    http_socket = bind(settings.http_host, settings.http_port, reuse_port=supervised)
    try:
        grpc_server, health, grpc_port = _grpc_server(runtime)
    except BaseException:
        http_socket.close()
        raise
    http = _http_server(runtime)
    loop = asyncio.get_running_loop()
    stop = _stop_event(ignore_sigint=supervised)
    parent_watch = _watch_parent(stop)
    runtime.on_ready_change(lambda ready: loop.create_task(health.set(ready)))
    if not supervised or multiprocessing.current_process().name == "front-0":  # one line per service
        announced: list[bool] = []

        def announce(ready: bool) -> None:
            if ready and not announced:
                announced.append(True)
                log.info("%s", ready_line(settings, grpc_port, runtime))

        runtime.on_ready_change(announce)

    await grpc_server.start()
    await health.set(False)
    http_task = asyncio.create_task(http.serve(sockets=[http_socket]))
    log.info(
        "REST on %s://%s:%d, gRPC on %s:%d%s%s",
        "https" if settings.tls else "http",
        settings.http_host,
        settings.http_port,
        settings.grpc_host,
        grpc_port,
        " (TLS, client certificates required)" if settings.tls_client_ca else " (TLS)" if settings.tls else "",
        ", API keys required" if settings.api_keys_file else "",
    )
    gpu_sampler = None if supervised else asyncio.create_task(sample_forever())
    source_task = asyncio.create_task(source.run())
    stop_task = asyncio.create_task(stop.wait())

    code = 0
    waiting = {source_task, stop_task, http_task}
    while True:
        done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if source_task in done and source_task.exception() is not None:
            _cannot_serve(source_task.exception())
            code = 2
            break
        if http_task in done:
            log.error("the REST server stopped: %s", http_task.exception() or "port in use?")
            code = 1
            break
        if stop_task in done:
            log.info("shutting down: draining queued and in-flight work (up to %.0fs)", settings.drain_seconds)
            break
    runtime.start_draining()
    for task in (gpu_sampler, parent_watch):
        if task is not None:
            task.cancel()
    if code == 0 and not await source.drain(settings.drain_seconds):
        log.warning("drain period ended with work still queued; it is answered 503")
    if code == 0:
        await _let_clients_leave(http, min(CLOSE_LINGER_S, settings.drain_seconds))
    source_task.cancel()
    await asyncio.gather(source_task, return_exceptions=True)
    await source.close()  # anything still waiting is answered 503 now, before the servers stop
    http.should_exit = True
    await asyncio.gather(http_task, return_exceptions=True)
    await grpc_server.stop(grace=min(5.0, settings.drain_seconds))
    tracing.shutdown()
    log.info("stopped")
    return code


async def serve_engine(settings: Settings, path: str) -> int:
    """The engine process: every model's engine and batcher, fed by the fronts over `path`."""
    from quicknet.serve.engine_core import EngineCore
    from quicknet.serve.engine_server import EngineServer

    stop = _stop_event(ignore_sigint=True)
    parent_watch = _watch_parent(stop)
    core = EngineCore()
    engine = Engine(settings, core)
    server = EngineServer(path, engine, core)
    await server.start()
    gpu_sampler = asyncio.create_task(sample_forever())
    load_task = asyncio.create_task(engine.load())
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if load_task.done() and load_task.exception() is not None:
        _cannot_serve(load_task.exception())
        code = 2
    elif load_task.done():
        engine.on_change(server.publish)
        server.publish()
        metrics.READY.set(1)  # with the fronts' own, `quicknet_ready` (min over processes) is 1 when all are
        log.info("engine ready: %d model version(s) (pid %d)", len(engine.models), os.getpid())
        jobs = [asyncio.create_task(engine.watch(server.set_stalled)), asyncio.create_task(core.report_depth())]
        if settings.model_control_mode == "poll":
            jobs.append(asyncio.create_task(engine.poll_forever()))
        await stop_task
        for job in jobs:
            job.cancel()
    load_task.cancel()
    metrics.READY.set(0)
    server.stop_accepting()
    await engine.drain(settings.drain_seconds)
    for task in (gpu_sampler, parent_watch, stop_task):
        if task is not None:
            task.cancel()
    await server.close()
    await engine.close()
    log.info("engine stopped")
    return code


def _run_loop(main) -> int:
    try:
        import uvloop
    except ImportError:
        code = asyncio.run(main)
    else:
        code = uvloop.run(main)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopped: a second SIGTERM must not turn exit 0 into -15
    return code


def raise_open_files_limit() -> None:
    """Every connection is a file descriptor; a 1024 soft limit (common in containers) would refuse
    the 1,001st idle keep-alive client. Raise the soft limit to the hard one (no privilege needed)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run(settings: Settings) -> int:
    configure_logging(settings)
    raise_open_files_limit()  # children (--workers) inherit it
    for doubt in settings.doubts():
        log.warning("%s", doubt)
    Engine(settings).plan()  # a wrong model, version or store fails here, before any port or engine
    if settings.front_workers > 1:
        from quicknet.serve.supervisor import supervise

        return supervise(settings, run_engine, run_front)
    return _run_loop(serve(settings, lambda runtime: LocalSource(settings, runtime)))


def run_front(settings: Settings, engine_path: str) -> int:
    """A front process's entry (the supervisor starts it)."""
    from quicknet.serve.sources.remote import EngineClient

    configure_logging(settings)
    # as many images as this front may have waiting or running: the engine's queue (capped: with 16
    # fronts, each ring is memory of its own) plus a full batch per engine instance
    ring_images = min(settings.max_queue_images, 8192) + settings.max_batch_size * settings.instances
    return _run_loop(serve(settings, lambda rt: EngineClient(engine_path, rt, ring_images), supervised=True))


def run_engine(settings: Settings, engine_path: str) -> int:
    """The engine process's entry (the supervisor starts it)."""
    configure_logging(settings)
    return _run_loop(serve_engine(settings, engine_path))
