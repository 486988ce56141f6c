"""gRPC plumbing for every gRPC front: the grpc.aio server (message limits, health, reflection,
API keys, TLS), refusals as status codes, deadlines from the call, and call metrics.

A front is a module that declares what `transport.base.GrpcFront` names (its protocol tag, service
names, .proto file, public methods, and `add_to_server(server, runtime) -> [service names]`). The standard health
service answers for every one of those names (and for "", the whole server): SERVING only while
the runtime takes work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from quicknet.serve import metrics, tracing
from quicknet.serve.auth import ApiKeys
from quicknet.serve.errors import API_KEY_MISSING, InputError, Refusal, Unauthenticated, clip
from quicknet.serve.runtime import Runtime
from quicknet.serve.transport import access
from quicknet.serve.transport import request_id as new_request_id
from quicknet.serve.transport.base import GrpcFront

log = logging.getLogger("quicknet.grpc")
INTERNAL_ERROR = "internal error; the server log has the details"  # REST's 500 says the same

MAX_ERROR_CHARS = 1000  # the status message travels in a header: what it echoes must stay small


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, reason: str):
        super().__init__(clip(message, MAX_ERROR_CHARS))
        self.code, self.reason = code, reason


def to_rpc_error(e: Exception) -> RpcError:
    """Any exception as a gRPC status: a refusal by its kind's table entry, anything else an internal error."""
    if isinstance(e, RpcError):
        return e
    if isinstance(e, Refusal):  # status, message and reason come from its kind (`errors`)
        return RpcError(grpc.StatusCode[e.grpc_code], e.rpc_message(), e.reason)
    # a bug, not a refusal: the log gets the traceback, the client one line without paths or names
    log.exception("unhandled error in a gRPC call")
    return RpcError(grpc.StatusCode.INTERNAL, INTERNAL_ERROR, "internal")


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
        headers = e.headers() if isinstance(e, Refusal) else {}  # REST's Retry-After, as trailing metadata
        if headers:
            extra = tuple((k.lower(), v) for k, v in headers.items())
            context.set_trailing_metadata((*(context.trailing_metadata() or ()), *extra))
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


UNAUTHENTICATED = Unauthenticated(API_KEY_MISSING).rpc_message()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """API keys on every method but the open ones: UNAUTHENTICATED before the request is even
    deserialized. Unknown methods pass through (the server answers UNIMPLEMENTED)."""

    def __init__(
        self, keys: ApiKeys, open_methods: frozenset[str], protocols: dict[str, str], log_requests: bool = False
    ):
        self.keys = keys
        self.open_methods = open_methods
        self.protocols = protocols  # service name -> metrics tag
        self.log_requests = log_requests  # a refusal gets its request id and log line, as on REST

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

        async def refuse_stream(requests, context):  # an async generator, as `_observe` iterates it
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
            yield  # never reached

        # the same kind of handler, its request left undecoded (no deserializer: raw bytes, unread)
        if handler.request_streaming and handler.response_streaming:
            refusal = grpc.stream_stream_rpc_method_handler(refuse_stream)
        elif handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        elif handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        else:
            refusal = grpc.unary_unary_rpc_method_handler(refuse)
        return _observe(refusal, service, method, self.log_requests)


class Undecodable(InputError):
    """The request bytes are not the method's protobuf message."""


