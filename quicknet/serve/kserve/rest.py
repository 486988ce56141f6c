"""Open Inference Protocol over REST (`/v2/...`), with the binary-data and classification extensions."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from quicknet.serve import metrics, tracing
from quicknet.serve.errors import InputError, clip
from quicknet.serve.images import PIXELS_PER_IMAGE, Limits
from quicknet.serve.kserve import (
    EXTENSIONS,
    INPUT,
    OUTPUT,
    SERVER_NAME,
    SERVER_VERSION,
    classification,
    decode_input,
    model_config,
    model_metadata,
    model_statistics,
    schemas,
    serialize_bytes_tensor,
)
from quicknet.serve.runtime import Runtime, check_model_name
from quicknet.serve.transport.http import (
    deadline_from_header,
    fast_path,
    header,
    parse_json,
    public,
    read_body,
    run_unless_disconnected,
)
from quicknet.serve.transport.schemas import EXAMPLE_PNG_B64, TIMEOUT_HEADER, answers

PROTOCOL = "kserve-rest"
_DECODE_SECONDS = metrics.DECODE_SECONDS.labels(PROTOCOL)  # looked up once, not a request
HEADER_LENGTH = b"inference-header-content-length"
# Bodies the handlers read raw, documented by `openapi_extra` references; `create_app` adds their schemas.
OPENAPI_SCHEMAS = (schemas.InferRequest, schemas.RepositoryIndexRequest)

_REF = "#/components/schemas/"
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_EXAMPLE_INPUT = {"name": INPUT, "datatype": "BYTES", "shape": [1], "data": [EXAMPLE_PNG_B64]}
INFER_OPENAPI = {
    "parameters": [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 1},
            "description": "binary-data extension: the body is this many bytes of JSON request, then the "
            "input tensors' bytes (each input says how many in `parameters.binary_data_size`)",
        },
        TIMEOUT_HEADER,
    ],
    "requestBody": {
        "required": True,
        "description": "The JSON inference request. With the binary-data extension, the JSON request is "
        "followed by the tensors' raw bytes and `Inference-Header-Content-Length` gives the JSON's "
        "length: UINT8 pixels as N x 32 x 32 x 3 bytes, BYTES images each as a 4-byte little-endian "
        "length then the encoded image.",
        "content": {
            "application/json": {
                "schema": {"$ref": _REF + "InferRequest"},
                "examples": {
                    "image": {"summary": "one encoded image (base64)", "value": {"inputs": [_EXAMPLE_INPUT]}},
                    "top 3": {
                        "summary": "the classification extension",
                        "value": {
                            "id": "42",
                            "inputs": [_EXAMPLE_INPUT],
                            "outputs": [{"name": OUTPUT, "parameters": {"classification": 3}}],
                        },
                    },
                },
            },
            "application/octet-stream": _BINARY,
        },
    },
}


def infer_openapi(suffix: str) -> dict:
    """`/infer`'s operation, its path parameters included: a `fast_path` handler takes the request
    alone, so FastAPI cannot read them from its signature."""
    path = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    where = "path" if suffix else "query"  # without a version in the path, `?version=` picks one
    path.append({"name": "version", "in": where, "required": bool(suffix), "schema": {"type": "string"}})
    return INFER_OPENAPI | {"parameters": path + INFER_OPENAPI["parameters"]}


INFER_RESPONSES = answers(
    schemas.InferResponse,
    "the outputs: JSON, or with any output in binary the JSON response then those bytes "
    "(`application/octet-stream`, the JSON's length in `Inference-Header-Content-Length`)",
    400,
    404,
    408,
    413,
    415,
    429,
    500,
    503,
    504,
)
INFER_RESPONSES[200]["content"] = {"application/octet-stream": _BINARY}
INFER_RESPONSES[200]["headers"] = {
    "Inference-Header-Content-Length": {
        "description": "binary answers only: the length of the JSON response the output bytes follow",
        "schema": {"type": "integer"},
    }
}
_ENGINE_GONE = (503, "`--workers`: the engine process is not connected; retry shortly")


def max_json_values(limits: Limits) -> int:
    """The most values an inference request's JSON can hold within the limits (every pixel of the
    most images, and room for the rest); a longer one is refused before it is parsed."""
    return limits.max_images * PIXELS_PER_IMAGE + 256


def _parse_body(body: bytes, header_length: str | None, max_values: int | None = None) -> tuple[dict, bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise InputError(
                f"Inference-Header-Content-Length must be an integer, got {header_length[:40]!r}"
            ) from None
        if not 0 < n <= len(body):
            raise InputError(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
        json_part, binary = body[:n], body[n:]
    doc = parse_json(json_part, "inference request", max_values)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise InputError('inference request needs "inputs": a non-empty list of tensors')
    if not isinstance(doc.get("id", ""), str):
        raise InputError('"id" must be a string (the Open Inference Protocol\'s request id)')
    return doc, binary


def _object(value: object, where: str) -> dict:
    """An optional JSON object field (`parameters`): absent is empty, anything else is a 400."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{where} must be a JSON object")
    return value


