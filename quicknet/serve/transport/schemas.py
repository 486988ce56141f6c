"""What the OpenAPI document says about answers every front shares: the one error body, the
operational routes' bodies, and the error statuses a route declares.

These models only document: no handler is validated or serialized through them (the hot routes
build their bytes themselves); tests/test_openapi.py checks real answers against the document.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def _absent_not_null(schema: dict) -> None:
    """An optional field here is left out of a body, never sent as null: no `default: null`."""
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None:
            del prop["default"]


class Schema(BaseModel):
    """A documented body: exactly these fields (`additionalProperties: false`), so the document
    says what is sent and a field added to an answer without it fails the schema test."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_absent_not_null)


class ErrorBody(Schema):
    """Every error the service answers, on every front and status (`error_response`)."""

    error: str = Field(description="one line saying what went wrong and, where it can, what to do")


class Liveness(Schema):
    status: Literal["alive"]


class Readiness(Schema):
    status: Literal["ready"]


# The operations' groups, in the order the docs show them; every route takes one of these.
TAGS: list[dict[str, str]] = [
    {"name": "classify", "description": "Our own API: classify images (multipart, image bytes, JSON, raw pixels)."},
    {
        "name": "inference",
        "description": "Open Inference Protocol (KServe v2, as Triton speaks it): JSON tensors or the "
        "binary-data extension, with the classification extension.",
    },
    {
        "name": "models",
        "description": "The served models: our list (`/v1/models`) and the Open Inference Protocol's "
        "metadata, readiness, configuration and statistics.",
    },
    {"name": "repository", "description": "The model repository: its index, and explicit load and unload."},
    {"name": "health", "description": "Liveness and readiness, ours and the Open Inference Protocol's."},
    {"name": "server", "description": "The server itself: Open Inference Protocol metadata, Prometheus metrics."},
]

# Request pieces the inference routes share: the deadline header, and a 1x1 PNG for examples.
TIMEOUT_HEADER = {
    "name": "X-Request-Timeout-Ms",
    "in": "header",
    "required": False,
    "schema": {"type": "number"},
    "description": "deadline in milliseconds; past it the request is answered 504 and never computed",
}
EXAMPLE_PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"

# What each error status means on the routes that can answer it; a route may say it more precisely.
ERRORS: dict[int, str] = {
    400: "bad input: the body, a parameter or a header is malformed or out of range",
    401: "missing or invalid API key (send `Authorization: Bearer <key>`)",
    404: "no such model or version is served",
    408: "the request body did not arrive within the body deadline (the connection is closed)",
    413: "too large: request bytes, image bytes, pixels, or images per request",
    415: "unsupported Content-Type or image format",
    429: "the queue is full; retry after `Retry-After` seconds",
    500: "inference failed in the engine",
    503: "not ready (loading or warming up), draining, or the engine process is not connected",
    504: "the deadline (`X-Request-Timeout-Ms`) passed before the images reached the engine",
}


def errors(*statuses: int | tuple[int, str]) -> dict[int | str, dict]:
    """`responses=` entries for the error statuses a route can answer, each with `ErrorBody`: a
    status alone takes its shared meaning (`ERRORS`), `(status, text)` says it for this route."""
    doc: dict[int | str, dict] = {}
    for entry in statuses:
        status, description = entry if isinstance(entry, tuple) else (entry, ERRORS[entry])
        doc[status] = {"model": ErrorBody, "description": description}
        if status == 429:
            doc[status]["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
    return doc


def answers(ok: type[BaseModel], description: str, *statuses: int | tuple[int, str]) -> dict[int | str, dict]:
    """`responses=` for a JSON route: its 200 body, then `errors(*statuses)`. Documented this way
    (not `response_model=`), FastAPI neither validates nor re-serializes what the handler returns."""
    return {200: {"model": ok, "description": description}, **errors(*statuses)}