def _guard(handler: grpc.RpcMethodHandler, protocol: str, method: str) -> grpc.RpcMethodHandler:
    """`handler`, decoding its requests itself: bytes that are not the method's message are
    INVALID_ARGUMENT with one line (grpc's own decoding answers UNKNOWN with the exception's class).
    Unary and stream-stream handlers (every method our fronts have); others are left as they are."""
    decode = handler.request_deserializer
    if decode is None or handler.request_streaming != handler.response_streaming:
        return handler
    message = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
    what = f"a valid {message.full_name} message" if message is not None else "a valid request message"

    def parse(raw: bytes):
        try:
            return decode(raw)
        except Exception:
            raise Undecodable(f"the request is not {what}") from None

    if not handler.request_streaming:
        original = handler.unary_unary

        async def unary(raw: bytes, context: grpc.aio.ServicerContext):
            try:
                request = parse(raw)
            except Undecodable as e:
                metrics.rejected(protocol, e.reason)
                metrics.request_done(protocol, method, grpc.StatusCode.INVALID_ARGUMENT.name, 0.0)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return await original(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=handler.response_serializer)

    original_stream = handler.stream_stream

    async def decoded(raw_requests):
        async for raw in raw_requests:
            yield parse(raw)

    async def stream(raw_requests, context: grpc.aio.ServicerContext):
        try:
            async for reply in original_stream(decoded(raw_requests), context):
                yield reply
        except Undecodable as e:  # a servicer that lets it through (one that catches it aborts itself)
            metrics.rejected(protocol, e.reason)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    return grpc.stream_stream_rpc_method_handler(stream, response_serializer=handler.response_serializer)


access_log = logging.getLogger("quicknet.access")


# Server-side failures, which mark a server span ERROR (OpenTelemetry's gRPC conventions); a
# client's bad request or a refusal is not the server's error.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _details(context: grpc.aio.ServicerContext) -> str | None:
    """The status message the call ended with (what an abort set), for the access log."""
    try:
        details = context.details()
    except Exception:  # not every grpc release has it on aio contexts
        return None
    return details.decode(errors="replace") if isinstance(details, bytes) else details


