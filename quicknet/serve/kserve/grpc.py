"""Open Inference Protocol over gRPC: `inference.GRPCInferenceService` with Triton's additions.

Our stubs come from `proto/kserve/grpc_predict_v2.proto` (the published package, service and field
numbers). They and `tritonclient`'s register the same `inference.*` names in protobuf's default
pool, so one process can hold one or the other, not both: the server never imports tritonclient.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from quicknet.api._generated import grpc_predict_v2_pb2 as pb
from quicknet.api._generated import grpc_predict_v2_pb2_grpc as pb_grpc
from quicknet.serve import metrics, tracing
from quicknet.serve.errors import InputError
from quicknet.serve.kserve import (
    EXTENSIONS,
    OUTPUT,
    SERVER_NAME,
    SERVER_VERSION,
    classification,
    decode_input,
    model_config,
    model_metadata,
    model_statistics,
    serialize_bytes_tensor,
)
from quicknet.serve.model import ModelHandle
from quicknet.serve.runtime import Runtime, check_model_name
from quicknet.serve.transport.grpc import deadline_of, to_rpc_error, unary_call

PROTOCOL = "kserve-grpc"
_DECODE_SECONDS = metrics.DECODE_SECONDS.labels(PROTOCOL)  # looked up once, not a request
PROTO_FILE = pb.DESCRIPTOR
SERVICE_NAMES = (pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,)
PUBLIC_METHODS = tuple(f"/{SERVICE_NAMES[0]}/{m}" for m in ("ServerLive", "ServerReady"))  # health: no API key

_TYPED_FIELDS = {"UINT8": "uint_contents", "BYTES": "bytes_contents"}


def _param(params, key: str):
    if key not in params:
        return None
    p = params[key]
    return getattr(p, p.WhichOneof("parameter_choice")) if p.WhichOneof("parameter_choice") else None


def _images(request: pb.ModelInferRequest, runtime: Runtime) -> np.ndarray:
    if len(request.inputs) != 1:
        raise InputError(f"expected one input tensor ('images'), got {len(request.inputs)}")
    tensor = request.inputs[0]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InputError("raw_input_contents must hold exactly one entry per input")
        return decode_input(
            tensor.name, tensor.datatype, list(tensor.shape), runtime.limits, raw=request.raw_input_contents[0]
        )
    field = _TYPED_FIELDS.get(tensor.datatype)
    values = getattr(tensor.contents, field) if field else []  # counted before copied (12 M entries took ~0.6 s)
    return decode_input(tensor.name, tensor.datatype, list(tensor.shape), runtime.limits, values=values)


def _response(request: pb.ModelInferRequest, mr: ModelHandle, logits: np.ndarray) -> pb.ModelInferResponse:
    reply = pb.ModelInferResponse(model_name=mr.name, model_version=str(mr.version), id=request.id)
    wanted = list(request.outputs) or [pb.ModelInferRequest.InferRequestedOutputTensor(name=OUTPUT)]
    for out in wanted:
        if out.name != OUTPUT:
            raise InputError(f"unknown output {out.name[:40]!r}: have {OUTPUT!r}")
        k = _param(out.parameters, "classification")
        if k is not None:
            if not isinstance(k, int) or isinstance(k, bool):
                raise InputError("the classification parameter must be an int64_param")
            rows = classification(logits, k, mr.labels)
            reply.outputs.add(name=OUTPUT, datatype="BYTES", shape=[len(rows), k])
            reply.raw_output_contents.append(serialize_bytes_tensor([s for row in rows for s in row]))
        else:
            reply.outputs.add(name=OUTPUT, datatype="FP32", shape=list(logits.shape))
            reply.raw_output_contents.append(np.ascontiguousarray(logits, dtype="<f4").tobytes())
    return reply


def _repository_action(runtime: Runtime, context: grpc.aio.ServicerContext, name: str) -> str:
    """Load and unload: an admin key when keys are in force, then a model name (INVALID_ARGUMENT)."""
    metadata = context.invocation_metadata() or ()
    authorization = next((v for k, v in metadata if k == "authorization" and isinstance(v, str)), None)
    runtime.repository_guard.check(authorization)
    return check_model_name(name)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.runtime.live)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.runtime.accepting)

    async def ModelReady(self, request, context):
        async def run(request, context):
            self.runtime.get(request.name, request.version)
            return pb.ModelReadyResponse(ready=self.runtime.accepting)

        return await unary_call(PROTOCOL, "ModelReady", run, request, context)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        async def run(request, context):
            meta = model_metadata(self.runtime.get(request.name, request.version), self.runtime)
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
            )

        return await unary_call(PROTOCOL, "ModelMetadata", run, request, context)

    async def ModelConfig(self, request, context):
        async def run(request, context):
            c = model_config(self.runtime.get(request.name, request.version))
            config = pb.ModelConfig(
                name=c["name"],
                platform=c["platform"],
                backend=c["backend"],
                max_batch_size=c["max_batch_size"],
                input=[
                    pb.ModelInput(
                        name=i["name"], data_type=pb.TYPE_UINT8, format=pb.ModelInput.FORMAT_NHWC, dims=i["dims"]
                    )
                    for i in c["input"]
                ],
                output=[pb.ModelOutput(name=o["name"], data_type=pb.TYPE_FP32, dims=o["dims"]) for o in c["output"]],
                dynamic_batching=pb.ModelDynamicBatching(**c["dynamic_batching"]),
                instance_group=[
                    pb.ModelInstanceGroup(name=g["name"], count=g["count"], kind=pb.ModelInstanceGroup.KIND_CPU)
                    for g in c["instance_group"]
                ],
            )
            return pb.ModelConfigResponse(config=config)

        return await unary_call(PROTOCOL, "ModelConfig", run, request, context)

    async def ModelStatistics(self, request, context):
        async def run(request, context):
            reply = pb.ModelStatisticsResponse()
            for m in self.runtime.select(request.name, request.version):
                s = await model_statistics(m)
                stats = reply.model_stats.add(
                    name=s["name"],
                    version=s["version"],
                    last_inference=s["last_inference"],
                    inference_count=s["inference_count"],
                    execution_count=s["execution_count"],
                )
                for key, value in s["inference_stats"].items():
                    getattr(stats.inference_stats, key).CopyFrom(pb.StatisticDuration(**value))
                for b in s["batch_stats"]:
                    stats.batch_stats.add(
                        batch_size=b["batch_size"],
                        compute_input=pb.StatisticDuration(**b["compute_input"]),
                        compute_infer=pb.StatisticDuration(**b["compute_infer"]),
                        compute_output=pb.StatisticDuration(**b["compute_output"]),
                    )
            return reply

        return await unary_call(PROTOCOL, "ModelStatistics", run, request, context)

    async def RepositoryIndex(self, request, context):
        async def run(request, context):
            rows = await self.runtime.repository.index(request.ready)
            return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

        return await unary_call(PROTOCOL, "RepositoryIndex", run, request, context)

    async def RepositoryModelLoad(self, request, context):
        async def run(request, context):
            await self.runtime.repository.load(_repository_action(self.runtime, context, request.model_name))
            return pb.RepositoryModelLoadResponse()

        return await unary_call(PROTOCOL, "RepositoryModelLoad", run, request, context)

    async def RepositoryModelUnload(self, request, context):
        async def run(request, context):
            await self.runtime.repository.unload(_repository_action(self.runtime, context, request.model_name))
            return pb.RepositoryModelUnloadResponse()

        return await unary_call(PROTOCOL, "RepositoryModelUnload", run, request, context)

    async def _infer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        runtime = self.runtime
        mr = runtime.serving(request.model_name, request.model_version)
        t0 = time.perf_counter()
        encoded = any(t.datatype == "BYTES" for t in request.inputs)
        with tracing.span("decode"):
            images = await asyncio.to_thread(_images, request, runtime) if encoded else _images(request, runtime)
        _DECODE_SECONDS.observe(time.perf_counter() - t0)
        logits, _ = await mr.run(images, deadline_of(context, runtime), PROTOCOL)
        return _response(request, mr, logits)

    async def ModelInfer(self, request, context):
        return await unary_call(PROTOCOL, "ModelInfer", self._infer, request, context)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton semantics: a failed request yields an error_message and the stream goes on."""
        async for request in request_iterator:
            start = time.perf_counter()
            try:
                reply = await self._infer(request, context)
            except Exception as e:
                err = to_rpc_error(e)
                metrics.rejected(PROTOCOL, err.reason)
                metrics.request_done(PROTOCOL, "ModelStreamInfer", err.code.name, time.perf_counter() - start)
                yield pb.ModelStreamInferResponse(error_message=str(err))
                continue
            metrics.request_done(PROTOCOL, "ModelStreamInfer", "OK", time.perf_counter() - start)
            yield pb.ModelStreamInferResponse(infer_response=reply)


def add_to_server(server: grpc.aio.Server, runtime: Runtime) -> list[str]:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(runtime), server)
    return list(SERVICE_NAMES)
