"""The REST app: FastAPI with the operational routes (`/healthz`, `/readyz`, `/metrics`), the one
error shape for every exception a handler or the framework raises, each front's routes tagged with
its protocol (and its `fast_path` endpoints handed to `transport.hot`), the middleware
(`transport.middleware`), and the OpenAPI document corrected once.

A front is a module with `PROTOCOL` (its metrics tag) and `router(runtime) -> APIRouter`.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from quicknet.serve import metrics, tracing
from quicknet.serve.auth import ApiKeys
from quicknet.serve.errors import Refusal
from quicknet.serve.runtime import Runtime
from quicknet.serve.transport.base import RestFront
from quicknet.serve.transport.hot import App
from quicknet.serve.transport.http import HTTPError, error_response, protocol_of, public, refusal_to_http
from quicknet.serve.transport.middleware import PROBES, AccessMiddleware, AuthMiddleware
from quicknet.serve.transport.schemas import ERRORS, TAGS, ErrorBody, Liveness, Readiness, answers


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
        headers = getattr(e, "headers", None)
        message = str(e.detail)
        if e.status_code == 405 and headers and headers.get("Allow"):
            message = f"{request.method} is not allowed on {request.url.path}: use {headers['Allow']}"
        return error_response(e.status_code, message, headers)

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
        summary="Readiness: model loaded, warmed up, not draining, engine not stalled",
        responses=answers(Readiness, "ready", (503, "not ready: loading, warming up, draining, or the engine stalled")),
    )
    @public
    async def readyz() -> JSONResponse:
        if runtime.accepting:
            return JSONResponse({"status": "ready"})
        if runtime.draining:
            return error_response(503, "draining")
        return error_response(503, runtime.stalled or "not ready: loading or warming up")

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


_KSERVE_LENGTH = "inference-header-content-length"  # KServe's binary-data extension, read and sent by /v2
# probes, scrapes and the web page's static files: noise in a trace store, no inference in them
_UNTRACED = PROBES | {"/", "/favicon.ico"}


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


def create_app(runtime: Runtime, fronts: Sequence[RestFront]) -> FastAPI:
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
    _finish_openapi(app, [m for front in fronts for m in front.OPENAPI_SCHEMAS], unlocked)
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
