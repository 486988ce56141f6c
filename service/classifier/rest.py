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

import base64
import binascii
import re
import time

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service import metrics, tracing
from service.classifier.schemas import ClassifyResponse, ModelsResponse
from service.images import InputError, check_count, decode_image, decode_images, decode_pixels, off_loop
from service.runtime import Runtime
from service.transport.http import (
    HTTPError,
    deadline_from_header,
    fast_path,
    parse_json,
    read_body,
    run_unless_disconnected,
    server_timing,
)
from service.transport.schemas import EXAMPLE_PNG_B64, TIMEOUT_HEADER, answers

PROTOCOL = "rest"

CLASSIFY_OPENAPI = {
    "parameters": [
        {"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 10}},
        TIMEOUT_HEADER,
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "one image"},
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "example": []},
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
                    "one": {"value": {"image": EXAMPLE_PNG_B64, "top_k": 3}},
                    "several": {"value": {"images": [EXAMPLE_PNG_B64, EXAMPLE_PNG_B64]}},
                },
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "example": "(N x 3072 bytes: uint8 pixels, 32x32x3, HWC)",
            },
        },
    },
}
CLASSIFY_RESPONSES = answers(
    ClassifyResponse,
    "top-k classes per image (timings in the `Server-Timing` header: decode, queue, infer)",
    400,
    408,
    413,
    415,
    429,
    500,
    503,
    504,
)
_EXAMPLE_ANSWER = {"model": "quicknet", "version": "1", "predictions": [{"label": "cat", "index": 3, "score": 0.91}]}
CLASSIFY_RESPONSES[200]["content"] = {"application/json": {"example": _EXAMPLE_ANSWER}}


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
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise InputError(f"top_k must be an integer from 1 to 10, got {raw!r}")
    try:
        k = int(raw)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"top_k must be an integer from 1 to 10, got {str(raw)[:40]!r}") from None
    if not 1 <= k <= 10:
        raise InputError(f"top_k must be from 1 to 10, got {k}")
    return k


IMAGE_FIELDS = ("image", "images")
_DISPOSITION_NAME = re.compile(rb'name="([^"]*)"|name=([^;\s]+)', re.IGNORECASE)


MAX_FORM_FIELDS = 16  # besides the images: `top_k`, and a form's stray fields


def _most_parts(limits) -> int:
    """Parts (or JSON values) worth reading to count: 4x what the limits allow, so a request a few
    images over still hears the exact count (`check_count`), and a flood is refused unread."""
    return 4 * (limits.max_images + MAX_FORM_FIELDS)


def _check_part_count(body: bytes, boundary: bytes, limits) -> None:
    """At most a few times as many parts as the limits allow, counted as delimiters at C speed
    (every `--boundary`, as `_count_image_parts` splits), before any part is split out or parsed:
    8 MiB of `--X` with boundary X took ~0.7 s of the event loop to split, 64 MiB ~5.5 s."""
    parts = body.count(b"--" + boundary) - 1  # the last one closes the body
    if parts > _most_parts(limits):
        raise InputError(
            f"multipart body has {parts} parts; the limit is {limits.max_images} images", 413, "too_many_images"
        )


def _count_image_parts(body: bytes, boundary: bytes) -> int:
    """How many `image`/`images` parts a multipart body holds, from the part headers alone: the
    image-count limit answers 413 with the exact count before any part is parsed or spooled."""
    count = 0
    for part in body.split(b"--" + boundary)[1:]:
        head = part[: part.find(b"\r\n\r\n")]
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-disposition:"):
                match = _DISPOSITION_NAME.search(line)
                name = match and (match.group(1) if match.group(1) is not None else match.group(2))
                if name and name.decode("latin-1") in IMAGE_FIELDS:
                    count += 1
    return count


def _unset_file_field(value: object) -> bool:
    """A form's empty optional file input (what the docs page sends for an unused `image` field)."""
    if isinstance(value, str):
        return value == ""
    return isinstance(value, StarletteUploadFile) and not value.filename and value.size == 0


