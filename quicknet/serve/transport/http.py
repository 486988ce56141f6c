"""What a REST front's handlers use: one error shape, refusals as status codes, request headers read
from the scope, bodies with limits, deadlines, client disconnects, JSON with limits, Server-Timing,
and the marks a front puts on an endpoint (`public`, `open_path`, `fast_path`).

The app that serves the fronts is `transport.app`; what wraps every request (request id, access
log, metrics, the body's deadline, API keys) is `transport.middleware`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Coroutine

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import Scope

from quicknet.serve.batcher import Timing
from quicknet.serve.errors import InputError, Refusal, clip
from quicknet.serve.runtime import Runtime
from quicknet.serve.transport import access
from quicknet.serve.transport.connections import CONNECTION, ConnectionState

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
        raise InputError(f"request body is {declared} bytes; the limit is {limit}", 413, "too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (declared or streamed)."""
    check_declared_length(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(f"request body exceeds the limit of {limit} bytes", 413, "too_large")
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
    except UnicodeDecodeError:  # json's words would be the codec's: say what the bytes probably are
        raise InputError(f"{what} is not valid JSON: it is not UTF-8 text (binary data, such as an image?)") from None
    except ValueError as e:
        raise InputError(f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise InputError(f"{what} is nested too deeply") from None


def public(endpoint):
    """Mark a health endpoint that answers without an API key (when `open_health_endpoints`)."""
    endpoint.public = True
    return endpoint


def open_path(endpoint):
    """Mark an endpoint that answers without an API key whatever the settings: a page or asset
    that holds no data and that a browser loads before it has a key to send (quicknet/serve/web)."""
    endpoint.open_path = True
    return endpoint


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
