"""gRPC transport (grpc and grpc.aio): one `Send` step becomes one `ClassifyBatch` call on
`quicknet.v1.Classifier`, each image `encoded` or `pixels` as it came. The deadline is the call's
own; the server's `retry-after` trailing metadata (sent with RESOURCE_EXHAUSTED) is read like
REST's Retry-After header. Status codes are given their HTTP twin so callers test one number."""

from __future__ import annotations

import contextlib

import grpc

from quicknet.api._generated import classifier_pb2 as pb
from quicknet.api._generated import classifier_pb2_grpc as pb_grpc
from quicknet.client.endpoint import NOBODY_LISTENS, Endpoint
from quicknet.client.plan import Send, check_choice
from quicknet.client.results import Prediction, QuickNetClientError, Result

C = grpc.StatusCode
HTTP_STATUS = {
    C.INVALID_ARGUMENT: 400,
    C.FAILED_PRECONDITION: 400,
    C.OUT_OF_RANGE: 400,
    C.UNAUTHENTICATED: 401,
    C.PERMISSION_DENIED: 403,
    C.NOT_FOUND: 404,
    C.ALREADY_EXISTS: 409,
    C.ABORTED: 409,
    C.RESOURCE_EXHAUSTED: 429,
    C.CANCELLED: 499,
    C.UNKNOWN: 500,
    C.INTERNAL: 500,
    C.DATA_LOSS: 500,
    C.UNIMPLEMENTED: 501,
    C.UNAVAILABLE: 503,
    C.DEADLINE_EXCEEDED: 504,
}
# The server's own limit is 16 MiB each way; answers are small, but never refuse one for its size.
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", -1)]


def _request(step: Send) -> pb.ClassifyBatchRequest:
    images = [pb.Image(**{p.kind: p.data}) for p in step.payloads]
    return pb.ClassifyBatchRequest(
        images=images, top_k=step.top_k or 0, model=step.model or "", version=str(step.version or "")
    )


def _results(reply: pb.ClassifyBatchResponse, step: Send) -> list[Result]:
    """Scores are float32 on the wire; rounded to 6 places as REST sends them, so both transports
    give equal Results for the same image."""
    check_choice(step, reply.model, reply.version)
    return [
        Result(
            tuple(Prediction(p.label, p.index, round(p.score, 6)) for p in c.predictions), reply.model, reply.version
        )
        for c in reply.results
    ]


def rpc_error(target: str, error: grpc.RpcError, tls: bool = False) -> QuickNetClientError:
    code = error.code()
    details = " ".join((error.details() or "").split())
    retry_after = None
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after":
            with contextlib.suppress(ValueError):
                retry_after = max(0.0, float(value))
    if code == C.RESOURCE_EXHAUSTED and "larger than max" in details:  # a message over a size limit
        return QuickNetClientError(413, details, grpc_code=code.name)
    if code == C.UNAVAILABLE and "connect" in details.lower():  # nobody answered, as REST's ConnectError
        message = f"cannot reach {target}: {details}"
        if details.endswith("Socket closed"):  # it accepted, then closed: it wanted (or spoke) something else
            message += (
                ": if the server asks for a client certificate (mutual TLS), give one with --cert and --key"
                if tls
                else ": if the server uses TLS, grpcs://host:port"
            )
        elif "refused" in details.lower():
            message += f": {NOBODY_LISTENS}"
        elif "http1.x server" in details or "Failed parsing HTTP/2" in details:  # grpc-core's words for it
            message += (
                ": it answers HTTP/1.1, not gRPC: if that is the REST port (8000 by default), use the gRPC "
                "port (8001 by default), or http://host:port for REST"
            )
            return QuickNetClientError(None, message, grpc_code=code.name)  # another try meets the same port
        return QuickNetClientError(None, message, grpc_code=code.name, retryable=True)
    return QuickNetClientError(
        HTTP_STATUS.get(code, 500),
        details or code.name,
        grpc_code=code.name,
        retry_after=retry_after,
        retryable=code in (C.RESOURCE_EXHAUSTED, C.UNAVAILABLE),
    )


class GrpcTransport:
    def __init__(self, endpoint: Endpoint):
        self.target = endpoint.url
        self.tls = endpoint.tls
        self._metadata = endpoint.metadata()
        if endpoint.tls:
            self._channel = grpc.secure_channel(endpoint.url, endpoint.grpc_credentials(), OPTIONS)
        else:
            self._channel = grpc.insecure_channel(endpoint.url, OPTIONS)
        self._stub = pb_grpc.ClassifierStub(self._channel)

    def send(self, step: Send) -> list[Result]:
        try:
            reply = self._stub.ClassifyBatch(_request(step), timeout=step.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise rpc_error(self.target, e, self.tls) from None
        return _results(reply, step)

    def close(self) -> None:
        self._channel.close()


class AsyncGrpcTransport:
    """grpc.aio binds a channel to the running event loop: it is made at the first call."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self.target = endpoint.url
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.ClassifierStub | None = None
        if endpoint.tls:
            self._credentials = endpoint.grpc_credentials()

    def _connect(self) -> pb_grpc.ClassifierStub:
        if self._stub is None:
            e = self.endpoint
            if e.tls:
                self._channel = grpc.aio.secure_channel(e.url, self._credentials, OPTIONS)
            else:
                self._channel = grpc.aio.insecure_channel(e.url, OPTIONS)
            self._stub = pb_grpc.ClassifierStub(self._channel)
        return self._stub

    async def send(self, step: Send) -> list[Result]:
        stub = self._connect()
        try:
            reply = await stub.ClassifyBatch(_request(step), timeout=step.timeout, metadata=self.endpoint.metadata())
        except grpc.RpcError as e:
            raise rpc_error(self.target, e, self.endpoint.tls) from None
        return _results(reply, step)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