def _observe(
    handler: grpc.RpcMethodHandler, service: str, method: str, log_requests: bool, quiet: bool = False
) -> grpc.RpcMethodHandler:
    """`handler`, with REST's request id (the caller's `x-request-id` metadata, or a new one, sent
    back in the trailing metadata), one access-log line per call, and the call's server span
    (continuing the caller's `traceparent`) when tracing is on; `quiet` (health probes): the id
    only, as REST's probes are neither traced nor worth a log line each. Unary and stream-stream."""
    if handler.request_streaming != handler.response_streaming:
        return handler
    name = f"/{service}/{method}"
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    log_requests = log_requests and not quiet

    @contextlib.contextmanager
    def observed(context: grpc.aio.ServicerContext) -> Iterator[None]:
        metadata = dict(context.invocation_metadata() or ())
        incoming = metadata.get("x-request-id", "")
        request_id, start = new_request_id(incoming if isinstance(incoming, str) else ""), time.perf_counter()
        context.set_trailing_metadata((("x-request-id", request_id),))
        code = grpc.StatusCode.OK
        record, token = access.begin() if log_requests else (None, None)
        with tracing.server_span(name, metadata, **attributes) if not quiet else tracing.OFF as span:
            tracing.set_request_id(request_id)
            try:
                yield
                code = context.code() or grpc.StatusCode.OK
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:  # an abort (the status it set) or a bug
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                if span is not None:
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code in _SERVER_ERRORS:
                        span.set_status(tracing.trace.Status(tracing.trace.StatusCode.ERROR, code.name))
                if record is not None:
                    access.end(token)
                    elapsed_ms = (time.perf_counter() - start) * 1000
                    failed = code != grpc.StatusCode.OK
                    tail = access.fields(
                        record, access.grpc_client(context.peer()), failed, _details(context) if failed else None
                    )
                    extra = {"request_id": request_id, "status": code.name, "duration_ms": round(elapsed_ms, 2), **tail}
                    line = access.describe(tail)
                    access_log.info("gRPC %s %s %.1fms %s", name, code.name, elapsed_ms, line, extra=extra)

    if not handler.request_streaming:
        original = handler.unary_unary

        async def unary(request, context: grpc.aio.ServicerContext):
            with observed(context):
                return await original(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

    original_stream = handler.stream_stream

    async def stream(requests, context: grpc.aio.ServicerContext):
        with observed(context):
            async for reply in original_stream(requests, context):
                yield reply

    return grpc.stream_stream_rpc_method_handler(
        stream, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class Registrar:
    """What a front's `add_to_server` gets instead of the server: the generated `add_*_to_server`
    registers its method handlers through it, and they are guarded (`_guard`) and observed
    (`_observe`: request id, access log, span) once, at start-up. `quiet`: the front's health
    methods (full names), observed without a span or a log line."""

    def __init__(
        self, server: grpc.aio.Server, protocol: str, log_requests: bool = False, quiet: frozenset[str] = frozenset()
    ):
        self.server = server
        self.protocol = protocol
        self.log_requests = log_requests
        self.quiet = quiet
        self._generic: list = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._generic.extend(handlers)  # replaced by the guarded table in add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        guarded = {
            name: _observe(
                _guard(h, self.protocol, name), service, name, self.log_requests, f"/{service}/{name}" in self.quiet
            )
            for name, h in handlers.items()
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        self.server.add_registered_method_handlers(service, guarded)
        self._generic.clear()

    def finish(self) -> None:
        """Anything registered only generically (older generated code) is added as it was."""
        if self._generic:
            self.server.add_generic_rpc_handlers(tuple(self._generic))


def _interceptors(runtime: Runtime, fronts: Sequence[GrpcFront]) -> list[grpc.aio.ServerInterceptor]:
    settings = runtime.settings
    if settings.api_keys_file is None:
        return []
    open_methods: set[str] = set()
    if settings.open_health_endpoints:
        health_methods = health_pb2.DESCRIPTOR.services_by_name["Health"].methods
        open_methods |= {f"/{health.SERVICE_NAME}/{m.name}" for m in health_methods}
        open_methods |= {m for front in fronts for m in front.PUBLIC_METHODS}
    protocols = {name: front.PROTOCOL for front in fronts for name in front.SERVICE_NAMES}
    keys = ApiKeys(settings.api_keys_file, settings.admin_api_keys_file)  # admin keys work everywhere
    return [AuthInterceptor(keys, frozenset(open_methods), protocols, log_requests=settings.access_log)]


def _reflection_pool(fronts: Sequence[GrpcFront]) -> descriptor_pool.DescriptorPool:
    """Every service's .proto file in one pool, for reflection (grpcurl, Postman): the KServe stubs
    keep a pool of their own (quicknet/api/protos.py says why), so protobuf's default one lacks them."""
    pool = descriptor_pool.DescriptorPool()
    for file in (*(front.PROTO_FILE for front in fronts), health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        pool.AddSerializedFile(file.serialized_pb)
    return pool


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


def server_options(settings) -> list[tuple[str, int]]:
    """The grpc.aio server's channel arguments: message limits, shared ports, connection lifetimes."""
    limit = settings.grpc_max_message_bytes
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 1 if settings.front_workers > 1 else 0),  # auto resolves here too
    ]
    # gRPC core keeps a connection as long as the client does: an idle one holds a front's memory
    # and file descriptor for ever, and a busy one pins its client to this replica (a client
    # re-resolves and spreads its calls only when it reconnects: deploy/README.md, gRPC and load
    # balancing). Both limits end a connection with GOAWAY, which a channel follows by reconnecting.
    if settings.grpc_idle_timeout_s > 0:
        options.append(("grpc.max_connection_idle_ms", int(settings.grpc_idle_timeout_s * 1000)))
    if settings.grpc_max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age_s * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", int(settings.default_timeout_ms)))
    return options


def create_server(runtime: Runtime, fronts: Sequence[GrpcFront]) -> tuple[grpc.aio.Server, Health]:
    server = grpc.aio.server(interceptors=_interceptors(runtime, fronts), options=server_options(runtime.settings))
    names = []
    for front in fronts:
        quiet = frozenset(front.PUBLIC_METHODS)
        registrar = Registrar(server, front.PROTOCOL, log_requests=runtime.settings.access_log, quiet=quiet)
        names += front.add_to_server(registrar, runtime)
        registrar.finish()
    service_health = Health(server, names)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server, pool=_reflection_pool(fronts)
    )
    return server, service_health
