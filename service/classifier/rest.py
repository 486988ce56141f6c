"""Our own REST API: `POST /classify` and `GET /v1/models`.

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
import time

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service import metrics
from service.images import InputError, decode_image, decode_images, decode_pixels
from service.runtime import Runtime
from service.transport.http import (
    HTTPError,
    check_declared_length,
    deadline_from_header,
    read_body,
    run_unless_disconnected,
    server_timing,
)

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


def router(runtime: Runtime) -> APIRouter:
    api = APIRouter(tags=["classify"])

    @api.post("/classify", openapi_extra=CLASSIFY_OPENAPI, summary="Classify one or more images")
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
        body = {"model": model.name, "version": str(model.version), "predictions": rows if several else rows[0]}
        return JSONResponse(body, headers={"Server-Timing": server_timing(decode_s, timing)})

    @api.get("/v1/models", summary="Every served model version; `default` marks the one /classify uses")
    async def models() -> dict:
        return {
            "models": [
                {
                    "name": m.name,
                    "version": str(m.version),
                    "default": m is runtime.default,
                    "backend": m.info.description,
                    "labels": list(m.labels),
                    "max_batch_size": m.info.max_batch_size,
                    "accuracy": {k: v.get("top1") for k, v in m.info.metadata.get("accuracy", {}).items()},
                    "dataset": m.info.metadata.get("dataset"),
                }
                for m in runtime.all_models()
            ]
        }

    return api
