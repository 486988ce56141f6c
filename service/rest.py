"""REST front (FastAPI): `POST /classify`, health, readiness, model list, metrics.

Encoded images are decoded in worker threads (Pillow releases the GIL), never on the event loop.

`/classify` takes one of four bodies, chosen by Content-Type:
- `multipart/form-data`: a file field `image` (one result list) or repeated `images` (a list per image);
- `image/*`: the raw bytes of one image;
- `application/json`: `{"image": "<base64>"}` or `{"images": ["<base64>", ...]}`, optional `"top_k"`;
- `application/octet-stream`: raw uint8 pixels, N x 32 x 32 x 3 (HWC), a list per image.
`?top_k=` sets how many classes come back (default 5). `X-Request-Timeout-Ms` sets the deadline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.batcher import DeadlineExceeded, NotAccepting, QueueFull, Timing
from service.images import InputError, decode_image, decode_images, decode_pixels
from service.runtime import ModelNotFound, Runtime

access_log = logging.getLogger("quicknet.access")
log = logging.getLogger("quicknet.rest")
PROTOCOL = "rest"

_EXAMPLE_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
CLASSIFY_OPENAPI = {
    "parameters": [
        {"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 10}},
        {
            "name": "X-Request-Timeout-Ms",
            "in": "header",
            "required": False,
            "schema": {"type": "number"},
            "description": "deadline in milliseconds; past it the request is answered 504 and never computed",
        },
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "one image"},
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    },
                },
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}, "example": "(PNG/JPEG/WebP/BMP/GIF bytes)"},
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "byte"},
                        "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
                        "top_k": {"type": "integer", "minimum": 1, "maximum": 10},
                    },
                },
                "examples": {
                    "one": {"value": {"image": _EXAMPLE_B64, "top_k": 3}},
                    "several": {"value": {"images": [_EXAMPLE_B64, _EXAMPLE_B64]}},
                },
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "example": "(N x 3072 bytes: uint8 pixels, 32x32x3, HWC)",
            },
        },
    },
    "responses": {
        "200": {
            "description": "top-k classes per image",
            "content": {
                "application/json": {
                    "example": {
                        "model": "quicknet-xs",
                        "version": "1",
                        "predictions": [{"label": "cat", "index": 3, "score": 0.91}],
                    }
                }
            },
        },
        "400": {"description": "bad input"},
        "413": {"description": "too large: bytes, pixels or images"},
        "415": {"description": "unsupported Content-Type or image format"},
        "429": {"description": "queue full; see Retry-After"},
        "503": {"description": "not ready or shutting down"},
        "504": {"description": "deadline passed before compute"},
    },
}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, reason: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.reason, self.headers = status, reason, headers or {}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


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


def _b64(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise InputError(f"{where} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{where} is not valid base64") from None


def _parse_top_k(raw: object) -> int | None:
    if raw is None:
        return None
    try:
        k = int(raw)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise InputError(f"top_k must be an integer from 1 to 10, got {raw!r}") from None
    if not 1 <= k <= 10:
        raise InputError(f"top_k must be from 1 to 10, got {k}")
    return k


async def parse_classify(request: Request, runtime: Runtime) -> tuple[np.ndarray, bool, int | None]:
    """Returns (uint8 NHWC images, whether the answer is a list per image, top_k from the body)."""
    limits = runtime.limits
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        check_declared_length(request, runtime.settings.max_request_bytes)
        form = await request.form(max_files=limits.max_images + 1, max_fields=16)
        single = form.getlist("image")
        several = form.getlist("images")
        uploads = single or several
        if not uploads:
            raise InputError("multipart body has no `image` or `images` file field")
        blobs = [await u.read() if hasattr(u, "read") else str(u).encode() for u in uploads]
        top = _parse_top_k(form.get("top_k"))
        images = await asyncio.to_thread(decode_images, blobs, limits)
        return images, not (single and len(single) == 1 and not several), top
    body = await read_body(request, runtime.settings.max_request_bytes)
    if not body:
        raise InputError("empty request body: send an image, JSON, multipart or raw pixels")
    if ctype.startswith("image/"):
        return (await asyncio.to_thread(decode_image, body, limits))[None], False, None
    if ctype == "application/octet-stream":
        return decode_pixels(body, limits), True, None
    if ctype == "application/json":
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise InputError(f"body is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or ("image" in doc) == ("images" in doc):
            raise InputError('JSON body needs exactly one of "image" (base64) or "images" (list of base64)')
        top = _parse_top_k(doc.get("top_k"))
        if "image" in doc:
            return (await asyncio.to_thread(decode_image, _b64(doc["image"], "image"), limits))[None], False, top
        if not isinstance(doc["images"], list):
            raise InputError('"images" must be a list of base64 strings')
        blobs = [_b64(v, f"images[{i}]") for i, v in enumerate(doc["images"][: limits.max_images + 1])]
        return await asyncio.to_thread(decode_images, blobs, limits), True, top
    raise HTTPError(
        415,
        f"unsupported Content-Type {ctype or '(none)'!r}: send multipart/form-data, image/*, "
        "application/json or application/octet-stream",
        "bad_content_type",
    )


def deadline_from_header(request: Request, runtime: Runtime) -> float:
    raw = request.headers.get("x-request-timeout-ms")
    if raw is None:
        return runtime.deadline_from_timeout_ms(None)
    try:
        ms = float(raw)
    except ValueError:
        raise InputError(f"X-Request-Timeout-Ms must be a number of milliseconds, got {raw!r}") from None
    if ms <= 0:
        raise InputError("X-Request-Timeout-Ms must be positive")
    return runtime.deadline_from_timeout_ms(ms)


REFUSALS = (QueueFull, DeadlineExceeded, NotAccepting, ModelNotFound)


def refusal_to_http(e: Exception) -> HTTPError:
    """The runtime's and batcher's refusals as HTTP answers (the gRPC twin is `to_rpc_error`)."""
    if isinstance(e, QueueFull):
        return HTTPError(429, str(e), "queue_full", {"Retry-After": str(int(max(1, round(e.retry_after_s))))})
    if isinstance(e, DeadlineExceeded):
        return HTTPError(504, "deadline exceeded before the images reached the engine", "deadline")
    if isinstance(e, NotAccepting):
        return HTTPError(503, str(e), e.reason)
    if isinstance(e, ModelNotFound):
        return HTTPError(404, str(e), "not_found")
    raise TypeError(f"not a refusal: {e!r}")


def protocol_of(path: str) -> str:
    """`/v2/...` is the Open Inference Protocol; everything else is our own API."""
    return "kserve-rest" if path.startswith("/v2") else PROTOCOL


def server_timing(decode_s: float, timing: Timing) -> str:
    return ", ".join(
        f"{name};dur={seconds * 1000:.2f}"
        for name, seconds in (("decode", decode_s), ("queue", timing.queue_s), ("infer", timing.infer_s))
    )


class AccessLogMiddleware:
    """Request id, request-duration metric and access log. Pure ASGI: Starlette's
    BaseHTTPMiddleware adds a task group and stream wrapping to every request."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        request_id = incoming.decode("latin-1") or uuid.uuid4().hex
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            path = scope["path"]
            protocol = protocol_of(path)
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            metrics.REQUEST_SECONDS.labels(protocol, endpoint, str(status)).observe(elapsed)
            access_log.info(
                "%s %s %d %.1fms",
                scope["method"],
                path,
                status,
                elapsed * 1000,
                extra={"request_id": request_id, "status": status, "duration_ms": round(elapsed * 1000, 2)},
            )


