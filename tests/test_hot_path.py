"""The hot path (`quicknet.serve.transport.hot`): the inference routes skip FastAPI's layers, and a
client cannot tell: every answer, error and header is what the full stack gives."""

from __future__ import annotations

import json

import pytest
from fastapi import APIRouter, Request, Response
from fastapi.testclient import TestClient

from quicknet.serve.config import Settings
from quicknet.serve.errors import InputError, QueueFull
from quicknet.serve.runtime import Runtime
from quicknet.serve.transport.hot import HotPath
from quicknet.serve.transport.http import create_app, fast_path

KEY = "hot-path-key-0123456789"


class Front:
    """A front with fast-path routes that answer, refuse and fail as the request asks, and say
    which way they were reached: Starlette's exception middleware leaves its handlers in the
    scope, and only the full stack passes through it."""

    PROTOCOL = "rest"

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
