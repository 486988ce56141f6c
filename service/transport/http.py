"""HTTP plumbing for every REST front: the app, one error shape, refusals as status codes,
deadlines, request bodies with limits, client disconnects, request ids, access logs and the
request-duration metric; plus the operational routes (`/healthz`, `/readyz`, `/metrics`).

A front is a module with `PROTOCOL` (its metrics tag) and `router(runtime) -> APIRouter`;
`create_app` includes the fronts it is given and tags each of their routes with the protocol.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Sequence
from types import ModuleType

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.batcher import DeadlineExceeded, EngineFailure, NotAccepting, QueueFull, Timing
from service.images import InputError
from service.runtime import ModelNotFound, RepositoryError, Runtime

access_log = logging.getLogger("quicknet.access")
log = logging.getLogger("quicknet.http")
DEFAULT_PROTOCOL = "rest"


class HTTPError(Exception):
    def __init__(self, status: int, message: str, reason: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.reason, self.headers = status, reason, headers or {}


REFUSALS = (QueueFull, DeadlineExceeded, NotAccepting, ModelNotFound, EngineFailure, RepositoryError)


def refusal_to_http(e: Exception) -> HTTPError:
    """The runtime's and batcher's refusals as HTTP answers (the gRPC twin is `transport.grpc.to_rpc_error`)."""
    if isinstance(e, QueueFull):
        return HTTPError(429, str(e), "queue_full", {"Retry-After": str(int(max(1, round(e.retry_after_s))))})
    if isinstance(e, DeadlineExceeded):
        return HTTPError(504, "deadline exceeded before the images reached the engine", "deadline")
    if isinstance(e, NotAccepting):
        return HTTPError(503, str(e), e.reason)
    if isinstance(e, ModelNotFound):
        return HTTPError(404, str(e), "not_found")
    if isinstance(e, EngineFailure):
        return HTTPError(500, f"inference failed: {e}", "engine_error")
    if isinstance(e, RepositoryError):
        return HTTPError(400, str(e), "repository")
    raise TypeError(f"not a refusal: {e!r}")


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def protocol_of(scope: Scope) -> str:
    """The protocol tag of the front whose route matched (`create_app` sets it)."""
    return getattr(scope.get("route"), "protocol", DEFAULT_PROTOCOL)


def check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body is {declared} bytes; the limit is {limit}", "too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (declared or streamed)."""
    check_declared_length(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body exceeds the limit of {limit} bytes", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(request: Request, work: Awaitable):
    """Await `work`; if the client disconnects first, cancel it so its queued images are dropped."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done and watcher.exception() is None:
            task.cancel()
            raise HTTPError(499, "client closed the request", "cancelled")
        return await task  # a watcher that failed only loses disconnect detection
    finally:
        watcher.cancel()


def deadline_from_header(request: Request, runtime: Runtime) -> float:
    raw = request.headers.get("x-request-timeout-ms")
    if raw is None:
        return runtime.deadline_from_timeout_ms(None)
    try:
        ms = float(raw)
    except ValueError:
        raise InputError(f"X-Request-Timeout-Ms must be a number of milliseconds, got {raw!r}") from None
    if not ms > 0:
        raise InputError("X-Request-Timeout-Ms must be positive")
    return runtime.deadline_from_timeout_ms(ms)


def server_timing(decode_s: float, timing: Timing) -> str:
    return ", ".join(
        f"{name};dur={seconds * 1000:.2f}"
        for name, seconds in (("decode", decode_s), ("queue", timing.queue_s), ("infer", timing.infer_s))
    )


_INTERNAL_ERROR = json.dumps({"error": "internal error; the server log has the details"}).encode()


class AccessMiddleware:
    """Request id, request-duration metric and access log, and the last line of defence: an
    exception no handler took becomes a one-line JSON 500 here, so the connection stays usable
    (Starlette's own error middleware re-raises to the server, which then drops the connection).
    Pure ASGI: Starlette's BaseHTTPMiddleware costs ~10% of REST throughput in task groups."""

    def __init__(self, app: ASGIApp, log_requests: bool = True):
        self.app = app
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        request_id = incoming.decode("latin-1")[:128] or os.urandom(16).hex()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"], extra={"request_id": request_id})
            if started:
                raise
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(_INTERNAL_ERROR)),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _INTERNAL_ERROR})
        finally:
            elapsed = time.perf_counter() - start
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            metrics.request_done(protocol_of(scope), endpoint, str(status), elapsed)
            if self.log_requests:
                access_log.info(
                    "%s %s %d %.1fms",
                    scope["method"],
                    scope["path"],
                    status,
                    elapsed * 1000,
                    extra={"request_id": request_id, "status": status, "duration_ms": round(elapsed * 1000, 2)},
                )


