"""The answers of our own REST API (`POST /classify`, `POST /predictions/{model}`, `GET /v1/models`),
as the OpenAPI document states them. Documentation only: `/classify` writes its bytes with orjson on the fast path and
`/v1/models` returns a dict; tests/test_openapi.py checks real answers against these schemas."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from quicknet.serve.transport.schemas import Schema


class Prediction(Schema):
    label: str = Field(description="class name, e.g. `cat`")
    index: int = Field(ge=0, description="class index in the model's label list")
    score: float = Field(ge=0, le=1, description="softmax probability, rounded to 6 decimals")


class ClassifyResponse(Schema):
    model: str = Field(description="the model that answered (the default model, or `?model=`)")
    version: str = Field(description="its version number, as a string")
    predictions: list[Prediction] | list[list[Prediction]] = Field(
        description="top-k classes, best first, shaped by the request's form, never by the count: one "
        'list for a single-image form (an image/* body or one sniffed image file, JSON `"image"`, '
        'one multipart `image` or `file` field); a list per image, in order, for `"images"`, '
        "`images` fields or raw pixels (even when they hold one image)"
    )


class PredictionsResponse(Schema):
    model: str = Field(description="the model named in the path")
    version: str = Field(description="the version that answered (the path's, else the newest served)")
    predictions: list[list[Prediction]] = Field(
        description="top-k classes, best first: a list per image, in order, whatever the body's form or count"
    )


class ServedModel(Schema):
    name: str
    version: str
    default: bool = Field(description="the version `/classify` answers with")
    backend: dict[str, Any] = Field(description="the engine's own description: backend, device or provider, precision")
    labels: list[str]
    max_batch_size: int
    accuracy: dict[str, float | None] = Field(description="top-1 accuracy by evaluation, from the store's metadata")
    dataset: str | None = Field(description="what the accuracy was measured on")


class ModelsResponse(Schema):
    models: list[ServedModel]