def _images(doc: dict, binary: bytes, runtime: Runtime) -> np.ndarray:
    if len(doc["inputs"]) != 1:
        raise InputError(f"expected one input tensor ({INPUT!r}), got {len(doc['inputs'])}")
    tensor = doc["inputs"][0]
    if not isinstance(tensor, dict):
        raise InputError("each input must be an object with name, shape, datatype and data")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        raise InputError(f"input {name!r} needs an integer list `shape`")
    size = _object(tensor.get("parameters"), f"input {name!r} parameters").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size != len(binary):
            raise InputError(f"binary_data_size {size} does not match the {len(binary)} binary bytes sent")
        return decode_input(name, datatype, shape, runtime.limits, raw=binary)
    if binary:
        raise InputError("binary data was sent but no input declares parameters.binary_data_size")
    if "data" not in tensor:
        raise InputError(f"input {name!r} has neither `data` nor parameters.binary_data_size")
    data = tensor["data"]
    if datatype == "BYTES":
        import base64
        import binascii

        try:
            data = [base64.b64decode(x, validate=True) for x in np.asarray(data, dtype=object).reshape(-1)]
        except (binascii.Error, ValueError, TypeError):
            raise InputError(f"input {name!r}: BYTES elements in JSON must be base64-encoded images") from None
    return decode_input(name, datatype, shape, runtime.limits, values=data)


def _encoded(doc: dict) -> bool:
    """BYTES inputs carry encoded images: decode them off the event loop."""
    return any(isinstance(t, dict) and t.get("datatype") == "BYTES" for t in doc["inputs"])


def _outputs(doc: dict, logits: np.ndarray, labels: list[str]) -> tuple[list[dict], list[bytes]]:
    """Requested outputs → (JSON tensors, binary blobs in order)."""
    wanted = doc.get("outputs") or [{"name": OUTPUT}]
    if not isinstance(wanted, list):
        raise InputError('"outputs" must be a list of {"name": ...} objects')
    binary_default = bool(_object(doc.get("parameters"), "request parameters").get("binary_data_output", False))
    tensors, blobs = [], []
    for out in wanted:
        if not isinstance(out, dict) or out.get("name") != OUTPUT:
            unknown = repr(out.get("name") if isinstance(out, dict) else out)[:40]
            raise InputError(f"unknown output {unknown}: have {OUTPUT!r}")
        params = _object(out.get("parameters"), f"output {OUTPUT!r} parameters")
        as_binary = bool(params.get("binary_data", binary_default))
        k = params.get("classification")
        if k is not None:
            if not isinstance(k, int) or isinstance(k, bool):
                raise InputError("classification must be an integer")
            rows = classification(logits, k, labels)
            tensor = {"name": OUTPUT, "datatype": "BYTES", "shape": [len(rows), k]}
            if as_binary:
                blob = serialize_bytes_tensor([s for row in rows for s in row])
            else:
                tensor["data"] = [s.decode() for row in rows for s in row]
        else:
            tensor = {"name": OUTPUT, "datatype": "FP32", "shape": list(logits.shape)}
            if as_binary:
                blob = np.ascontiguousarray(logits, dtype="<f4").tobytes()
            else:
                tensor["data"] = logits.astype(np.float32).reshape(-1).tolist()
        if as_binary:
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        tensors.append(tensor)
    return tensors, blobs


