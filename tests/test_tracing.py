"""Tracing, request ids and CORS on the real fronts.

In process (the SDK's in-memory exporter): every front's request is one server span continuing the
caller's `traceparent`, with `decode`, `queue` and `infer` children and the request id. Over a
real `quicknet serve --otlp-endpoint`: spans reach an OTLP/HTTP collector (a stub that decodes the
protobuf the exporter posts)."""

from __future__ import annotations

import asyncio
import http.server
import logging
import threading
import time
from typing import ClassVar

import grpc
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from benchmarks.fuzzing import MODEL, ZeroModel
from quicknet.api._generated import classifier_pb2 as pb
from quicknet.api._generated import classifier_pb2_grpc as pb_grpc
from quicknet.serve import tracing
from quicknet.serve.classifier import grpc as classifier_grpc
from quicknet.serve.classifier import rest as classifier_rest
from quicknet.serve.config import Settings
from quicknet.serve.kserve import grpc as kserve_grpc
from quicknet.serve.kserve import rest as kserve_rest
from quicknet.serve.logs import TextFormatter
from quicknet.serve.runtime import Runtime
from quicknet.serve.transport.app import create_app
from quicknet.serve.transport.grpc import create_server
from quicknet.testing import REPO, start_server

CAT = (REPO / "examples" / "cat.png").read_bytes()
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
ZEROS = [0] * 3072


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)
    provider.shutdown()


async def _with_service(call, **settings):
    """The real REST app and gRPC server over a model that answers zeros, in this event loop."""
    model = ZeroModel()
    model.batcher.start()
    runtime = Runtime(Settings(**settings))
    runtime.install([model], MODEL)
    server, _ = create_server(runtime, [classifier_grpc, kserve_grpc])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    app = create_app(runtime, [classifier_rest, kserve_rest])
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await call(client, f"127.0.0.1:{port}")
    finally:
        await server.stop(0)
        await model.batcher.close()


def _request_tree(exporter: InMemorySpanExporter, server_name: str) -> tuple:
    finished = exporter.get_finished_spans()
    (server,) = [
        s
        for s in finished
        if s.kind == SpanKind.SERVER and s.name == server_name and format(s.context.trace_id, "032x") == TRACE_ID
    ]
    children = {s.name: s for s in finished if s.parent is not None and s.parent.span_id == server.context.span_id}
    return server, children


def _assert_continues_the_caller(server, children) -> None:
    assert format(server.context.trace_id, "032x") == TRACE_ID, "the caller's trace"
    assert format(server.parent.span_id, "016x") == PARENT_ID, "a child of the caller's span"
    assert set(children) >= {"decode", "queue", "infer"}, sorted(children)
    queue, infer = children["queue"], children["infer"]
    assert queue.end_time <= infer.start_time <= infer.end_time <= server.end_time
    assert server.start_time <= children["decode"].start_time


@pytest.mark.parametrize(
    ("path", "kwargs", "name"),
    [
        ("/classify", {"content": CAT, "headers": {"content-type": "image/png"}}, "POST /classify"),
        (
            f"/v2/models/{MODEL}/infer",
            {
                "json": {
                    "inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0] * 3072}]
                }
            },
            "POST /v2/models/{name}/infer",
        ),
    ],
)
def test_a_rest_request_is_one_span_with_decode_queue_infer(spans, path, kwargs, name):
    async def call(client, _):
        body = {k: v for k, v in kwargs.items() if k != "headers"}
        headers = {**kwargs.get("headers", {}), "traceparent": TRACEPARENT, "x-request-id": "req-rest-1"}
        return await client.post(path, headers=headers, **body)

    reply = asyncio.run(_with_service(call, access_log=False))
    assert reply.status_code == 200, reply.text
    server, children = _request_tree(spans, name)
    _assert_continues_the_caller(server, children)
    assert server.attributes["quicknet.request_id"] == "req-rest-1"
    assert server.attributes["http.response.status_code"] == 200
    assert children["infer"].attributes["quicknet.images"] == 1


def test_probes_and_scrapes_are_not_traced(spans):
    async def call(client, _):
        return [(await client.get(p)).status_code for p in ("/healthz", "/readyz", "/metrics", "/openapi.json")]

    assert asyncio.run(_with_service(call)) == [200, 200, 200, 200]
    assert spans.get_finished_spans() == ()


def test_grpc_calls_are_spans_with_the_request_id_logged_and_returned(spans, caplog):
    metadata = (("traceparent", TRACEPARENT), ("x-request-id", "req-grpc-1"))

    async def call(_, target):
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            ok = stub.Classify(pb.ClassifyRequest(image=pb.Image(encoded=CAT)), metadata=metadata)
            await ok
            trailing = dict(await ok.trailing_metadata())
            bad = stub.Classify(pb.ClassifyRequest(image=pb.Image(encoded=b"not an image")))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await bad
            return trailing, refused.value, dict(await bad.trailing_metadata())

    with caplog.at_level(logging.INFO, "quicknet.access"):
        trailing, refused, refused_trailing = asyncio.run(_with_service(call, access_log=True))
    assert trailing["x-request-id"] == "req-grpc-1", "the caller's id comes back"
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(refused_trailing["x-request-id"]) == 32, "a call without one gets a new id"

    server, children = _request_tree(spans, "/quicknet.v1.Classifier/Classify")
    _assert_continues_the_caller(server, children)
    assert server.attributes["quicknet.request_id"] == "req-grpc-1"
    assert server.attributes["rpc.grpc.status_code"] == 0
    (failed,) = [s for s in spans.get_finished_spans() if s.attributes.get("rpc.grpc.status_code") == 3]
    assert failed.status.status_code == StatusCode.UNSET, "a client's bad input is not the server's error"

    lines = {r.request_id: r for r in caplog.records if r.name == "quicknet.access"}
    assert "req-grpc-1" in lines and lines["req-grpc-1"].status == "OK"
    assert "/quicknet.v1.Classifier/Classify OK" in lines["req-grpc-1"].getMessage()
    assert lines[refused_trailing["x-request-id"]].status == "INVALID_ARGUMENT"


