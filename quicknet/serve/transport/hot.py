"""The hot path: the REST routes that carry inference, served through only the layers they need.

FastAPI wraps every request in ten ASGI layers before a handler runs (its error, telemetry,
body-limit, exception and exit-stack middleware, the router trying each route, the route's
request/response wrappers), and each answer passes back through their `send` wrappers: ~0.05 ms
of the event loop's ~0.74 ms a request for a 32x32 PNG at one request at a time on 2 cores (0.74
-> 0.69 ms skipping them, A/B in one session; benchmarks/README.md). The routes marked
`fast_path` (`/classify`, `/predictions/...`, KServe's `/v2/models/.../infer`) skip them:

    HotPath -> our middleware (access log and metrics, CORS, API keys: the same classes, built
               from the same list as the app's) -> `HotEndpoint` -> the handler

and answer errors with the app's own exception handlers, so a client cannot tell which way a
request went. Everything else goes to the FastAPI app unchanged: other routes, other methods, and
traced requests (with tracing on, FastAPI names a request's span in its router; the span costs
more than the layers). FastAPI still documents every route.
`App.build_middleware_stack` installs it, so a test client and the server take the same path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send


class HotEndpoint:
    """Call a fast-path handler with a `Request`; an exception the app has a handler for becomes
    that handler's answer, looked up as Starlette's `ExceptionMiddleware` does (an HTTPException's
    status code first, then the exception's classes; a sync handler in the thread pool); any other
    goes up to `AccessMiddleware`, which answers 500."""

    def __init__(self, handlers: dict):
        self.by_class = {k: v for k, v in handlers.items() if isinstance(k, type) and k is not Exception}
        self.by_status = {k: v for k, v in handlers.items() if isinstance(k, int) and k != 500}

    def handler_for(self, exc: Exception) -> Callable | None:
        if isinstance(exc, HTTPException) and exc.status_code in self.by_status:
            return self.by_status[exc.status_code]
        for cls in type(exc).__mro__:
            if cls in self.by_class:
                return self.by_class[cls]
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await scope["endpoint"](request)
        except Exception as exc:
            handler = self.handler_for(exc)
            if handler is None:
                raise
            if inspect.iscoroutinefunction(handler):
                response = await handler(request, exc)
            else:
                response = await run_in_threadpool(handler, request, exc)
        await response(scope, receive, send)


class HotPath:
    """The outermost layer of the app's stack: a POST to a fast route goes the short way."""

    def __init__(self, app: ASGIApp, short: ASGIApp, routes: Sequence[Route]):
        self.app = app
        self.short = short
        # a fixed path is a dict lookup (Starlette's `matches` is a regex and a scope dict: ~20 us)
        self.fixed = {r.path: r for r in routes if "{" not in r.path and "POST" in (r.methods or ())}
        self.routes = tuple(r for r in routes if r.path not in self.fixed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # a traced request goes the full way: FastAPI names its server span in the router
        if scope["type"] == "http" and scope["method"] == "POST" and "fastapi.telemetry" not in scope:
            route = self.fixed.get(scope["path"]) if not scope.get("root_path") else None
            if route is not None:
                scope["endpoint"], scope["path_params"], scope["route"] = route.endpoint, {}, route
                await self.short(scope, receive, send)
                return
            for route in self.routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child)  # endpoint, path_params
                    scope["route"] = route  # metrics and the access log name it
                    await self.short(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class App(FastAPI):
    """FastAPI, with `HotPath` in front of its middleware stack for the routes in `hot_routes`."""

    hot_routes: Sequence[Route] = ()

    def build_middleware_stack(self) -> ASGIApp:
        full = super().build_middleware_stack()
        if not self.hot_routes:
            return full
        short: ASGIApp = HotEndpoint(self.exception_handlers)
        for cls, args, kwargs in reversed(self.user_middleware):
            short = cls(short, *args, **kwargs)
        return HotPath(full, short, self.hot_routes)
