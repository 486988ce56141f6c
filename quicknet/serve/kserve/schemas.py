"""The Open Inference Protocol's REST bodies (`/v2/...`), as this server sends and reads them,
for the OpenAPI document. Documentation only: the handlers build and parse plain dicts (the
inference request is read raw, for the binary-data extension); tests/test_openapi.py checks real
answers against these schemas."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, RootModel

from quicknet.serve.transport.schemas import Schema

# --- server and health ------------------------------------------------------------------------


class ServerMetadata(Schema):
    name: str
    version: str
    extensions: list[str] = Field(description="the protocol extensions this server implements")


class Live(Schema):
    live: Literal[True]


class Ready(Schema):
    ready: Literal[True]


class ModelReady(Schema):
    name: str
    ready: Literal[True]


# --- model metadata, configuration, statistics ------------------------------------------------


class TensorMetadata(Schema):
    name: str
    datatype: str = Field(description="`UINT8`, `FP32`, `BYTES`")
    shape: list[int] = Field(description="-1: any size (the batch dimension)")


class ModelMetadata(Schema):
    name: str
    versions: list[str] = Field(description="every served version of the model")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ConfigInput(Schema):
    name: str
    data_type: str
    format: str
    dims: list[int]


class ConfigOutput(Schema):
    name: str
    data_type: str
    dims: list[int]
    label_filename: str


class DynamicBatching(Schema):
    preferred_batch_size: list[int]
    max_queue_delay_microseconds: int


class InstanceGroup(Schema):
    name: str
    count: int
    kind: str


class ModelConfig(Schema):
    """Triton's model configuration, in the JSON form tritonclient and perf_analyzer read."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[ConfigInput]
    output: list[ConfigOutput]
    dynamic_batching: DynamicBatching
    instance_group: list[InstanceGroup]


class Duration(Schema):
    count: int
    ns: int = Field(description="total nanoseconds")


class InferenceStats(Schema):
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


class BatchStats(Schema):
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


class ModelStatistics(Schema):
    """Triton's statistics for one version: `inference_count` counts images, `execution_count`
    engine batches, `inference_stats` requests."""

    name: str
    version: str
    inference_count: int
    execution_count: int
    last_inference: int = Field(description="milliseconds since the epoch; 0 before the first request")
    inference_stats: InferenceStats
    batch_stats: list[BatchStats]


class ModelStatsResponse(Schema):
    model_stats: list[ModelStatistics]


# --- repository -------------------------------------------------------------------------------


class RepositoryEntry(Schema):
    name: str
    version: str
    state: Literal["LOADING", "READY", "UNLOADING", "UNAVAILABLE"]
    reason: str = Field(description="why a version is not ready; empty when it is")


class RepositoryIndex(RootModel[list[RepositoryEntry]]):
    """Every version in the store (or only the ready ones, with `{"ready": true}`)."""


class RepositoryIndexRequest(Schema):
    ready: bool = Field(False, description="only the versions that are READY")


class RepositoryAction(Schema):
    """An empty object: the load or unload is done."""


# --- inference --------------------------------------------------------------------------------


class InputParameters(Schema):
    binary_data_size: int = Field(
        ge=0, description="binary-data extension: the tensor's bytes follow the JSON header, this many"
    )


class InferInput(Schema):
    name: Literal["images"]
    datatype: Literal["UINT8", "BYTES"] = Field(
        description="`UINT8`: raw pixels, shape [N,32,32,3] (NHWC); `BYTES`: encoded images "
        "(PNG, JPEG, WebP, BMP, GIF), shape [N] or [N,1], base64 strings in JSON"
    )
    shape: list[int]
    data: list = Field(
        None,
        description="the values, flat or nested (integers 0..255, or base64 strings); absent when "
        "`parameters.binary_data_size` says they follow in binary",
    )
    parameters: InputParameters = Field(None)


class RequestParameters(Schema):
    binary_data_output: bool = Field(False, description="send every output in binary (binary-data extension)")


class OutputParameters(Schema):
    binary_data: bool = Field(False, description="send this output in binary (binary-data extension)")
    classification: int = Field(
        None, ge=1, le=10, description='classification extension: the top k as BYTES "score:index:label"'
    )


class RequestedOutput(Schema):
    name: Literal["logits"]
    parameters: OutputParameters = Field(None)


class InferRequest(Schema):
    """The JSON inference request (the JSON header, with the binary-data extension)."""

    id: str = Field(None, description="echoed in the response")
    parameters: RequestParameters = Field(None)
    inputs: list[InferInput] = Field(min_length=1, max_length=1, description="one tensor, `images`")
    outputs: list[RequestedOutput] = Field(None, description="default: `logits` as FP32 [N,10], in JSON")


class OutputParametersSent(Schema):
    binary_data_size: int = Field(ge=0, description="this output's bytes follow the JSON header, this many")


class InferOutput(Schema):
    name: str
    datatype: Literal["FP32", "BYTES"] = Field(
        description='`FP32` logits [N,10]; `BYTES` [N,k] "score:index:label" with `classification`'
    )
    shape: list[int]
    data: list[float] | list[str] = Field(None, description="the values, flattened; absent when sent in binary")
    parameters: OutputParametersSent = Field(None)


class InferResponse(Schema):
    model_name: str
    model_version: str
    id: str = Field(None, description="the request's `id`, when it had one")
    outputs: list[InferOutput]