def test_grpc_health_probes_get_an_id_but_no_span_and_no_log_line(spans, caplog):
    from quicknet.serve.kserve.grpc import pb as kpb
    from quicknet.serve.kserve.grpc import pb_grpc as kpb_grpc

    async def call(_, target):
        async with grpc.aio.insecure_channel(target) as channel:
            live = kpb_grpc.GRPCInferenceServiceStub(channel).ServerLive(kpb.ServerLiveRequest())
            await live
            return dict(await live.trailing_metadata())

    with caplog.at_level(logging.INFO, "quicknet.access"):
        trailing = asyncio.run(_with_service(call, access_log=True))
    assert len(trailing["x-request-id"]) == 32
    assert spans.get_finished_spans() == ()
    assert not [r for r in caplog.records if r.name == "quicknet.access"]


def test_kserve_grpc_infer_is_traced(spans):
    from quicknet.serve.kserve.grpc import pb as kpb
    from quicknet.serve.kserve.grpc import pb_grpc as kpb_grpc

    request = kpb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 3])
    request.raw_input_contents.append(np.zeros(3072, np.uint8).tobytes())

    async def call(_, target):
        async with grpc.aio.insecure_channel(target) as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            return await stub.ModelInfer(request, metadata=(("traceparent", TRACEPARENT),))

    assert asyncio.run(_with_service(call, access_log=False)).model_name == MODEL
    server, children = _request_tree(spans, "/inference.GRPCInferenceService/ModelInfer")
    _assert_continues_the_caller(server, children)


def test_tracing_off_records_nothing_and_leaves_fastapi_telemetry_off(monkeypatch):
    """Off (no --otlp-endpoint), nothing asks for a provider on a request, not even a global one an
    embedding application might have set: FastAPI's own telemetry is off too."""
    from opentelemetry import trace

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)  # what a global provider would answer
    assert not tracing.enabled()

    async def call(client, target):
        rest = await client.post("/classify", content=CAT, headers={"content-type": "image/png"})
        async with grpc.aio.insecure_channel(target) as channel:
            await pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(image=pb.Image(encoded=CAT)))
        return rest.status_code, client._transport.app

    status, app = asyncio.run(_with_service(call, access_log=False))
    assert status == 200 and exporter.get_finished_spans() == ()
    assert app._telemetry["tracing"] is False


def test_text_logs_end_with_the_request_id():
    record = logging.LogRecord("quicknet.access", logging.INFO, __file__, 1, "POST /classify 200", (), None)
    assert TextFormatter().format(record).endswith("POST /classify 200")
    record.request_id = "req-9"
    assert TextFormatter().format(record).endswith("POST /classify 200 request_id=req-9")


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint: keeps the span names of every ExportTraceServiceRequest posted."""

    names: ClassVar[list[str]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/v1/traces":
            request = ExportTraceServiceRequest.FromString(body)
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    type(self).names += [s.name for s in scope.spans]
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_serve_exports_spans_to_an_otlp_endpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(_Collector, "names", [])
    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    srv = start_server(tmp_path, otlp_endpoint=endpoint, warmup="false")
    try:
        reply = httpx.post(f"{srv.url}/classify", content=CAT, headers={"content-type": "image/png"})
        assert reply.status_code == 200
        assert srv.stop() == 0, srv.log()  # the exporter flushes on shutdown
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "infer" not in _Collector.names:
            time.sleep(0.1)
    finally:
        if srv.proc.poll() is None:
            srv.stop()
        collector.shutdown()
        collector.server_close()
    assert {"POST /classify", "decode", "queue", "infer"} <= set(_Collector.names), _Collector.names


def _cors_client(tmp_path, **settings) -> TestClient:
    runtime = Runtime(Settings(**settings))
    return TestClient(create_app(runtime, [classifier_rest, kserve_rest]))


def test_cors_lets_the_listed_origins_in_before_the_key_check(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("cors-test-key-0123456789\n")
    preflight = {
        "origin": "https://app.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    with _cors_client(tmp_path, cors_origins=["https://app.example"], api_keys_file=keys) as client:
        allowed = client.options("/classify", headers=preflight)
        assert allowed.status_code == 200, "a preflight carries no key and is not refused for it"
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        other = client.options("/classify", headers={**preflight, "origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        answer = client.get("/v1/models", headers={"origin": "https://app.example"})
        assert answer.status_code == 401 and answer.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()


def test_no_cors_headers_unless_origins_are_set(tmp_path):
    with _cors_client(tmp_path) as client:
        reply = client.options(
            "/classify", headers={"origin": "https://app.example", "access-control-request-method": "POST"}
        )
        assert "access-control-allow-origin" not in reply.headers


def test_an_otlp_endpoint_that_is_not_a_url_stops_serve_in_one_line():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "quicknet", "serve", "--otlp-endpoint", "collector:4318"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: invalid setting otlp_endpoint: 'collector:4318' is not an http(s)://")
    assert out.stderr.count("\n") == 1