def _repository_action(runtime: Runtime, request: Request, name: str) -> str:
    """Load and unload: an admin key when keys are in force (401 / 403), then a model name (400)."""
    runtime.repository_guard.check(request.headers.get("authorization"))
    return check_model_name(name)


def _check_infer_type(content_type: str | None) -> None:
    """A body that did not parse, sent as an image or a form (as to `/classify`): 415 saying what
    infer takes (any other type, or none, is read as JSON or the binary-data extension, as Triton's
    clients send it)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind.startswith(("image/", "multipart/")):
        raise InputError(
            f"infer takes a JSON body (application/json) or the binary-data extension, not {clip(kind, 60)}: "
            "send an image as a BYTES tensor, or to /classify",
            415,
            "bad_content_type",
        )


def router(runtime: Runtime) -> APIRouter:
    """The Open Inference Protocol's routes: the server's, the repository's, each model's."""
    app = APIRouter()
    _server_routes(app, runtime)
    _repository_routes(app, runtime)
    _model_routes(app, runtime)
    return app


def _server_routes(app: APIRouter, runtime: Runtime) -> None:

    @app.get(
        "/v2",
        tags=["server"],
        summary="Server metadata",
        response_model=None,
        responses=answers(schemas.ServerMetadata, "the server's name, version and protocol extensions"),
    )
    async def server_metadata() -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

    @app.get(
        "/v2/health/live",
        tags=["health"],
        summary="Server liveness (Open Inference Protocol)",
        responses=answers(schemas.Live, "the server is live", (400, "not live: the engine has stalled")),
    )
    @public
    async def live() -> JSONResponse:
        if runtime.live:
            return JSONResponse({"live": True})
        return JSONResponse({"error": runtime.stalled}, status_code=400)

    @app.get(
        "/v2/health/ready",
        tags=["health"],
        summary="Server readiness (Open Inference Protocol)",
        responses=answers(schemas.Ready, "ready for inference", (400, "not ready: loading, warming up or draining")),
    )
    @public
    async def ready() -> JSONResponse:
        if runtime.accepting:
            return JSONResponse({"ready": True})
        return JSONResponse({"error": "not ready"}, status_code=400)


def _repository_routes(app: APIRouter, runtime: Runtime) -> None:
    @app.post(
        "/v2/repository/index",
        tags=["repository"],
        summary="Repository index: every version in the store and its state",
        responses=answers(
            schemas.RepositoryIndex,
            "every version in the store and its state",
            400,
            408,
            (413, "the request body is over 64 KiB"),
            _ENGINE_GONE,
        ),
        openapi_extra={
            "requestBody": {
                "required": False,
                "description": "optional; an empty body lists every version",
                "content": {"application/json": {"schema": {"$ref": _REF + "RepositoryIndexRequest"}}},
            }
        },
    )
    async def repository_index(request: Request) -> JSONResponse:
        body = await read_body(request, 1 << 16)
        ready = False
        if body.strip():
            doc = parse_json(body, "repository index request")
            if not isinstance(doc, dict):
                raise InputError('repository index request must be a JSON object, e.g. {"ready": true}')
            ready = bool(doc.get("ready", False))
        return JSONResponse(await runtime.repository.index(ready))

    @app.post(
        "/v2/repository/models/{name}/load",
        tags=["repository"],
        summary="Load a model (explicit model control mode)",
        response_model=None,
        responses=answers(
            schemas.RepositoryAction,
            "loaded and warmed up: its versions are served",
            (400, "not a model name, not in explicit model control mode, or no version of the model loaded (why)"),
            (401, "an admin key is needed and none valid was sent"),
            (403, "API keys are in force and the key is not an admin key"),
            (404, "the store has no such model"),
            _ENGINE_GONE,
        ),
    )
    async def repository_load(name: str, request: Request) -> dict:
        await runtime.repository.load(_repository_action(runtime, request, name))
        return {}

    @app.post(
        "/v2/repository/models/{name}/unload",
        tags=["repository"],
        summary="Unload a model (explicit model control mode)",
        response_model=None,
        responses=answers(
            schemas.RepositoryAction,
            "unloaded: its versions are no longer served",
            (400, "not a model name, not in explicit model control mode, or the default model (it stays loaded)"),
            (401, "an admin key is needed and none valid was sent"),
            (403, "API keys are in force and the key is not an admin key"),
            (404, "no such model is loaded"),
            _ENGINE_GONE,
        ),
    )
    async def repository_unload(name: str, request: Request) -> dict:
        await runtime.repository.unload(_repository_action(runtime, request, name))
        return {}


def _model_routes(app: APIRouter, runtime: Runtime) -> None:
    @app.get(
        "/v2/models/stats",
        tags=["models"],
        summary="Statistics of every served model",
        response_model=None,
        responses=answers(schemas.ModelStatsResponse, "Triton's statistics, one entry per version", _ENGINE_GONE),
    )
    async def all_stats() -> dict:
        return {"model_stats": [await model_statistics(m) for m in runtime.select()]}

    for suffix in ("", "/versions/{version}"):
        base = "/v2/models/{name}" + suffix

        @app.get(
            base,
            tags=["models"],
            summary="Model metadata",
            response_model=None,
            responses=answers(schemas.ModelMetadata, "the model's versions, platform and tensors", 404),
        )
        async def metadata(name: str, version: str | None = None) -> dict:
            return model_metadata(runtime.get(name, version), runtime)

        @app.get(
            base + "/ready",
            tags=["models"],
            summary="Model readiness",
            responses=answers(
                schemas.ModelReady, "ready for inference", 404, (400, "not ready: loading, warming up or draining")
            ),
        )
        async def model_ready(name: str, version: str | None = None) -> JSONResponse:
            runtime.get(name, version)
            if runtime.accepting:
                return JSONResponse({"name": name, "ready": True})
            return JSONResponse({"error": f"model {name!r} is not ready"}, status_code=400)

        @app.get(
            base + "/config",
            tags=["models"],
            summary="Triton model configuration",
            response_model=None,
            responses=answers(schemas.ModelConfig, "Triton's model configuration (JSON form)", 404),
        )
        async def config(name: str, version: str | None = None) -> dict:
            return model_config(runtime.get(name, version))

        @app.get(
            base + "/stats",
            tags=["models"],
            summary="Triton model statistics",
            response_model=None,
            responses=answers(
                schemas.ModelStatsResponse, "Triton's statistics, one entry per version", 404, _ENGINE_GONE
            ),
        )
        async def stats(name: str, version: str | None = None) -> dict:
            return {"model_stats": [await model_statistics(m) for m in runtime.select(name, version)]}

        @app.post(
            base + "/infer",
            tags=["inference"],
            summary="Inference (JSON tensors or the binary-data extension)",
            responses=INFER_RESPONSES,
            openapi_extra=infer_openapi(suffix),
        )
        @fast_path
        async def infer(request: Request) -> Response:
            name, version = request.path_params["name"], request.path_params.get("version")
            if version is None and request.scope["query_string"]:  # `/infer?version=N`, as the GETs take it
                version = request.query_params.get("version")
            mr = runtime.serving(name, version)
            deadline = deadline_from_header(request, runtime)
            t0 = time.perf_counter()
            with tracing.span("decode"):
                body = await read_body(request, runtime.settings.max_request_bytes)
                length = header(request.scope, HEADER_LENGTH)
                try:
                    doc, binary = _parse_body(body, length, max_json_values(runtime.limits))
                except InputError:  # read the type only then: the request path pays nothing for it
                    _check_infer_type(header(request.scope, b"content-type"))
                    raise
                images = (
                    await asyncio.to_thread(_images, doc, binary, runtime)
                    if _encoded(doc)
                    else _images(doc, binary, runtime)
                )
            _DECODE_SECONDS.observe(time.perf_counter() - t0)
            logits, _ = await run_unless_disconnected(request, mr.run(images, deadline, PROTOCOL))
            tensors, blobs = _outputs(doc, logits, mr.labels)
            reply = {"model_name": mr.name, "model_version": str(mr.version), "outputs": tensors}
            if "id" in doc:
                reply["id"] = doc["id"]
            if not blobs:
                return JSONResponse(reply)
            head = json.dumps(reply).encode()
            return Response(
                head + b"".join(blobs),
                media_type="application/octet-stream",
                headers={"Inference-Header-Content-Length": str(len(head))},
            )