def _install_error_handlers(app: FastAPI) -> None:
    def rejected(request: Request, reason: str) -> None:
        metrics.rejected(protocol_of(request.scope), reason)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        rejected(request, e.reason)
        return error_response(e.status, str(e), e.headers)

    async def _refusal(request: Request, e: Exception) -> JSONResponse:
        return await _http_error(request, refusal_to_http(e))

    for refusal in REFUSALS:
        app.add_exception_handler(refusal, _refusal)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, e: InputError) -> JSONResponse:
        rejected(request, e.reason)
        return error_response(e.status, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _framework_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Unknown paths, wrong methods, malformed multipart: the same one-line error shape."""
        if e.status_code < 500:
            rejected(request, "bad_request")
        return error_response(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        rejected(request, "bad_input")
        return error_response(400, f"{where}: {first.get('msg', 'invalid')}")


def _ops_routes(app: FastAPI, runtime: Runtime, metrics_text) -> None:
    @app.get("/healthz", summary="Liveness: the process is up", tags=["operations"])
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness: model loaded, warmed up, not draining", tags=["operations"])
    async def readyz() -> JSONResponse:
        if runtime.accepting:
            return JSONResponse({"status": "ready"})
        return error_response(503, "draining" if runtime.draining else "not ready: loading or warming up")

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse, tags=["operations"])
    async def prometheus() -> Response:
        body, content_type = metrics_text()
        return Response(body, media_type=content_type)


class _DirectRoute(Route):
    """A plain Starlette route that records itself in the scope (FastAPI's router does not for
    routes that are not its own), so metrics and logs name its endpoint and protocol."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self
        await super().handle(scope, receive, send)


def fast_path(endpoint):
    """Mark a hot `endpoint(request) -> Response`: Starlette serves it directly, skipping FastAPI's
    per-request dependency machinery (+10% requests/s at 1 image per request here); its FastAPI
    route stays, for the OpenAPI schema only."""
    endpoint.fast_path = True
    return endpoint


def create_app(runtime: Runtime, fronts: Sequence[ModuleType]) -> FastAPI:
    """The REST app: operational routes, then each front's router, its routes tagged with its protocol."""
    app = FastAPI(
        title="QuickNet Serving",
        version="0.1.0",
        description="CIFAR-10 image classification. Our own API (`/classify`) and the Open Inference Protocol (`/v2`).",
        # FastAPI's native OpenTelemetry asks the global providers (and the environment) on every
        # request even when nothing is configured: ~10% of the loop's time at 1 image per request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.add_middleware(AccessMiddleware, log_requests=runtime.settings.access_log)
    _install_error_handlers(app)
    _ops_routes(app, runtime, metrics.exposition)
    fast: list[_DirectRoute] = []
    for front in fronts:
        api = front.router(runtime)
        for route in api.routes:
            route.protocol = front.PROTOCOL  # type: ignore[attr-defined]
            if isinstance(route, APIRoute) and getattr(route.endpoint, "fast_path", False):
                direct = _DirectRoute(route.path, route.endpoint, methods=sorted(route.methods), name=route.name)
                direct.protocol = front.PROTOCOL  # type: ignore[attr-defined]
                fast.append(direct)
        app.include_router(api)
    app.router.routes[0:0] = fast  # matched first: the same path's APIRoute only documents it
    return app
