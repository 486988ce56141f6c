"""What wraps every REST request, as pure ASGI middleware (Starlette's BaseHTTPMiddleware costs ~10%
of REST throughput): the request id, the request-duration metric and the access log, the body's
deadline, the last line of defence against an unhandled error (`AccessMiddleware`), and API keys
(`AuthMiddleware`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quicknet.serve import metrics, tracing
from quicknet.serve.auth import ApiKeys
from quicknet.serve.errors import API_KEY_MISSING
from quicknet.serve.transport import access
from quicknet.serve.transport import request_id as new_request_id
from quicknet.serve.transport.connections import CONNECTION, ConnectionState
from quicknet.serve.transport.http import HTTPError, header, protocol_of

access_log = logging.getLogger("quicknet.access")
log = logging.getLogger("quicknet.http")


_INTERNAL_ERROR = json.dumps({"error": "internal error; the server log has the details"}).encode()


async def send_json(send: Send, status: int, body: bytes, headers: list | None = None) -> None:
    """A whole JSON answer from the middleware, where no framework response exists."""
    head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *(headers or ())]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


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


# Probes and scrapes: every few seconds from the orchestrator and Prometheus. Their answers are
# logged only when they fail (a 503 is when an operator reads the log), as gRPC's health methods
# are never logged, and never traced (app.py); their metrics still count every one.
PROBES = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})


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
            await send_json(send_with_id, 500, _INTERNAL_ERROR)
        finally:
            elapsed = time.perf_counter() - start
            endpoint = getattr(scope.get("route"), "path", None) or (
                scope["path"] if scope["path"] in self.paths and scope["method"] in ("GET", "HEAD") else "unmatched"
            )
            metrics.request_done(protocol_of(scope), endpoint, str(status), elapsed)
            if record is not None:
                access.end(token)
                if status >= 400 or scope["path"] not in PROBES:
                    tail = access.fields(record, access.rest_client(scope), status >= 400)
                    access_log.info(
                        "%s %s %d %.1fms %s",
                        scope["method"],
                        scope["path"],
                        status,
                        elapsed * 1000,
                        access.describe(tail),
                        extra={
                            "request_id": request_id,
                            "status": status,
                            "duration_ms": round(elapsed * 1000, 2),
                            **tail,
                        },
                    )


_UNAUTHENTICATED = json.dumps({"error": API_KEY_MISSING}).encode()


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
        await send_json(send, 401, _UNAUTHENTICATED, [(b"www-authenticate", b'Bearer realm="quicknet"')])
