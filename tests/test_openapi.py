"""The OpenAPI document (`/openapi.json`) says what the REST API really answers: a named schema for
every JSON answer, the `{"error"}` body on every error status a route can answer (and no 422, which
the service never sends), the KServe inference request, one declared tag and a summary per route.
And it is true: real answers, from a real server and from the app in process, are validated against
the document itself (JSON Schema, `jsonschema`), so a field added to an answer without the schema,
or a status the document does not list, fails here."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator

from quicknet import store
from quicknet.serve.config import Settings
from quicknet.serve.main import REST_FRONTS
from quicknet.serve.runtime import Runtime
from quicknet.serve.transport.app import create_app
from quicknet.testing import REPO, publish_shipped, start_server

MODEL = "quicknet-xs"
TWIN = "twin"
KEY = "openapi-test-key-0123456789abcdef"
CAT = (REPO / "examples" / "cat.png").read_bytes()
ERROR_REF = "#/components/schemas/ErrorBody"
INFER = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")

# What each route can really answer besides 200 (read from the handlers and the error mapping in
# quicknet/serve/transport/http.py); 401 comes with API keys, 422 never (validation errors are 400).
MODEL_ROUTES = {"": {404}, "/ready": {400, 404}, "/config": {404}, "/stats": {404, 503}}
ERROR_STATUSES: dict[tuple[str, str], set[int]] = {
    ("get", "/healthz"): {503},
    ("get", "/readyz"): {503},
    ("get", "/metrics"): set(),
    # 404: `?model=` (or the path's model) names no served model
    **{
        ("post", path): {400, 404, 408, 413, 415, 429, 500, 503, 504}
        for path in ("/classify", "/predictions/{model}", "/predictions/{model}/{version}")
    },
    ("get", "/v1/models"): set(),
    ("get", "/v2"): set(),
    ("get", "/v2/health/live"): {400},
    ("get", "/v2/health/ready"): {400},
    ("post", "/v2/repository/index"): {400, 408, 413, 503},
    # load / unload: 401 and 403 from the admin key set (`--admin-api-keys-file`), with or without API keys
    ("post", "/v2/repository/models/{name}/load"): {400, 401, 403, 404, 503},
    ("post", "/v2/repository/models/{name}/unload"): {400, 401, 403, 404, 503},
    ("get", "/v2/models/stats"): {503},
    **{
        ("get", base + suffix): statuses
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
        for suffix, statuses in MODEL_ROUTES.items()
    },
    **{("post", path): {400, 404, 408, 413, 415, 429, 500, 503, 504} for path in INFER},
}
TAG_OF = {
    "/classify": "classify",
    "/predictions/{model}": "classify",
    "/predictions/{model}/{version}": "classify",
    "/v1/models": "models",
    "/v2": "server",
    "/metrics": "server",
    "/healthz": "health",
    "/readyz": "health",
}


def _app(**settings: object):
    return create_app(Runtime(Settings(**settings)), REST_FRONTS)


def _spec(app=None) -> dict:
    with TestClient(app or _app()) as client:
        return client.get("/openapi.json").json()


def _operations(spec: dict):
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            yield path, method, operation


def _expected_tag(path: str) -> str:
    if path in TAG_OF:
        return TAG_OF[path]
    if path.startswith("/v2/health/"):
        return "health"
    if path.startswith("/v2/repository/"):
        return "repository"
    return "inference" if path.endswith("/infer") else "models"


def _schema(spec: dict, path: str, method: str, status: int, media_type: str = "application/json") -> dict:
    """The documented schema of an answer, which must be a named component."""
    response = spec["paths"][path][method]["responses"].get(str(status))
    assert response is not None, f"{method.upper()} {path} answered {status}, which it does not document"
    content = response.get("content", {})
    assert media_type in content, f"{method.upper()} {path} {status}: {media_type} not documented"
    schema = content[media_type].get("schema", {})
    assert set(schema) == {"$ref"}, f"{method.upper()} {path} {status}: not a named schema: {schema}"
    return schema


def check(spec: dict, path: str, method: str, response: httpx.Response) -> object:
    """Validate a real answer against what the document says for its route and status."""
    media_type = response.headers["content-type"].split(";")[0]
    body = response.content
    if media_type == "application/octet-stream":  # the binary-data extension: a JSON header, then bytes
        documented = spec["paths"][path][method]["responses"][str(response.status_code)]
        assert documented["content"][media_type]["schema"] == {"type": "string", "format": "binary"}
        assert "Inference-Header-Content-Length" in documented["headers"]
        body = body[: int(response.headers["inference-header-content-length"])]
        media_type = "application/json"
    schema = _schema(spec, path, method, response.status_code, media_type)
    doc = json.loads(body)
    Draft202012Validator({**schema, "components": spec["components"]}).validate(doc)
    return doc


@pytest.fixture(scope="module")
def spec() -> dict:
    return _spec()


@pytest.fixture(scope="module")
def twin_store(tmp_path_factory):
    """The shipped model, and the same files as a second model `twin` to load and unload."""
    root = tmp_path_factory.mktemp("store")
    for name in (MODEL, TWIN):
        publish_shipped(root, name)
    store.set_default(root, MODEL)
    return root


@pytest.fixture(scope="module")
def server(twin_store, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("logs"), store=twin_store, model_control_mode="explicit")
    yield srv
    assert srv.stop() == 0, srv.log()


def test_every_answer_has_a_named_schema(spec):
    for path, method, operation in _operations(spec):
        content = operation["responses"]["200"]["content"]
        if path == "/metrics":
            assert set(content) == {"text/plain"} and content["text/plain"]["schema"] == {"type": "string"}
            continue
        assert "application/json" in content, path
        ref = _schema(spec, path, method, 200)["$ref"]
        assert ref.removeprefix("#/components/schemas/") in spec["components"]["schemas"], ref
        for media_type, doc in content.items():
            assert doc.get("schema"), f"{method.upper()} {path}: {media_type} has an empty schema"


def test_every_error_status_documents_the_error_body(spec):
    error_body = spec["components"]["schemas"]["ErrorBody"]
    assert error_body["properties"] == {"error": error_body["properties"]["error"]}
    assert error_body["properties"]["error"]["type"] == "string"
    assert error_body["required"] == ["error"] and error_body["additionalProperties"] is False
    documented = {}
    for path, method, operation in _operations(spec):
        errors = {int(s) for s in operation["responses"] if s != "200"}
        documented[(method, path)] = errors
        for status in errors:
            response = operation["responses"][str(status)]
            assert response["content"] == {"application/json": {"schema": {"$ref": ERROR_REF}}}, (path, status)
            assert response["description"], (path, status)
    assert documented == ERROR_STATUSES


def test_no_operation_documents_a_422(spec):
    """Request validation errors are answered 400 (quicknet/serve/transport/http.py), so no 422 appears."""
    assert not [(p, m) for p, m, op in _operations(spec) if "422" in op["responses"]]
    assert "HTTPValidationError" not in json.dumps(spec)


def test_infer_documents_its_request_body(spec):
    request = spec["components"]["schemas"]["InferRequest"]
    assert "inputs" in request["required"]
    for path in INFER:
        operation = spec["paths"][path]["post"]
        body = operation["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/InferRequest"}
        assert "application/octet-stream" in body["content"]
        assert "Inference-Header-Content-Length" in body["description"]
        headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
        assert {"Inference-Header-Content-Length", "X-Request-Timeout-Ms"} <= headers
        assert "Inference-Header-Content-Length" in operation["responses"]["200"]["headers"]
        schema = body["content"]["application/json"]["schema"]
        validator = Draft202012Validator({**schema, "components": spec["components"]})
        for example in body["content"]["application/json"]["examples"].values():
            validator.validate(example["value"])
    index = spec["paths"]["/v2/repository/index"]["post"]["requestBody"]
    assert index["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RepositoryIndexRequest"}


def test_every_route_has_a_declared_tag_and_a_summary(spec):
    declared = {tag["name"]: tag.get("description") for tag in spec["tags"]}
    assert all(declared.values()), "every tag is described"
    auto = {"Live", "Ready", "Model Ready"}  # FastAPI's summary from a function name: none left
    for path, method, operation in _operations(spec):
        assert operation.get("tags") == [_expected_tag(path)], (method, path, operation.get("tags"))
        assert operation["tags"][0] in declared and operation["tags"][0] != "default"
        assert operation.get("summary") and operation["summary"] not in auto, (method, path)


@pytest.mark.parametrize("open_health", [True, False])
def test_with_api_keys_every_closed_route_documents_its_401(tmp_path, open_health):
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    app = _app(api_keys_file=keys, open_health_endpoints=open_health)
    spec = _spec(app)
    health = {"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"}
    for path, _, operation in _operations(spec):
        if open_health and path in health:
            assert operation["security"] == [] and "401" not in operation["responses"], path
        else:
            assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}
            assert "security" not in operation, path  # the document's default: the bearer key
    with TestClient(app) as client:
        refused = client.get("/v1/models")
        assert refused.status_code == 401
        check(spec, "/v1/models", "get", refused)


def test_a_server_not_ready_refuses_as_documented():
    """In process, no model: readiness, health and the inference routes answer what they document."""
    runtime = Runtime(Settings())
    app = create_app(runtime, REST_FRONTS)
    spec = _spec(app)
    with TestClient(app) as client:
        for method, template, url, status in [
            ("get", "/readyz", "/readyz", 503),
            ("get", "/v2/health/ready", "/v2/health/ready", 400),
            ("post", "/classify", "/classify", 503),
            ("post", INFER[0], f"/v2/models/{MODEL}/infer", 503),
            ("post", INFER[1], f"/v2/models/{MODEL}/versions/1/infer", 503),
            ("get", "/v2/models/{name}", f"/v2/models/{MODEL}", 404),
            ("get", "/v2/models/{name}/ready", f"/v2/models/{MODEL}/ready", 404),
            ("get", "/v2/models/{name}/versions/{version}/config", f"/v2/models/{MODEL}/versions/1/config", 404),
            ("get", "/v2/models/{name}/stats", f"/v2/models/{MODEL}/stats", 404),
            ("get", "/healthz", "/healthz", 200),
            ("get", "/v2/health/live", "/v2/health/live", 200),
            ("get", "/v2/models/stats", "/v2/models/stats", 200),
        ]:
            response = client.request(method, url, content=b"{}" if method == "post" else None)
            assert response.status_code == status, (url, response.text)
            check(spec, template, method, response)
        runtime.stalled = "the engine has not answered for 30s"
        check(spec, "/healthz", "get", client.get("/healthz"))
        check(spec, "/v2/health/live", "get", client.get("/v2/health/live"))
        assert client.get("/healthz").status_code == 503


def test_real_answers_match_the_documented_schemas(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    url = server.url

    def get(template: str, path: str | None = None) -> object:
        response = httpx.get(url + (path or template))
        assert response.status_code == 200, (path or template, response.text)
        return check(spec, template, "get", response)

    def post(template: str, path: str | None = None, **kwargs) -> httpx.Response:
        response = httpx.post(url + (path or template), timeout=30, **kwargs)
        assert response.status_code == 200, (path or template, response.text)
        check(spec, template, "post", response)
        return response

    for path in ("/healthz", "/readyz", "/v1/models", "/v2", "/v2/health/live", "/v2/health/ready"):
        get(path)
    version = get("/v2/models/{name}", f"/v2/models/{MODEL}")["versions"][0]

    one = post("/classify", content=CAT, headers={"Content-Type": "image/png"}).json()
    assert isinstance(one["predictions"][0], dict), "one image: one list"
    several = post("/classify", json={"images": [base64.b64encode(CAT).decode()] * 2, "top_k": 3}).json()
    assert [len(row) for row in several["predictions"]] == [3, 3], "several: a list per image"
    post("/classify", files=[("images", ("a.png", CAT, "image/png"))])
    post("/classify", content=bytes(3072 * 2), headers={"Content-Type": "application/octet-stream"})
    stable = post("/predictions/{model}", f"/predictions/{MODEL}", content=CAT, headers={"Content-Type": "image/png"})
    assert [len(row) for row in stable.json()["predictions"]] == [5], "/predictions: a list per image, always"
    post("/predictions/{model}/{version}", f"/predictions/{MODEL}/{version}", files={"image": CAT})

    tensor = {"name": "images", "datatype": "UINT8", "shape": [2, 32, 32, 3], "data": [0] * 6144}
    encoded = {"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(CAT).decode()]}
    post(INFER[0], f"/v2/models/{MODEL}/infer", json={"inputs": [tensor]})
    top = {"name": "logits", "parameters": {"classification": 3}}
    versioned = f"/v2/models/{MODEL}/versions/{version}/infer"
    reply = post(INFER[1], versioned, json={"id": "7", "inputs": [encoded], "outputs": [top]})
    assert reply.json()["id"] == "7" and reply.json()["outputs"][0]["datatype"] == "BYTES"
    raw = {"name": "images", "datatype": "UINT8", "shape": [2, 32, 32, 3], "parameters": {"binary_data_size": 6144}}
    header = json.dumps({"inputs": [raw], "parameters": {"binary_data_output": True}}).encode()
    binary = post(
        INFER[0],
        f"/v2/models/{MODEL}/infer",
        content=header + bytes(6144),
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert binary.headers["content-type"] == "application/octet-stream"
    assert struct.calcsize("<20f") == len(binary.content) - int(binary.headers["inference-header-content-length"])

    for suffix in ("", "/ready", "/config", "/stats"):
        get("/v2/models/{name}" + suffix, f"/v2/models/{MODEL}" + suffix)
        get("/v2/models/{name}/versions/{version}" + suffix, f"/v2/models/{MODEL}/versions/{version}" + suffix)
    stats = get("/v2/models/stats")
    assert any(entry["batch_stats"] for entry in stats["model_stats"]), "statistics after inference"

    index = post("/v2/repository/index").json()
    assert {(e["name"], e["state"]) for e in index} >= {(MODEL, "READY"), (TWIN, "UNAVAILABLE")}
    post("/v2/repository/index", json={"ready": True})
    post("/v2/repository/models/{name}/load", f"/v2/repository/models/{TWIN}/load")
    get("/v2/models/{name}/ready", f"/v2/models/{TWIN}/ready")
    post("/v2/repository/models/{name}/unload", f"/v2/repository/models/{TWIN}/unload")


def test_real_errors_match_the_documented_error_body(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    cases = [
        ("post", "/classify", "/classify", 415, {"content": b"x", "headers": {"Content-Type": "text/plain"}}),
        ("post", "/classify", "/classify", 400, {"json": {"image": "not base64!"}}),
        ("post", "/classify", "/classify", 413, {"json": {"images": [base64.b64encode(CAT).decode()] * 1000}}),
        ("post", "/classify", "/classify?top_k=11", 400, {"content": CAT, "headers": {"Content-Type": "image/png"}}),
        ("post", INFER[0], f"/v2/models/{MODEL}/infer", 400, {"json": {"inputs": []}}),
        ("post", INFER[0], "/v2/models/nope/infer", 404, {"json": {"inputs": []}}),
        ("post", INFER[1], f"/v2/models/{MODEL}/versions/99/infer", 404, {"json": {"inputs": []}}),
        ("get", "/v2/models/{name}", "/v2/models/nope", 404, {}),
        ("get", "/v2/models/{name}/versions/{version}/ready", f"/v2/models/{MODEL}/versions/x/ready", 404, {}),
        ("get", "/v2/models/{name}/config", "/v2/models/nope/config", 404, {}),
        ("get", "/v2/models/{name}/stats", "/v2/models/nope/stats", 404, {}),
        ("post", "/v2/repository/index", "/v2/repository/index", 400, {"content": b"[1"}),
        ("post", "/v2/repository/index", "/v2/repository/index", 413, {"content": b" " * (1 << 17)}),
        ("post", "/v2/repository/models/{name}/load", "/v2/repository/models/nope/load", 404, {}),
        ("post", "/v2/repository/models/{name}/unload", f"/v2/repository/models/{MODEL}/unload", 400, {}),
        ("post", "/v2/repository/models/{name}/unload", "/v2/repository/models/nope/unload", 404, {}),
    ]
    for method, template, path, status, kwargs in cases:
        response = httpx.request(method, server.url + path, timeout=30, **kwargs)
        assert response.status_code == status, (path, response.status_code, response.text)
        assert check(spec, template, method, response)["error"], path
