"""Our own gRPC API: `quicknet.v1.Classifier` (Classify, ClassifyBatch, ClassifyStream).

Deadlines come from the call's own deadline; a cancelled call's queued images are dropped (the
awaiting task is cancelled, which cancels its batcher futures)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from quicknet.api._generated import classifier_pb2 as pb
from quicknet.api._generated import classifier_pb2_grpc as pb_grpc
from quicknet.serve import metrics, tracing
from quicknet.serve.classifier import check_top_k, model_choice
from quicknet.serve.errors import InputError
from quicknet.serve.images import check_count, decode_image, decode_pixels, image_label
from quicknet.serve.model import ModelHandle, Prediction
from quicknet.serve.runtime import Runtime
from quicknet.serve.transport.grpc import deadline_of, to_rpc_error, unary_call

PROTOCOL = "grpc"
_DECODE_SECONDS = metrics.DECODE_SECONDS.labels(PROTOCOL)  # looked up once


def decode_image_msg(image: pb.Image, runtime: Runtime, index: int = 0) -> np.ndarray:
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return decode_image(image.encoded, runtime.limits, index)
    if kind == "pixels":
        pixels = decode_pixels(image.pixels, runtime.limits)
        if len(pixels) != 1:
            raise InputError(f"{image_label(index)}: `pixels` holds {len(pixels)} images; send one per Image")
        return pixels[0]
    raise InputError(f"{image_label(index)} is empty: set `encoded` or `pixels`")


def _top_k(requested: int, runtime: Runtime) -> int:
    """The request's `top_k` (a uint32: 0 is not set, the server's default)."""
    return check_top_k(requested) if requested else runtime.settings.default_top_k


def _predictions(rows: list[Prediction]) -> list[pb.Prediction]:
    return [pb.Prediction(label=p.label, index=p.index, score=p.score) for p in rows]


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    async def _classify(
        self, images: list[pb.Image], top_k: int, context: grpc.aio.ServicerContext, name: str = "", version: str = ""
    ) -> tuple[ModelHandle, list[list[Prediction]]]:
        runtime = self.runtime
        model = runtime.serving(*model_choice(runtime, name, version))
        check_count(len(images), runtime.limits)
        t0 = time.perf_counter()

        def decode() -> np.ndarray:
            return np.stack([decode_image_msg(im, runtime, i) for i, im in enumerate(images)])

        encoded = any(im.WhichOneof("data") == "encoded" for im in images)
        with tracing.span("decode"):  # in a thread even when small, unlike REST: benchmarks/README.md
            pixels = await asyncio.to_thread(decode) if encoded else decode()  # ("gRPC, measured ...")
        _DECODE_SECONDS.observe(time.perf_counter() - t0)
        rows, _ = await model.classify(pixels, deadline_of(context, runtime), PROTOCOL, _top_k(top_k, runtime))
        return model, rows

    async def _classify_one(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        model, rows = await self._classify([request.image], request.top_k, context, request.model, request.version)
        return pb.ClassifyResponse(
            model=model.name,
            version=str(model.version),
            predictions=_predictions(rows[0]),
            request_id=request.request_id,
        )

    async def _classify_batch(
        self, request: pb.ClassifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyBatchResponse:
        check_count(len(request.images), self.runtime.limits)  # before millions of empty Images are copied out
        model, rows = await self._classify(list(request.images), request.top_k, context, request.model, request.version)
        return pb.ClassifyBatchResponse(
            model=model.name,
            version=str(model.version),
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
            metrics.rejected(PROTOCOL, err.reason)
            await context.abort(err.code, str(err))
        finally:
            metrics.request_done(PROTOCOL, "ClassifyStream", code.name, time.perf_counter() - start)


PROTO_FILE = pb.DESCRIPTOR
PUBLIC_METHODS: tuple[str, ...] = ()  # its health is the standard service's
SERVICE_NAMES = (pb.DESCRIPTOR.services_by_name["Classifier"].full_name,)


def add_to_server(server: grpc.aio.Server, runtime: Runtime) -> list[str]:
    pb_grpc.add_ClassifierServicer_to_server(ClassifierService(runtime), server)
    return list(SERVICE_NAMES)