async def _parse_multipart(request: Request, runtime: Runtime) -> tuple[np.ndarray, bool, int | None]:
    """`image` and `images` fields are classified together, in the order sent; one `image` field
    alone answers with one list, anything else with a list per image."""
    limits = runtime.limits
    body = await read_body(request, runtime.settings.max_request_bytes)
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary", b"")
    if not boundary:
        raise InputError("multipart body has no boundary in its Content-Type")
    _check_part_count(body, boundary, limits)
    n = _count_image_parts(body, boundary)
    if n:
        check_count(n, limits)

    async def chunks():
        yield body

    try:
        form = await MultiPartParser(
            request.headers, chunks(), max_files=limits.max_images + 1, max_fields=MAX_FORM_FIELDS
        ).parse()
    except MultiPartException as e:
        raise InputError(f"malformed multipart body: {e.message}") from None
    fields = [(k, v) for k, v in form.multi_items() if k in IMAGE_FIELDS and not _unset_file_field(v)]
    if not fields:
        raise InputError("multipart body has no `image` or `images` file field")
    check_count(len(fields), limits)
    blobs = [await v.read() if hasattr(v, "read") else str(v).encode() for _, v in fields]
    top = _parse_top_k(form.get("top_k"))
    images = await off_loop(decode_images, blobs, limits, nbytes=sum(map(len, blobs)))
    return images, not (len(fields) == 1 and fields[0][0] == "image"), top


async def parse_classify(request: Request, runtime: Runtime) -> tuple[np.ndarray, bool, int | None]:
    """Returns (uint8 NHWC images, whether the answer is a list per image, top_k from the body)."""
    limits = runtime.limits
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _parse_multipart(request, runtime)
    body = await read_body(request, runtime.settings.max_request_bytes)
    if not body:
        raise InputError("empty request body: send an image, JSON, multipart or raw pixels")
    if ctype.startswith("image/"):
        return (await off_loop(decode_image, body, limits, nbytes=len(body)))[None], False, None
    if ctype == "application/octet-stream":
        return decode_pixels(body, limits), True, None
    if ctype == "application/json":
        doc = parse_json(body, "body", max_values=_most_parts(limits))  # base64 strings: one value an image
        if not isinstance(doc, dict) or ("image" in doc) == ("images" in doc):
            raise InputError('JSON body needs exactly one of "image" (base64) or "images" (list of base64)')
        top = _parse_top_k(doc.get("top_k"))
        if "image" in doc:
            blob = _b64(doc["image"], "image")
            return (await off_loop(decode_image, blob, limits, nbytes=len(blob)))[None], False, top
        if not isinstance(doc["images"], list):
            raise InputError('"images" must be a list of base64 strings')
        check_count(len(doc["images"]), limits)  # before decoding any: the one rule, the exact count
        blobs = [_b64(v, f"images[{i}]") for i, v in enumerate(doc["images"])]
        return await off_loop(decode_images, blobs, limits, nbytes=sum(map(len, blobs))), True, top
    raise HTTPError(
        415,
        f"unsupported Content-Type {ctype or '(none)'!r}: send multipart/form-data, image/*, "
        "application/json or application/octet-stream",
        "bad_content_type",
    )


def router(runtime: Runtime) -> APIRouter:
    api = APIRouter()

    @api.post(
        "/classify",
        tags=["classify"],
        summary="Classify one or more images",
        responses=CLASSIFY_RESPONSES,
        openapi_extra=CLASSIFY_OPENAPI,
    )
    @fast_path
    async def classify(request: Request) -> Response:
        model = runtime.serving()
        deadline = deadline_from_header(request, runtime)
        t0 = time.perf_counter()
        with tracing.span("decode"):
            images, several, body_k = await parse_classify(request, runtime)
        k = _parse_top_k(request.query_params.get("top_k")) or body_k or runtime.settings.default_top_k
        decode_s = time.perf_counter() - t0
        metrics.DECODE_SECONDS.labels(PROTOCOL).observe(decode_s)
        predictions, timing = await run_unless_disconnected(request, model.classify(images, deadline, PROTOCOL, k))
        rows = [[p.to_dict() for p in row] for row in predictions]
        body = {"model": model.name, "version": str(model.version), "predictions": rows if several else rows[0]}
        return Response(
            orjson.dumps(body),
            media_type="application/json",
            headers={"Server-Timing": server_timing(decode_s, timing)},
        )

    @api.get(
        "/v1/models",
        tags=["models"],
        summary="Every served model version; `default` marks the one /classify uses",
        response_model=None,
        responses=answers(ModelsResponse, "every served model version"),
    )
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
