"""The hot path (`quicknet.serve.transport.hot`): the inference routes skip FastAPI's layers, and a
client cannot tell: every answer, error and header is what the full stack gives."""

from __future__ import annotations

import json

import pytest
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.testclient import TestClient

from quicknet.serve import metrics
from quicknet.serve.config import Settings
from quicknet.serve.errors import InputError, QueueFull
from quicknet.serve.main import REST_FRONTS
from quicknet.serve.runtime import Runtime
from quicknet.serve.transport.app import create_app
from quicknet.serve.transport.hot import HotPath
from quicknet.serve.transport.http import fast_path
from quicknet.testing import metric

KEY = "hot-path-key-0123456789"


class Front:
    """A front with fast-path routes that answer, refuse and fail as the request asks, and say
    which way they were reached: Starlette's exception middleware leaves its handlers in the
    scope, and only the full stack passes through it."""

    PROTOCOL = "rest"
    OPENAPI_SCHEMAS = ()

    @staticmethod
    def router(runtime: Runtime) -> APIRouter:
        api = APIRouter()

        async def answer(request: Request, name: str) -> Response:
            body = await request.body()
            if body == b"bad":
                raise InputError("bad body: send a good one")
            if body == b"full":
                raise QueueFull(3.0)
            if body == b"bug":
                raise ValueError("a bug")
            full = "starlette.exception_handlers" in request.scope
            payload = {"name": name, "bytes": len(body), "way": "full" if full else "hot"}
            return Response(json.dumps(payload), media_type="application/json", headers={"x-front": "1"})

        @api.post("/hot")
        @fast_path
        async def hot(request: Request) -> Response:
            return await answer(request, "-")

        @api.post("/hot/{name}")
        @fast_path
        async def hot_named(request: Request) -> Response:
            return await answer(request, request.path_params["name"])

        @api.get("/hot")
        async def hot_get() -> dict:
            return {"way": "full"}

        @api.post("/teapot")
        @fast_path
        async def teapot(request: Request) -> Response:
            raise HTTPException(418, "short and stout")

        return api


def _clients(tmp_path, **settings):
    """The same app twice: with its hot path, and with every request sent the full way."""
    if settings.pop("keys", False):
        keys = tmp_path / "keys"
        keys.write_text(KEY + "\n")
        settings["api_keys_file"] = keys
    hot = create_app(Runtime(Settings(**settings)), [Front])
    full = create_app(Runtime(Settings(**settings)), [Front])
    full.hot_routes = ()
    return TestClient(hot, raise_server_exceptions=False), TestClient(full, raise_server_exceptions=False)


def _seen(reply):
    return reply.status_code, reply.content, {k: v for k, v in reply.headers.items() if k != "x-request-id"}


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/hot", b"image", 200),
        ("/hot/cat", b"image", 200),
        ("/hot", b"bad", 400),
        ("/hot", b"full", 429),
        ("/hot", b"bug", 500),
    ],
)
def test_the_hot_path_answers_as_the_full_stack_does(tmp_path, path, body, status):
    hot, full = _clients(tmp_path)
    by_hot, by_full = hot.post(path, content=body), full.post(path, content=body)
    assert by_hot.status_code == status
    if status == 200:
        assert by_hot.json()["way"] == "hot" and by_full.json()["way"] == "full"
        assert by_hot.json()["name"] == by_full.json()["name"] == (path.removeprefix("/hot").strip("/") or "-")
        assert by_hot.headers["x-front"] == "1"
        assert by_hot.headers["content-type"] == by_full.headers["content-type"] == "application/json"
    else:
        assert _seen(by_hot) == _seen(by_full)
        assert by_hot.json()["error"] and "a bug" not in by_hot.text
    if status == 429:
        assert by_hot.headers["retry-after"] == "3"
    assert by_hot.headers["x-request-id"] and by_full.headers["x-request-id"]