def create_app(runtime: Runtime, extra_routes: Callable[[FastAPI], None] | None = None) -> FastAPI:
    app = FastAPI(
        title="QuickNet Serving",
        version="0.1.0",
        description="CIFAR-10 image classification. Our own API (`/classify`) and the Open Inference Protocol (`/v2`).",
    )

    app.add_middleware(AccessLogMiddleware)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        metrics.REJECTIONS.labels(protocol_of(request.url.path), e.reason).inc()
        return error_response(e.status, str(e), e.headers)

    async def _refusal(request: Request, e: Exception) -> JSONResponse:
        return await _http_error(request, refusal_to_http(e))

    for refusal in REFUSALS:
        app.add_exception_handler(refusal, _refusal)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        """An engine or server fault: logged with its traceback, answered in one line."""
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {e}")

    @app.exception_handler(StarletteHTTPException)
    async def _framework_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Unknown paths, wrong methods, malformed multipart: the same one-line error shape."""
        if e.status_code < 500:
            metrics.REJECTIONS.labels(protocol_of(request.url.path), "bad_request").inc()
        return error_response(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        metrics.REJECTIONS.labels(protocol_of(request.url.path), "bad_input").inc()
        return error_response(400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(InputError)
    async def _input_error(request: Request, e: InputError) -> JSONResponse:
        metrics.REJECTIONS.labels(protocol_of(request.url.path), e.reason).inc()
        return error_response(e.status, str(e))

    @app.post("/classify", openapi_extra=CLASSIFY_OPENAPI, summary="Classify one or more images")
    async def classify(request: Request) -> Response:
        model = runtime.serving()
        deadline = deadline_from_header(request, runtime)
        t0 = time.perf_counter()
        images, several, body_k = await parse_classify(request, runtime)
        k = _parse_top_k(request.query_params.get("top_k")) or body_k or runtime.settings.default_top_k
        decode_s = time.perf_counter() - t0
        metrics.DECODE_SECONDS.labels(PROTOCOL).observe(decode_s)
        predictions, timing = await run_unless_disconnected(request, model.classify(images, deadline, PROTOCOL, k))
        rows = [[p.to_dict() for p in row] for row in predictions]
        body = {"model": model.name, "version": str(model.version.version), "predictions": rows if several else rows[0]}
        return JSONResponse(body, headers={"Server-Timing": server_timing(decode_s, timing)})

    @app.get("/healthz", summary="Liveness: the process is up")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness: model loaded, warmed up, not draining")
    async def readyz() -> JSONResponse:
        if runtime.ready and not runtime.draining:
            return JSONResponse({"status": "ready"})
        return error_response(503, "draining" if runtime.draining else "not ready: loading or warming up")

    @app.get("/v1/models", summary="Every served model version; `default` marks the one /classify uses")
    async def models() -> dict:
        return {
            "models": [
                {
                    "name": m.name,
                    "version": str(m.version.version),
                    "default": m is runtime.default,
                    "backend": m.backend.describe(),
                    "labels": m.labels,
                    "max_batch_size": m.batcher.max_batch_size,
                    "accuracy": {k: v.get("top1") for k, v in m.version.metadata.get("accuracy", {}).items()},
                    "dataset": m.version.metadata.get("dataset"),
                }
                for m in runtime.all_models()
            ]
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    if extra_routes is not None:
        extra_routes(app)
    return app
