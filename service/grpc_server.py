"""gRPC front (grpc.aio): `quicknet.v1.Classifier`, the standard health service tied to readiness,
and server reflection. Deadlines come from the call's own deadline; a cancelled call's queued
images are dropped (the awaiting task is cancelled, which cancels its batcher futures)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import metrics
from service._generated import classifier_pb2 as pb
from service._generated import classifier_pb2_grpc as pb_grpc
from service.batcher import DeadlineExceeded, NotAccepting, QueueFull
from service.images import InputError, check_count, decode_image, decode_pixels
from service.runtime import ModelNotFound, ModelRuntime, Prediction, Runtime

log = logging.getLogger("quicknet.grpc")
PROTOCOL = "grpc"

HTTP_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
}


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, reason: str):
        super().__init__(message)
        self.code, self.reason = code, reason


def to_rpc_error(e: Exception) -> RpcError:
    """Every refusal the service can make, as a gRPC status (shared with the KServe gRPC front)."""
    if isinstance(e, RpcError):
        return e
    if isinstance(e, InputError):
        return RpcError(HTTP_TO_GRPC.get(e.status, grpc.StatusCode.INVALID_ARGUMENT), str(e), e.reason)
    if isinstance(e, QueueFull):
        return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e} (retry after {e.retry_after_s:.0f}s)", "queue_full")
    if isinstance(e, DeadlineExceeded):
        return RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, str(e), "deadline")
    if isinstance(e, NotAccepting):
        return RpcError(grpc.StatusCode.UNAVAILABLE, str(e), e.reason)
    if isinstance(e, ModelNotFound):
        return RpcError(grpc.StatusCode.NOT_FOUND, str(e), "not_found")
    return RpcError(grpc.StatusCode.INTERNAL, f"inference failed: {e}", "engine_error")


def deadline_of(context: grpc.aio.ServicerContext, runtime: Runtime) -> float:
    remaining = context.time_remaining()
    if remaining is None:
        return runtime.deadline_from_timeout_ms(None)
    return time.monotonic() + remaining


def decode_image_msg(image: pb.Image, runtime: Runtime, index: int = 0) -> np.ndarray:
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return decode_image(image.encoded, runtime.limits, index)
    if kind == "pixels":
        pixels = decode_pixels(image.pixels, runtime.limits)
        if len(pixels) != 1:
            raise InputError(f"image {index}: `pixels` holds {len(pixels)} images; send one per Image")
        return pixels[0]
    raise InputError(f"image {index} is empty: set `encoded` or `pixels`")


def _top_k(requested: int, runtime: Runtime) -> int:
    if requested > 10:
        raise InputError(f"top_k must be from 1 to 10, got {requested}")
    return requested or runtime.settings.default_top_k


def _predictions(rows: list[Prediction]) -> list[pb.Prediction]:
    return [pb.Prediction(label=p.label, index=p.index, score=p.score) for p in rows]


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    async def _classify(
        self, images: list[pb.Image], top_k: int, context: grpc.aio.ServicerContext
    ) -> tuple[ModelRuntime, list[list[Prediction]]]:
        runtime = self.runtime
        model = runtime.serving()
        check_count(len(images), runtime.limits)
        t0 = time.perf_counter()

        def decode() -> np.ndarray:
            return np.stack([decode_image_msg(im, runtime, i) for i, im in enumerate(images)])

        encoded = any(im.WhichOneof("data") == "encoded" for im in images)
        pixels = await asyncio.to_thread(decode) if encoded else decode()
        metrics.DECODE_SECONDS.labels(PROTOCOL).observe(time.perf_counter() - t0)
        rows, _ = await model.classify(pixels, deadline_of(context, runtime), PROTOCOL, _top_k(top_k, runtime))
        return model, rows

    async def _classify_one(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        model, rows = await self._classify([request.image], request.top_k, context)
        return pb.ClassifyResponse(
            model=model.name,
            version=str(model.version.version),
            predictions=_predictions(rows[0]),
            request_id=request.request_id,
        )

    async def _classify_batch(
        self, request: pb.ClassifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyBatchResponse:
        model, rows = await self._classify(list(request.images), request.top_k, context)
        return pb.ClassifyBatchResponse(
            model=model.name,
            version=str(model.version.version),
            results=[pb.Classification(predictions=_predictions(r)) for r in rows],
        )

    async def Classify(self, request, context):
        return await unary_call(PROTOCOL, "Classify", self._classify_one, request, context)

    async def ClassifyBatch(self, request, context):
        return await unary_call(PROTOCOL, "ClassifyBatch", self._classify_batch, request, context)

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyResponse]:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            async for request in request_iterator:
                yield await self._classify_one(request, context)
        except Exception as e:
            err = to_rpc_error(e)
            code = err.code
            metrics.REJECTIONS.labels(PROTOCOL, err.reason).inc()
            await context.abort(err.code, str(err))
        finally:
            metrics.REQUEST_SECONDS.labels(PROTOCOL, "ClassifyStream", code.name).observe(time.perf_counter() - start)


async def unary_call(protocol: str, endpoint: str, fn: Callable, request, context: grpc.aio.ServicerContext):
    """Run a unary handler: request metrics, and every error as a status with a one-line message."""
    start = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        return await fn(request, context)
    except Exception as e:
        err = to_rpc_error(e)
        code = err.code
        metrics.REJECTIONS.labels(protocol, err.reason).inc()
        await context.abort(err.code, str(err))
    finally:
        metrics.REQUEST_SECONDS.labels(protocol, endpoint, code.name).observe(time.perf_counter() - start)


def create_server(
    runtime: Runtime, extra: Callable[[grpc.aio.Server], list[str]] | None = None
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    limit = runtime.settings.grpc_max_message_bytes
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    )
    pb_grpc.add_ClassifierServicer_to_server(ClassifierService(runtime), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [pb.DESCRIPTOR.services_by_name["Classifier"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME]
    if extra is not None:
        names += extra(server)
    reflection.enable_server_reflection(names, server)
    return server, health_servicer


async def set_health(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    await health_servicer.set("", status)
    await health_servicer.set(pb.DESCRIPTOR.services_by_name["Classifier"].full_name, status)