def test_keys_and_cors_still_guard_the_hot_path(tmp_path):
    hot, full = _clients(tmp_path, keys=True, cors_origins=["https://app.example"])
    for client in (hot, full):
        assert client.post("/hot", content=b"x").status_code == 401
        ok = client.post("/hot", content=b"x", headers={"authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        cors = client.post(
            "/hot", content=b"x", headers={"authorization": f"Bearer {KEY}", "origin": "https://app.example"}
        )
        assert cors.headers["access-control-allow-origin"] == "https://app.example"
    ways = [c.post("/hot", content=b"x", headers={"authorization": f"Bearer {KEY}"}).json()["way"] for c in (hot, full)]
    assert ways == ["hot", "full"]


def test_other_methods_and_routes_go_the_full_way(tmp_path):
    hot, _ = _clients(tmp_path)
    assert isinstance(hot.app.middleware_stack or hot.app.build_middleware_stack(), HotPath)
    assert hot.get("/hot").json() == {"way": "full"}
    assert hot.put("/hot", content=b"x").status_code == 405
    assert hot.post("/nowhere", content=b"x").status_code == 404


def test_the_service_s_inference_routes_take_the_hot_path():
    app = create_app(Runtime(Settings()), REST_FRONTS)
    assert {r.path for r in app.hot_routes} == {
        "/classify",
        "/predictions/{model}",
        "/predictions/{model}/{version}",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    }
    assert all(r.methods == {"POST"} for r in app.hot_routes)
    # a hot handler takes the request alone: its path parameters are documented all the same
    paths = app.openapi()["paths"]
    for path, names in (
        ("/v2/models/{name}/infer", [("name", "path", True), ("version", "query", False)]),
        ("/v2/models/{name}/versions/{version}/infer", [("name", "path", True), ("version", "path", True)]),
    ):
        params = paths[path]["post"]["parameters"]
        documented = [(p["name"], p["in"], p["required"]) for p in params if p["in"] in ("path", "query")]
        assert documented == names, (path, documented)


def test_the_hot_path_records_request_metrics_and_the_access_log(tmp_path, caplog):
    import logging

    hot, _ = _clients(tmp_path, access_log=True)
    hot.app.middleware_stack = None  # rebuilt with the access log on

    def count(code: str) -> float:
        text = metrics.exposition()[0].decode()
        return metric(text, "quicknet_request_duration_seconds_count", endpoint="/hot/{name}", code=code)

    before = count("200"), count("400")
    with caplog.at_level(logging.INFO, "quicknet.access"):
        assert hot.post("/hot/cat", content=b"image").status_code == 200
        refused = hot.post("/hot/cat", content=b"bad")
    assert (count("200"), count("400")) == (before[0] + 1, before[1] + 1)
    lines = [r for r in caplog.records if r.name == "quicknet.access" and r.getMessage().startswith("POST /hot/cat")]
    assert [r.status for r in lines] == [200, 400]
    assert lines[1].request_id == refused.headers["x-request-id"] and "bad body" in lines[1].getMessage()


def test_status_code_and_sync_error_handlers_answer_on_the_hot_path_too(tmp_path):
    """Starlette looks an HTTPException's status code up first and runs a sync handler in its
    thread pool; the hot path does the same."""
    from fastapi.responses import PlainTextResponse

    hot, full = _clients(tmp_path)
    for client in (hot, full):
        client.app.exception_handler(418)(lambda request, e: PlainTextResponse(f"teapot: {e.detail}", 418))
        client.app.middleware_stack = None
    assert _seen(hot.post("/teapot")) == _seen(full.post("/teapot"))
    assert hot.post("/teapot").text == "teapot: short and stout"


def test_fast_path_takes_async_endpoints_only():
    def sync_endpoint(request):
        return Response()

    with pytest.raises(TypeError, match="async endpoint"):
        fast_path(sync_endpoint)


@pytest.mark.parametrize(
    "path",
    [
        "/classify",
        "/classify?model=nope",
        "/classify?version=abc",
        "/classify?modle=x",
        "/predictions/nope",
        "/v2/models/nope/infer",
        "/v2/models/nope/infer?version=abc",
        "/v2/models/nope/versions/abc/infer",
    ],
)
def test_the_service_s_hot_routes_refuse_as_the_full_stack_does(path):
    """The real fronts, no model loaded: each refusal (400 for the request, 503 for the model) is the
    same both ways."""
    apps = [create_app(Runtime(Settings()), REST_FRONTS) for _ in range(2)]
    apps[1].hot_routes = ()
    hot, full = (TestClient(app, raise_server_exceptions=False) for app in apps)
    body, headers = b"\x89PNG\r\n\x1a\n", {"Content-Type": "image/png"}
    got = _seen(hot.post(path, content=body, headers=headers))
    assert got == _seen(full.post(path, content=body, headers=headers))
    assert 400 <= got[0] < 600 and got[0] != 500, got
