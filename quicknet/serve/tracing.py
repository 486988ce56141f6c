"""OpenTelemetry traces: one span per request on every front, with `decode`, `queue` and `infer`
children, W3C `traceparent` continued from the caller (REST headers, gRPC metadata), the
request id on the span. Off unless `--otlp-endpoint` is set (or a test installs a provider).

Why this shape:
- REST uses FastAPI's native telemetry (it opens the server span and continues `traceparent`);
  gRPC has no such layer, so `quicknet.serve.transport.grpc` opens its server span with `server_span`.
- The batcher may run in another process (`--workers`), and one batch serves many requests, so
  `queue` and `infer` are not live spans: each request records them afterwards from the `Timing`
  the batcher returns (queue wait, then input, infer, output), placed on the request's clock.
- Off, every helper is a constant-time no-op (no provider lookups per request): FastAPI's own
  telemetry, left to the global provider, cost ~10% of the loop at 1 image per request.
Exporting: OTLP over HTTP/protobuf (`/v1/traces`, e.g. Jaeger or an OpenTelemetry Collector on
4318), batched off the request path; spans are dropped, not queued without bound, if it is down.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import propagate, trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from quicknet.serve.batcher import Timing
    from quicknet.serve.config import Settings

_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None


def configure(settings: Settings) -> None:
    """Turn tracing on for this process when the settings name an OTLP endpoint."""
    if not settings.otlp_endpoint:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    endpoint = settings.otlp_endpoint.rstrip("/")
    if not endpoint.endswith("/v1/traces"):
        endpoint += "/v1/traces"
    resource = Resource.create({"service.name": settings.otlp_service_name, "service.instance.id": str(os.getpid())})
    provider = TracerProvider(resource=resource, sampler=ParentBasedTraceIdRatio(settings.trace_sample_ratio))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5)))
    install(provider)


def install(provider: TracerProvider | None) -> None:
    """Use `provider` for every span this process makes (None: tracing off). Tests install one
    with an in-memory exporter."""
    global _provider, _tracer
    _provider = provider
    _tracer = provider.get_tracer("quicknet") if provider is not None else None


def provider() -> TracerProvider | None:
    return _provider


def enabled() -> bool:
    return _tracer is not None


def shutdown() -> None:
    """Flush what is batched (at exit, after the drain)."""
    if _provider is not None:
        _provider.shutdown()


OFF = contextlib.nullcontext()  # shared: tracing off costs a request no allocation


def span(name: str, **attributes) -> contextlib.AbstractContextManager:
    """A child of the current request's span (no-op when tracing is off)."""
    if _tracer is None:
        return OFF
    return _tracer.start_as_current_span(name, attributes=attributes)


def set_request_id(request_id: str) -> None:
    if _tracer is not None:
        trace.get_current_span().set_attribute("quicknet.request_id", request_id)


def record_batching(started_ns: int, timing: Timing, images: int) -> None:
    """`queue` and `infer` children of the current span, from the batcher's account of a request
    submitted at `started_ns` (time.time_ns): queued, then its batch's input, infer and output."""
    if _tracer is None:
        return
    queued_end = started_ns + int(timing.queue_s * 1e9)
    _tracer.start_span("queue", start_time=started_ns, attributes={"quicknet.images": images}).end(queued_end)
    infer = _tracer.start_span("infer", start_time=queued_end, attributes={"quicknet.images": images})
    infer.set_attribute("quicknet.input_ms", round(timing.input_s * 1000, 3))
    infer.set_attribute("quicknet.output_ms", round(timing.output_s * 1000, 3))
    infer.end(queued_end + int((timing.input_s + timing.infer_s + timing.output_s) * 1e9))


def server_span(name: str, metadata: Mapping[str, str], **attributes) -> contextlib.AbstractContextManager:
    """The server span of a gRPC call, continuing the caller's `traceparent` from its metadata; it
    enters as the span, or as None when tracing is off."""
    if _tracer is None:
        return OFF
    return _tracer.start_as_current_span(
        name,
        context=propagate.extract(metadata),
        kind=trace.SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,  # an abort is how a status is sent: the caller sets the span's status
        set_status_on_exception=False,
    )
