"""What the service does when its engine, or its own code, fails: that request gets a one-line
500 / INTERNAL with the reason, the connection stays usable, and the next request is served."""

from __future__ import annotations

import asyncio
import re
import socket
import threading

import grpc
import httpx
import pytest
import uvicorn
from fastapi import APIRouter

from quicknet.api._generated import classifier_pb2 as pb
from quicknet.api._generated import classifier_pb2_grpc as pb_grpc
from quicknet.serve.config import Settings
from quicknet.serve.runtime import Runtime
from quicknet.serve.transport.app import create_app
from quicknet.testing import metric, start_server

RAW = {"Content-Type": "application/octet-stream"}


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "engine-process"])
def test_a_failing_batch_fails_only_its_requests(tmp_path, workers):
    srv = start_server(tmp_path, workers=workers, fault_injection="fail-every=2")
    try:
        with httpx.Client(base_url=srv.url) as client:  # one keep-alive connection throughout
            first = client.post("/classify", content=bytes(3072), headers=RAW)
            failed = client.post("/classify", content=bytes(3072), headers=RAW)
            third = client.post("/classify", content=bytes(3072), headers=RAW)
        assert first.status_code == 200 and third.status_code == 200
        assert failed.status_code == 500
        assert failed.json() == {"error": "inference failed: RuntimeError: injected fault on batch 2"}
        with grpc.insecure_channel(srv.grpc_target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            request = pb.ClassifyRequest(image=pb.Image(pixels=bytes(3072)))
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(request)  # batch 4
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "injected fault on batch 4" in err.value.details()
            assert stub.Classify(request).predictions  # batch 5
        text = httpx.get(f"{srv.url}/metrics").text
        assert metric(text, "quicknet_rejections_total", reason="engine_error") == 2
        assert httpx.get(f"{srv.url}/readyz").status_code == 200, "one failed batch does not unready the service"
    finally:
        assert srv.stop() == 0, srv.log()


def _client_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_an_unexpected_error_is_a_one_line_500_and_the_connection_survives(tmp_path, caplog):
    """A bug in a handler (not a refusal the service knows) must not cost the client its connection."""

    class Buggy:
        PROTOCOL = "rest"
        OPENAPI_SCHEMAS = ()

        @staticmethod
        def router(runtime: Runtime) -> APIRouter:
            api = APIRouter()

            @api.get("/bug")
            async def bug() -> dict:
                raise ValueError("a bug")

            @api.get("/fine")
            async def fine() -> dict:
                return {"ok": True}

            return api

    app = create_app(Runtime(Settings()), [Buggy])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(100):
                try:
                    client.get("/fine")
                    break
                except httpx.ConnectError:
                    threading.Event().wait(0.05)
            bad = client.get("/bug")
            assert bad.status_code == 500
            assert bad.json() == {"error": "internal error; the server log has the details"}
            assert "a bug" not in bad.text, "no internals in the answer"
            good = client.get("/fine")
            assert good.json() == {"ok": True}
            assert bad.headers.get("connection") != "close"
            assert _client_port(bad) == _client_port(good), "the same connection serves the next request"
        logged = [r for r in caplog.records if r.name == "quicknet.http" and r.exc_info]
        assert logged and "a bug" in str(logged[0].exc_info[1]), "the server log keeps the traceback"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "engine-process"])
def test_a_hung_engine_marks_the_service_not_live_until_it_returns(tmp_path, workers):
    """The watchdog: a batch running past --watchdog-s turns liveness (what an orchestrator restarts
    on) and readiness (what it routes by) false on every front, with the reason; both turn true
    again if the batch returns."""
    srv = start_server(tmp_path, workers=workers, fault_injection="hang-every=2,hang-seconds=6", watchdog_s=1)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            assert client.post("/classify", content=bytes(3072), headers=RAW).status_code == 200
            assert client.get("/healthz").status_code == 200
            hung = threading.Thread(target=lambda: client.post("/classify", content=bytes(3072), headers=RAW))
            hung.start()
            with httpx.Client(base_url=srv.url, timeout=5) as probe:
                for _ in range(40):
                    live = probe.get("/healthz")
                    if live.status_code != 200:
                        break
                    threading.Event().wait(0.1)
                assert live.status_code == 503
                assert "engine stalled: a batch of quicknet-xs" in live.json()["error"]
                assert probe.get("/v2/health/live").status_code == 400, "KServe liveness agrees"
                assert metric(probe.get("/metrics").text, "quicknet_engine_stalled") == 1
                ready = probe.get("/readyz")  # no traffic routed to a replica that would only time it out
                assert ready.status_code == 503 and "engine stalled" in ready.json()["error"], ready.text
                assert probe.get("/v2/health/ready").status_code == 400, "KServe readiness agrees"
                assert metric(probe.get("/metrics").text, "quicknet_ready") == 0
                hung.join(30)
                for _ in range(40):
                    if probe.get("/healthz").status_code == 200:
                        break
                    threading.Event().wait(0.1)
                assert probe.get("/healthz").status_code == 200, "live again once the batch returned"
                assert probe.get("/readyz").status_code == 200, "and ready again"
        assert "watchdog: engine stalled" in srv.log()
        # probes and scrapes are logged only when they fail: the 503s are there, none of the 200s
        assert re.search(r"GET /healthz 503 ", srv.log()) and re.search(r"GET /readyz 503 ", srv.log()), srv.log()
        assert not re.search(r"GET /(healthz|readyz|metrics|v2/health/\w+) 200 ", srv.log()), srv.log()
        assert re.search(r"POST /classify 200 ", srv.log()), "other requests are logged as before"
    finally:
        assert srv.stop() == 0, srv.log()


def test_a_bug_in_a_grpc_handler_is_logged_and_answers_one_line_without_its_details(caplog):
    """Not a refusal and not an engine failure: the log gets the traceback, the client INTERNAL with
    REST's one line, never the exception's text (which may hold server paths) or class name."""
    from quicknet.serve.transport.grpc import INTERNAL_ERROR, unary_call

    class Context:
        async def abort(self, code, details):
            self.code, self.details = code, details
            raise grpc.RpcError

    async def buggy(request, context):
        raise KeyError("/srv/models/secret-path")

    context = Context()
    with caplog.at_level("ERROR", "quicknet.grpc"), pytest.raises(grpc.RpcError):
        asyncio.run(unary_call("grpc", "Classify", buggy, None, context))
    assert (context.code, context.details) == (grpc.StatusCode.INTERNAL, INTERNAL_ERROR)
    assert "secret-path" in caplog.text and "KeyError" in caplog.text, "the operator sees what happened"
