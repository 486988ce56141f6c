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
import math
import time
from collections.abc import Coroutine, Sequence
from types import ModuleType

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quicknet.serve import metrics, tracing
from quicknet.serve.auth import ApiKeys
from quicknet.serve.batcher import Timing
from quicknet.serve.errors import InputError, Refusal, clip
from quicknet.serve.runtime import Runtime
from quicknet.serve.transport import access
from quicknet.serve.transport import request_id as new_request_id
from quicknet.serve.transport.connections import CONNECTION, ConnectionState
from quicknet.serve.transport.hot import App
from quicknet.serve.transport.schemas import ERRORS, TAGS, ErrorBody, Liveness, Readiness, answers

access_log = logging.getLogger("quicknet.access")
log = logging.getLogger("quicknet.http")
DEFAULT_PROTOCOL = "rest"


class HTTPError(Exception):
    def __init__(self, status: int, message: str, reason: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.reason, self.headers = status, reason, headers or {}


def refusal_to_http(e: Refusal) -> HTTPError:
    """A refusal as its HTTP answer: status, message, reason and headers come from its kind (`errors`)."""
    return HTTPError(e.http_status, e.http_message(), e.reason, e.headers())


MAX_ERROR_CHARS = 1000


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The one error shape; whatever a message echoes of the request, at most 1,000 characters."""
    access.note(reason=message)  # the access log's `reason`
    return JSONResponse({"error": clip(message, MAX_ERROR_CHARS)}, status_code=status, headers=headers)


def protocol_of(scope: Scope) -> str:
    """The protocol tag of the front whose route matched (`create_app` sets it)."""
    return getattr(scope.get("route"), "protocol", DEFAULT_PROTOCOL)


def header(scope: Scope, name: bytes) -> str | None:
    """One request header's value (`name` in lower case, as ASGI gives them), read from the scope's
    raw list: Starlette's `request.headers` builds a Headers object and looks a missing name up by
    raising KeyError, ~1.5 us of a front's ~200 us a request for each header the hot path asks."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def check_declared_length(request: Request, limit: int) -> None:
    declared = header(request.scope, b"content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
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


def _client_left() -> HTTPError:
    return HTTPError(499, "client closed the request", "cancelled")


async def run_unless_disconnected(request: Request, work: Coroutine):
    """Await `work`; if the client disconnects first, cancel it so its queued images are dropped
    (499). On our REST protocol the connection itself cancels this task when it is lost
    (`connections.ConnectionState`): no task of the request's own. Elsewhere (a test client,
    another server) one watcher task waits for the disconnect message."""
    task = asyncio.current_task()
    connection: ConnectionState | None = request.scope.get(CONNECTION)
    gone = finished = False
    if connection is not None:
        if connection.lost:
            work.close()
            raise _client_left()
        connection.watch(task)
    else:

        def on_watched(watcher: asyncio.Task) -> None:
            nonlocal gone
            # not after `work` is done (the handler is sending its answer); a watcher that failed
            # only loses disconnect detection
            if not finished and not watcher.cancelled() and watcher.exception() is None:
                gone = True
                task.cancel()

        watcher = asyncio.ensure_future(until_disconnected(request))
        watcher.add_done_callback(on_watched)
    try:
        return await work
    except asyncio.CancelledError:
        left = connection.lost if connection is not None else gone
        if left and task.uncancel() == 0:  # that cancel alone, not a shutdown's: the client left
            raise _client_left() from None
        raise
    finally:
        finished = True
        if connection is not None:
            connection.watch(None)
        else:
            watcher.cancel()


MAX_TIMEOUT_MS = 86_400_000.0  # a day: longer asks are clamped (timers take no infinities)


def deadline_from_header(request: Request, runtime: Runtime) -> float:
    raw = header(request.scope, b"x-request-timeout-ms")
    if raw is None:
        return runtime.deadline_from_timeout_ms(None)
    try:
        ms = float(raw)
    except ValueError:
        raise InputError(f"X-Request-Timeout-Ms must be a number of milliseconds, got {raw[:40]!r}") from None
    if not (ms > 0 and math.isfinite(ms)):
        raise InputError("X-Request-Timeout-Ms must be a positive, finite number of milliseconds")
    return runtime.deadline_from_timeout_ms(min(ms, MAX_TIMEOUT_MS))


def server_timing(decode_s: float, timing: Timing) -> str:
    return ", ".join(
        f"{name};dur={seconds * 1000:.2f}"
        for name, seconds in (("decode", decode_s), ("queue", timing.queue_s), ("infer", timing.infer_s))
    )


_INTERNAL_ERROR = json.dumps({"error": "internal error; the server log has the details"}).encode()


class BodyTimeout(HTTPError):
    def __init__(self, seconds: float):
        super().__init__(408, f"request body not received within {seconds:g}s", "slow_client", {"Connection": "close"})


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value != b"0"
        if name == b"transfer-encoding":
            return True
    return False


def parse_json(body: bytes, what: str, max_values: int | None = None) -> object:
    """`body` as JSON, or a one-line 400 naming `what`: malformed, or nested past the parser's
    recursion limit (a few KB of `[`, which json raises as RecursionError, not ValueError).
    `max_values`: a document of more values (counted as commas, at C speed) than any request the
    limits allow is refused 413 before it is parsed: parsing runs on the event loop and holds the
    GIL, and 12 MB of `0,` took ~0.5 s there."""
    if max_values is not None and (values := body.count(b",")) >= max_values:
        raise InputError(
            f"{what} holds more than {values} values; the limits allow at most {max_values}", 413, "too_large"
        )
    try:
        return json.loads(body)
    except ValueError as e:
        raise InputError(f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise InputError(f"{what} is nested too deeply") from None


def body_deadline(receive: Receive, seconds: float, connection: ConnectionState | None = None) -> Receive:
    """`receive`, with the whole body due `seconds` after the request head: a client that uploads
    at a byte a second is answered 408 (and the connection closed) instead of holding a handler.
    After the body, messages (the disconnect) pass through unlimited; so does a body already
    received whole when it is read (the connection says so: no timer for it)."""
    due = asyncio.get_running_loop().time() + seconds
    body_done = False

    async def timed() -> Message:
        nonlocal body_done
        if body_done or (connection is not None and not connection.body_pending):
            return await receive()
        try:
            async with asyncio.timeout_at(due):
                message = await receive()
        except TimeoutError:
            raise BodyTimeout(seconds) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            body_done = True
        return message

    return timed


class AccessMiddleware:
    """Request id, request-duration metric and access log, the body's deadline, and the last line
    of defence: an exception no handler took becomes a one-line JSON 500 here, so the connection
    stays usable (Starlette's own error middleware re-raises to the server, which then drops the
    connection). Pure ASGI: Starlette's BaseHTTPMiddleware costs ~10% of REST throughput."""

    def __init__(
        self,
        app: ASGIApp,
        log_requests: bool = True,
        body_timeout_s: float = 30.0,
        closing=lambda: False,
        paths: frozenset[str] = frozenset(),
    ):
        self.app = app
        self.paths = paths  # fixed paths of routes that leave no `route` in the scope (FastAPI's /openapi.json)
        self.log_requests = log_requests
        self.body_timeout_s = body_timeout_s
        self.closing = closing  # while draining, answers say `Connection: close`

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _has_body(scope):
            receive = body_deadline(receive, self.body_timeout_s, scope.get(CONNECTION))
        start = time.perf_counter()
        request_id = new_request_id(header(scope, b"x-request-id") or "")
        tracing.set_request_id(request_id)
        record, token = access.begin() if self.log_requests else (None, None)
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                extra = [(b"x-request-id", request_id.encode("latin-1"))]
                if self.closing():  # the client reconnects elsewhere rather than race our socket's close
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", []), *extra]
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
            endpoint = getattr(scope.get("route"), "path", None) or (
                scope["path"] if scope["path"] in self.paths and scope["method"] in ("GET", "HEAD") else "unmatched"
            )
            metrics.request_done(protocol_of(scope), endpoint, str(status), elapsed)
            if record is not None:
                access.end(token)
                tail = access.fields(record, access.rest_client(scope), status >= 400)
                access_log.info(
                    "%s %s %d %.1fms %s",
                    scope["method"],
                    scope["path"],
                    status,
                    elapsed * 1000,
                    access.describe(tail),
                    extra={"request_id": request_id, "status": status, "duration_ms": round(elapsed * 1000, 2), **tail},
                )


def public(endpoint):
    """Mark a health endpoint that answers without an API key (when `open_health_endpoints`)."""
    endpoint.public = True
    return endpoint


def open_path(endpoint):
    """Mark an endpoint that answers without an API key whatever the settings: a page or asset
    that holds no data and that a browser loads before it has a key to send (quicknet/serve/web)."""
    endpoint.open_path = True
    return endpoint


_UNAUTHENTICATED = json.dumps({"error": "missing or invalid API key (send Authorization: Bearer <key>)"}).encode()


class AuthMiddleware:
    """API keys on every route but the open ones (`public` health endpoints, the API docs): 401 with
    `WWW-Authenticate: Bearer` before any body is read. Pure ASGI, like `AccessMiddleware`."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, open_paths: frozenset[str], routes: list):
        self.app = app
        self.keys = keys
        self.open_paths = open_paths
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        authorization = header(scope, b"authorization") or ""
        if self.keys.allows(authorization):
            await self.app(scope, receive, send)
            return
        # refused: name the route it was for (metrics, access log) — routing twice only on this path
        route = next((r for r in self.routes if r.matches(scope)[0] is Match.FULL), None)
        if route is not None:
            scope["route"] = route
        metrics.rejected(protocol_of(scope), "unauthenticated")
        access.note(reason="missing or invalid API key")
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(_UNAUTHENTICATED)),
                    (b"www-authenticate", b'Bearer realm="quicknet"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _UNAUTHENTICATED})


def _install_error_handlers(app: FastAPI) -> None:
    def rejected(request: Request, reason: str) -> None:
        metrics.rejected(protocol_of(request.scope), reason)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        rejected(request, e.reason)
        return error_response(e.status, str(e), e.headers)

    @app.exception_handler(Refusal)
    async def _refusal(request: Request, e: Refusal) -> JSONResponse:
        return await _http_error(request, refusal_to_http(e))

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
    @app.get(
        "/healthz",
        tags=["health"],
        summary="Liveness: the process is up and its engine not stalled",
        responses=answers(Liveness, "live", (503, "not live: the engine has stalled (the watchdog's reason)")),
    )
    @public
    async def healthz() -> JSONResponse:
        if runtime.live:
            return JSONResponse({"status": "alive"})
        return error_response(503, runtime.stalled)

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: model loaded, warmed up, not draining",
        responses=answers(Readiness, "ready", (503, "not ready: loading, warming up, or draining")),
    )
    @public
    async def readyz() -> JSONResponse:
        if runtime.accepting:
            return JSONResponse({"status": "ready"})
        return error_response(503, "draining" if runtime.draining else "not ready: loading or warming up")

    @app.get(
        "/metrics",
        tags=["server"],
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={200: {"description": "the Prometheus text exposition format"}},
    )
    @public
    async def prometheus() -> Response:
        body, content_type = metrics_text()
        return Response(body, media_type=content_type)


def fast_path(endpoint):
    """Mark a hot `endpoint(request) -> Response`: served by `transport.hot.HotPath`, past
    FastAPI's middleware, routing and per-request dependency machinery (one image per request
    here: +10% requests/s for skipping the dependency machinery; the loop's CPU a request 0.74 ->
    0.69 ms for the rest); its FastAPI route stays, for the OpenAPI schema only. Async endpoints
    only: the hot path awaits it."""
    if not asyncio.iscoroutinefunction(endpoint):
        raise TypeError(f"fast_path needs an async endpoint, got {endpoint.__qualname__}")
    endpoint.fast_path = True
    return endpoint


_KSERVE_LENGTH = "inference-header-content-length"  # KServe's binary-data extension, read and sent by /v2
# probes, scrapes and the web page's static files: noise in a trace store, no inference in them
_UNTRACED = frozenset({"/metrics", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/", "/favicon.ico"})


_UNTRACED_PREFIXES = ("/static/", "/docs", "/redoc", "/openapi.json")


def _telemetry() -> dict:
    """FastAPI's native OpenTelemetry: the server span of each request (continuing the caller's
    `traceparent`), on our provider when tracing is on (quicknet/serve/tracing.py), else off entirely: left
    to the global providers it asks them and the environment on every request, ~10% of the loop's
    time at 1 image per request. Probes and scrapes are not traced; our own `decode`, `queue` and
    `infer` spans replace FastAPI's per-operation ones."""
    provider = tracing.provider()
    if provider is None:
        return {"tracing": False, "metrics": False, "logs": False}
    return {
        "tracer_provider": provider,
        "tracing": True,
        "metrics": False,
        "logs": False,
        "operation_spans": False,
        "auto_configure": False,
        "exclude": lambda scope: scope.get("path") in _UNTRACED or scope.get("path", "").startswith(_UNTRACED_PREFIXES),
    }


def create_app(runtime: Runtime, fronts: Sequence[ModuleType]) -> FastAPI:
    """The REST app: operational routes, then each front's router, its routes marked with its protocol."""
    app = App(
        title="QuickNet Serving",
        version="0.1.0",
        description="CIFAR-10 image classification. Our own API (`/classify`) and the Open Inference Protocol "
        '(`/v2`). Every error, on every route and status, is one JSON line: `{"error": "..."}` (`ErrorBody`).',
        openapi_tags=TAGS,
        telemetry=_telemetry(),
        docs_url=None,  # the web front serves /docs and /redoc, their assets local (quicknet/serve/web)
        redoc_url=None,
    )
    _install_error_handlers(app)
    _ops_routes(app, runtime, metrics.exposition)
    routes = list(app.routes)  # flat: FastAPI keeps an included router as one lazy entry
    fast: list[Route] = []
    for front in fronts:
        api = front.router(runtime)
        for route in api.routes:
            route.protocol = front.PROTOCOL  # type: ignore[attr-defined]
            routes.append(route)
            if isinstance(route, APIRoute) and getattr(route.endpoint, "fast_path", False):
                direct = Route(route.path, route.endpoint, methods=sorted(route.methods), name=route.name)
                direct.protocol = front.PROTOCOL  # type: ignore[attr-defined]
                fast.append(direct)
        app.include_router(api)
    app.hot_routes = fast  # served by HotPath; the same path's APIRoute documents them (and serves traced requests)
    settings = runtime.settings
    unlocked: frozenset[str] | None = None  # the paths open without a key, when keys are on
    if settings.api_keys_file is not None:
        open_paths = {app.docs_url, app.openapi_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
        open_paths |= {r.path for r in routes if getattr(getattr(r, "endpoint", None), "open_path", False)}
        if settings.open_health_endpoints:
            open_paths |= {r.path for r in routes if getattr(getattr(r, "endpoint", None), "public", False)}
        keys = ApiKeys(settings.api_keys_file, settings.admin_api_keys_file)  # admin keys work everywhere
        unlocked = frozenset(open_paths - {None})
        app.add_middleware(AuthMiddleware, keys=keys, open_paths=unlocked, routes=routes)
    _finish_openapi(app, [m for front in fronts for m in getattr(front, "OPENAPI_SCHEMAS", ())], unlocked)
    if settings.cors_origins:  # outside auth: a browser's preflight carries no key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id", "x-request-timeout-ms", _KSERVE_LENGTH],
            expose_headers=["x-request-id", "retry-after", _KSERVE_LENGTH],
            max_age=600,
        )
    # outermost: sees every answer
    app.add_middleware(
        AccessMiddleware,
        log_requests=settings.access_log,
        body_timeout_s=settings.body_read_timeout_s,
        closing=lambda: runtime.draining,
        paths=frozenset(r.path for r in app.routes if isinstance(r, Route) and "{" not in r.path),
    )
    return app


_REF = "#/components/schemas/"
_UNAUTHENTICATED_DOC = {
    "description": ERRORS[401],
    "headers": {"WWW-Authenticate": {"description": 'always `Bearer realm="quicknet"`', "schema": {"type": "string"}}},
    "content": {"application/json": {"schema": {"$ref": _REF + "ErrorBody"}}},
}


def _finish_openapi(app: FastAPI, documented: Sequence[type], open_paths: frozenset[str] | None) -> None:
    """FastAPI's document, corrected once, when first asked for:
    - no 422: a request validation error is answered 400 (`_install_error_handlers`), and every
      route that can answer one documents its 400; FastAPI adds a 422 to any route with parameters;
    - the schemas of bodies the fronts document by reference (a front's `OPENAPI_SCHEMAS`: bodies
      their handlers read raw, so FastAPI never sees the models), and `ErrorBody`;
    - with API keys (`open_paths` given): every operation takes a bearer key, so /docs offers
      "Authorize", and documents its 401, except the open ones, which take none."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {})
            defined = components.setdefault("schemas", {})
            models = [(model, "validation") for model in (ErrorBody, *documented)]
            _, defs = models_json_schema(models, ref_template=_REF + "{model}")  # type: ignore[arg-type]
            for name, definition in defs.get("$defs", {}).items():
                defined.setdefault(name, definition)
            for name in ("HTTPValidationError", "ValidationError"):
                defined.pop(name, None)
            if open_paths is not None:
                components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
                schema["security"] = [{"apiKey": []}]
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    if open_paths is not None and path in open_paths:
                        operation["security"] = []
                    elif open_paths is not None:
                        responses["401"] = _UNAUTHENTICATED_DOC
                    operation["responses"] = dict(sorted(responses.items()))
        return app.openapi_schema

    app.openapi = openapi
