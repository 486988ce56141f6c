"""Our own REST API: `POST /classify`, `POST /predictions/{model}[/{version}]` and `GET /v1/models`.

Encoded images are decoded in worker threads (Pillow releases the GIL), never on the event loop.

`/classify` takes one of these bodies, chosen by Content-Type:
- `multipart/form-data`: a file field `image` (or `file`: one result list) or repeated `images`
  (a list per image);
- `image/*`: the raw bytes of one image;
- `application/json`: `{"image": "<base64>"}` or `{"images": ["<base64>", ...]}`, optional `"top_k"`;
  a value may be a data URI (`data:image/png;base64,...`);
- `application/octet-stream`: raw uint8 pixels, N x 32 x 32 x 3 (HWC), a list per image; a PNG,
  JPEG, GIF or WebP sent this way (or with no Content-Type, or curl's default form type) is
  recognised by its first bytes and classified as one image.
Query: `top_k` (default `--default-top-k`, 5), `model` and `version` (default: the store's DEFAULT
model at `--version`); any other parameter is a 400 naming it. `X-Request-Timeout-Ms` sets the deadline.

Answer shapes. `/classify` (API v1) answers as it always has, by the request's form, never by the
count: one list for a single-image form (`image`/`file` field, image bytes, JSON `"image"`), a list
per image for the others. `/predictions/{model}[/{version}]` (TorchServe's path) takes the same
bodies and always answers a list per image, one image or many: the stable shape for new callers.
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

from quicknet.serve import metrics, tracing
from quicknet.serve.classifier import check_top_k, model_choice
from quicknet.serve.classifier.schemas import ClassifyResponse, ModelsResponse, PredictionsResponse
from quicknet.serve.errors import InputError, clip
from quicknet.serve.images import (
    PIXELS_PER_IMAGE,
    check_count,
    decode_image,
    decode_images,
    decode_pixels,
    image_label,
    off_loop,
    sniff,
)
from quicknet.serve.runtime import Runtime
from quicknet.serve.transport.http import (
    deadline_from_header,
    fast_path,
    header,
    parse_json,
    read_body,
    run_unless_disconnected,
    server_timing,
)
from quicknet.serve.transport.schemas import EXAMPLE_PNG_B64, TIMEOUT_HEADER, answers

PROTOCOL = "rest"
OPENAPI_SCHEMAS = ()  # its bodies are documented inline (openapi_extra)
_DECODE_SECONDS = metrics.DECODE_SECONDS.labels(PROTOCOL)  # looked up once

TOP_K_PARAM = {
    "name": "top_k",
    "in": "query",
    "required": False,
    "description": "classes per image (default: the server's `--default-top-k`, 5)",
    "schema": {"type": "integer", "minimum": 1, "maximum": 10},
}
NAME_RULE = "letters, digits, `.`, `_`, `-`; a folder of the model store"
MODEL_QUERY = [
    {
        "name": "model",
        "in": "query",
        "required": False,
        "description": f"the model to run (default: the store's DEFAULT model); {NAME_RULE}",
        "schema": {"type": "string"},
    },
    {
        "name": "version",
        "in": "query",
        "required": False,
        "description": "its version number (default: the newest served; with no `model`, the default model's)",
        "schema": {"type": "integer", "minimum": 1},
    },
]
MODEL_PATH = {"name": "model", "in": "path", "required": True, "description": NAME_RULE, "schema": {"type": "string"}}
VERSION_PATH = {"name": "version", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
CLASSIFY_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "image": {
                        "type": "string",
                        "format": "binary",
                        "description": "one image (a field named `file` is taken the same way)",
                    },
                    # `example: []`: Swagger UI's "Try it out" otherwise fills one item with the
                    # text "string" and sends it as an image beside the file picked for `image`
                    "images": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "example": [],
                        "description": "several images, in order (add items with the button)",
                    },
                },
            },
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}, "example": "(PNG/JPEG/WebP/BMP/GIF bytes)"},
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "image": {"type": "string", "format": "byte", "description": "base64, or a data URI"},
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
            "example": "(N x 3072 bytes: uint8 pixels, 32x32x3, HWC; or one PNG/JPEG/GIF/WebP file)",
        },
    },
}
CLASSIFY_OPENAPI = {"parameters": [TOP_K_PARAM, *MODEL_QUERY, TIMEOUT_HEADER], "requestBody": CLASSIFY_BODY}
PREDICTIONS_OPENAPI = {"parameters": [MODEL_PATH, TOP_K_PARAM, TIMEOUT_HEADER], "requestBody": CLASSIFY_BODY}
PREDICTIONS_VERSION_OPENAPI = {
    "parameters": [MODEL_PATH, VERSION_PATH, TOP_K_PARAM, TIMEOUT_HEADER],
    "requestBody": CLASSIFY_BODY,
}
CLASSIFY_QUERY = ("top_k", "model", "version")
PREDICTIONS_QUERY = ("top_k",)
ANSWERED = (400, 404, 408, 413, 415, 429, 500, 503, 504)
CLASSIFY_RESPONSES = answers(
    ClassifyResponse,
    "top-k classes per image (timings in the `Server-Timing` header: decode, queue, infer)",
    *ANSWERED,
)
_EXAMPLE_ANSWER = {"model": "quicknet", "version": "1", "predictions": [{"label": "cat", "index": 3, "score": 0.91}]}
CLASSIFY_RESPONSES[200]["content"] = {"application/json": {"example": _EXAMPLE_ANSWER}}
PREDICTIONS_RESPONSES = answers(
    PredictionsResponse, "top-k classes, a list per image whatever the count (timings in `Server-Timing`)", *ANSWERED
)
PREDICTIONS_RESPONSES[200]["content"] = {
    "application/json": {"example": {**_EXAMPLE_ANSWER, "predictions": [_EXAMPLE_ANSWER["predictions"]]}}
}

_DATA_URI = re.compile(r"data:[\w.+-]*/?[\w.+-]*((?:;[\w.+-]+=[\w.+-]+)*);base64,", re.ASCII)


def _b64(value: object, where: str) -> bytes:
    """Standard base64, bare or as a data URI (`data:image/png;base64,...`, what a browser's
    `FileReader.readAsDataURL` and `canvas.toDataURL` give); line breaks (`base64` wraps at 76) are
    allowed."""
    if not isinstance(value, str):
        raise InputError(f"{where} must be a base64 string")
    if value.startswith("data:"):
        head = _DATA_URI.match(value, 0, 200)
        if head is None:
            raise InputError(f"{where} is a data URI that is not base64 (send `data:image/...;base64,...`)")
        value = value[head.end() :]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return base64.b64decode("".join(value.split()), validate=True)
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
    return check_top_k(k)


IMAGE_FIELDS = ("image", "images", "file")
SINGLE_FIELDS = ("image", "file")  # one of these alone: one result list on /classify
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
    """`image`, `images` and `file` fields are classified together, in the order sent; one `image`
    (or `file`) field alone answers with one list, anything else with a list per image. Errors name
    a part by its position and file name: `image 2 (dog.jpg)`."""
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
        raise InputError("multipart body has no `image`, `images` or `file` file field")
    check_count(len(fields), limits)
    text = next(((k, v) for k, v in fields if isinstance(v, str)), None)
    if text is not None:  # `curl -F image=cat.png`, the @ forgotten: the path itself was sent
        name, value = text
        raise InputError(
            f"form field `{name}` is text ({clip(value, 60)!r}), not a file: send the file (curl: -F {name}=@path)"
        )
    blobs = [await v.read() for _, v in fields]
    names = [getattr(v, "filename", None) for _, v in fields]
    top = _parse_top_k(form.get("top_k"))
    images = await off_loop(decode_images, blobs, limits, names, nbytes=sum(map(len, blobs)))
    return images, not (len(fields) == 1 and fields[0][0] in SINGLE_FIELDS), top


# Bodies that say nothing useful about their type: none, curl's default for `--data-binary`, or
# generic bytes. An image among them is recognised by its first bytes.
_UNTYPED = ("", "application/x-www-form-urlencoded")
_PIXELS = "application/octet-stream"
_STRONG_MAGIC = ("PNG", "JPEG", "GIF", "WEBP")  # BMP's two letters are too weak for raw pixel bodies


async def _one_image(body: bytes, limits) -> np.ndarray:
    return (await off_loop(decode_image, body, limits, nbytes=len(body)))[None]


async def parse_classify(request: Request, runtime: Runtime) -> tuple[np.ndarray, bool, int | None]:
    """Returns (uint8 NHWC images, whether the answer is a list per image, top_k from the body)."""
    limits = runtime.limits
    ctype = (header(request.scope, b"content-type") or "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _parse_multipart(request, runtime)
    body = await read_body(request, runtime.settings.max_request_bytes)
    if not body:
        raise InputError("empty request body: send an image, JSON, multipart or raw pixels")
    if ctype.startswith("image/"):
        return await _one_image(body, limits), False, None
    if ctype == _PIXELS:
        kind, whole = sniff(body), not len(body) % PIXELS_PER_IMAGE
        if kind in _STRONG_MAGIC or (kind and not whole):  # a length raw pixels cannot have: a BMP too
            try:
                return await _one_image(body, limits), False, None
            except InputError:
                if not whole:
                    raise
                # raw pixels whose first pixel happens to read like a file signature (ff d8 ff)
        if not whole:
            raise InputError(
                f"the application/octet-stream body is {len(body)} bytes: neither raw pixels (a multiple of "
                f"{PIXELS_PER_IMAGE}: N x 32 x 32 x 3 uint8) nor a PNG, JPEG, GIF, WebP or BMP file"
            )
        return decode_pixels(body, limits), True, None
    if ctype in _UNTYPED and sniff(body):
        return await _one_image(body, limits), False, None
    if ctype == "application/json":
        doc = parse_json(body, "body", max_values=_most_parts(limits))  # base64 strings: one value an image
        if not isinstance(doc, dict) or ("image" in doc) == ("images" in doc):
            raise InputError('JSON body needs exactly one of "image" (base64) or "images" (list of base64)')
        top = _parse_top_k(doc.get("top_k"))
        if "image" in doc:
            blob = _b64(doc["image"], '"image"')
            return await _one_image(blob, limits), False, top
        if not isinstance(doc["images"], list):
            raise InputError('"images" must be a list of base64 strings')
        check_count(len(doc["images"]), limits)  # before decoding any: the one rule, the exact count
        blobs = [_b64(v, image_label(i)) for i, v in enumerate(doc["images"])]
        return await off_loop(decode_images, blobs, limits, nbytes=sum(map(len, blobs))), True, top
    if ctype in _UNTYPED:
        said = "has no Content-Type" if not ctype else f"says only {ctype} (curl's default for --data-binary)"
        raise InputError(
            f"the request {said} and its body is not a PNG, JPEG, GIF, WebP or BMP file: "
            "set Content-Type (multipart/form-data, image/*, application/json or application/octet-stream)",
            415,
            "bad_content_type",
        )
    raise InputError(
        f"unsupported Content-Type {clip(ctype, 100)!r}: send multipart/form-data, image/*, "
        "application/json or application/octet-stream",
        415,
        "bad_content_type",
    )


def check_query(request: Request, allowed: tuple[str, ...], route: str) -> None:
    """A 400 naming every query parameter the route does not take: a misspelt `?modle=` or
    `?topk=` must not be answered as if it were not there."""
    if not request.scope["query_string"]:  # most requests: no QueryParams to build
        return
    unknown = list(dict.fromkeys(k for k in request.query_params if k not in allowed))
    if unknown:
        names = ", ".join(repr(clip(k, 40)) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        plural = "s" if len(unknown) > 1 else ""
        takes = ", ".join(allowed)
        raise InputError(f"unknown query parameter{plural} {names} on {route}: it takes {takes}")


def router(runtime: Runtime) -> APIRouter:
    api = APIRouter()

    async def answer(request: Request, name: str | None, version: str | None, stable: bool) -> Response:
        model = runtime.serving(*model_choice(runtime, name, version))
        deadline = deadline_from_header(request, runtime)
        t0 = time.perf_counter()
        with tracing.span("decode"):
            images, several, body_k = await parse_classify(request, runtime)
        asked = request.query_params.get("top_k") if request.scope["query_string"] else None
        k = _parse_top_k(asked) or body_k or runtime.settings.default_top_k
        decode_s = time.perf_counter() - t0
        _DECODE_SECONDS.observe(decode_s)
        predictions, timing = await run_unless_disconnected(request, model.classify(images, deadline, PROTOCOL, k))
        rows = [[p.to_dict() for p in row] for row in predictions]
        body = {
            "model": model.name,
            "version": str(model.version),
            "predictions": rows if several or stable else rows[0],
        }
        return Response(
            orjson.dumps(body),
            media_type="application/json",
            headers={"Server-Timing": server_timing(decode_s, timing)},
        )

    @api.post(
        "/classify",
        tags=["classify"],
        summary="Classify one or more images",
        description="The default model, or `?model=` (and `?version=`). One list of classes for a single-image "
        "body (`image` or `file` field, image bytes, JSON `image`), a list per image otherwise; "
        "`/predictions/{model}` always answers a list per image.",
        responses=CLASSIFY_RESPONSES,
        openapi_extra=CLASSIFY_OPENAPI,
    )
    @fast_path
    async def classify(request: Request) -> Response:
        if not request.scope["query_string"]:
            return await answer(request, None, None, stable=False)
        check_query(request, CLASSIFY_QUERY, "/classify")
        query = request.query_params
        return await answer(request, query.get("model") or None, query.get("version") or None, stable=False)

    @api.post(
        "/predictions/{model}",
        tags=["classify"],
        summary="Classify images with one model (TorchServe's path): a list per image, always",
        responses=PREDICTIONS_RESPONSES,
        openapi_extra=PREDICTIONS_OPENAPI,
    )
    @fast_path
    async def predictions(request: Request) -> Response:
        check_query(request, PREDICTIONS_QUERY, "/predictions/{model}")
        return await answer(request, request.path_params["model"], None, stable=True)

    @api.post(
        "/predictions/{model}/{version}",
        tags=["classify"],
        summary="Classify images with one model version: a list per image, always",
        responses=PREDICTIONS_RESPONSES,
        openapi_extra=PREDICTIONS_VERSION_OPENAPI,
    )
    @fast_path
    async def predictions_version(request: Request) -> Response:
        check_query(request, PREDICTIONS_QUERY, "/predictions/{model}/{version}")
        params = request.path_params
        return await answer(request, params["model"], params["version"], stable=True)

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
