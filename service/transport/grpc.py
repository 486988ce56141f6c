"""gRPC plumbing for every gRPC front: the grpc.aio server (message limits, health, reflection),
refusals as status codes, deadlines from the call, and call metrics.

A front is a module with `PROTOCOL` (its metrics tag), `SERVICE_NAMES`, `add_to_server(server,
runtime) -> [service names]` and optionally `PUBLIC_METHODS` (health methods that answer without an API key).
The standard health service answers for every one of those names (and for "", the whole server):
SERVING only while the runtime takes work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from types import ModuleType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import metrics
from service.auth import ApiKeys
from service.batcher import DeadlineExceeded, NotAccepting, QueueFull
from service.images import InputError
from service.runtime import ModelNotFound, RepositoryError, Runtime

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
    """Every refusal the service can make, as a gRPC status (the HTTP twin is `transport.http.refusal_to_http`)."""
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
    if isinstance(e, RepositoryError):
        return RpcError(grpc.StatusCode.FAILED_PRECONDITION, str(e), "repository")
    return RpcError(grpc.StatusCode.INTERNAL, f"inference failed: {e}", "engine_error")


DEADLINE_MARGIN_S = 0.02


def deadline_of(context: grpc.aio.ServicerContext, runtime: Runtime) -> float:
    """The call's deadline, a little early (10% of what is left, at most 20 ms): the server gives up
    first, so the client hears the server's DEADLINE_EXCEEDED (and its metrics count it) instead of
    both sides racing to cancel at the same instant."""
    remaining = context.time_remaining()
    if remaining is None:
        return runtime.deadline_from_timeout_ms(None)
    return time.monotonic() + remaining - min(DEADLINE_MARGIN_S, 0.1 * remaining)


async def unary_call(protocol: str, endpoint: str, fn: Callable, request, context: grpc.aio.ServicerContext):
    """Run a unary handler: request metrics, every error as a status with a one-line message, and
    one rejection count per failed call (a cancelled call counts as `cancelled`)."""
    start = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        return await fn(request, context)
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        metrics.rejected(protocol, "cancelled")
        raise
    except Exception as e:
        err = to_rpc_error(e)
        code = err.code
        metrics.rejected(protocol, err.reason)
        await context.abort(err.code, str(err))
    finally:
        metrics.request_done(protocol, endpoint, code.name, time.perf_counter() - start)


class Health:
    """The standard health service for the server ("") and every front's service names."""

    def __init__(self, server: grpc.aio.Server, names: list[str]):
        self.servicer = health.aio.HealthServicer()
        self.names = ["", *names]
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.names:
            await self.servicer.set(name, status)


UNAUTHENTICATED = "missing or invalid API key (send authorization: Bearer <key> metadata)"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """API keys on every method but the open ones: UNAUTHENTICATED before the request is even
    deserialized. Unknown methods pass through (the server answers UNIMPLEMENTED)."""

    def __init__(self, keys: ApiKeys, open_methods: frozenset[str], protocols: dict[str, str]):
        self.keys = keys
        self.open_methods = open_methods
        self.protocols = protocols  # service name -> metrics tag

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method in self.open_methods:
            return await continuation(details)
        authorization = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if self.keys.allows(authorization if isinstance(authorization, str) else None):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        service, _, method = details.method.strip("/").partition("/")
        protocol = self.protocols.get(service, "grpc")
        metrics.rejected(protocol, "unauthenticated")
        metrics.request_done(protocol, method, grpc.StatusCode.UNAUTHENTICATED.name, 0.0)

        async def refuse(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)

        # the same kind of handler, its request left undecoded (no deserializer: raw bytes, unread)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


def _interceptors(runtime: Runtime, fronts: Sequence[ModuleType]) -> list[grpc.aio.ServerInterceptor]:
    settings = runtime.settings
    if settings.api_keys_file is None:
        return []
    open_methods: set[str] = set()
    if settings.open_health_endpoints:
        health_methods = health_pb2.DESCRIPTOR.services_by_name["Health"].methods
        open_methods |= {f"/{health.SERVICE_NAME}/{m.name}" for m in health_methods}
        open_methods |= {m for front in fronts for m in getattr(front, "PUBLIC_METHODS", ())}
    protocols = {name: front.PROTOCOL for front in fronts for name in front.SERVICE_NAMES}
    return [AuthInterceptor(ApiKeys(settings.api_keys_file), frozenset(open_methods), protocols)]


def credentials(settings) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port from the same files as REST (client certificates required with a client CA)."""
    if not settings.tls:
        return None
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def create_server(runtime: Runtime, fronts: Sequence[ModuleType]) -> tuple[grpc.aio.Server, Health]:
    limit = runtime.settings.grpc_max_message_bytes
    server = grpc.aio.server(
        interceptors=_interceptors(runtime, fronts),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 1 if runtime.settings.workers > 1 else 0),
        ],
    )
    names = [name for front in fronts for name in front.add_to_server(server, runtime)]
    service_health = Health(server, names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server, service_health
