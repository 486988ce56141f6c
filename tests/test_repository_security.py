"""The repository API under attack (issue 22, security 1, 3, 4, 5, 9, 10): model names are one store
folder, never a path; a failed load says why and breaks nothing; every artifact that loads is hashed;
odd names and folders neither crash nor hang; errors name no server path and list no models; only
admin keys load and unload.

This module drives gRPC with Triton's own client, so it must not import our generated KServe stubs."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from quicknet import store
from quicknet.errors import StoreError
from quicknet.serve import web
from quicknet.serve.config import Settings
from quicknet.serve.engine import Engine
from quicknet.serve.errors import ModelNotFound, RepositoryError
from quicknet.serve.kserve import rest as kserve_rest
from quicknet.serve.runtime import Runtime
from quicknet.serve.transport.app import create_app
from quicknet.testing import publish_shipped, start_server

MODEL = "quicknet-xs"
KEY = "inference-key-0123456789"
ADMIN = "admin-key-0123456789abcd"
LONG = "m" * 300  # over NAME_MAX (255): ENAMETOOLONG if it ever reached the file system
PATH_NAMES = ["/tmp/x/evil", "../../../x/evil", "./quicknet-xs", "quicknet-xs/", ".//quicknet-xs", "..", LONG]


def _store(tmp_path: Path, *names: str) -> Path:
    root = tmp_path / "store"
    for name in names:
        publish_shipped(root, name)
    store.set_default(root, names[0])
    return root


def _one_line(message: str, limit: int = 400) -> None:
    assert "\n" not in message and len(message) <= limit, message


# --- the store: names, folders, artifacts ------------------------------------------------------------


@pytest.mark.parametrize("name", [*PATH_NAMES, "", ".hidden", "a b", "a..b", "x" * 65, "²", "m\0"])
def test_a_model_name_is_one_store_folder(tmp_path, name):
    root = _store(tmp_path, MODEL)
    with pytest.raises(StoreError, match="is not a model name") as err:
        store.get_version(root, name)
    _one_line(str(err.value), 200)
    assert store.list_versions(root, name) == []


@pytest.mark.parametrize("name", ["quicknet-xs", "m", "resnet_50.v2", "A" * 64, "9lives"])
def test_ordinary_names_are_model_names(name):
    assert store.check_name(name) == name


def test_odd_folders_in_the_store_are_neither_models_nor_versions(tmp_path):
    root = _store(tmp_path, MODEL)
    for odd in ("²", "007", "0", "1x"):  # '²'.isdigit() is True and int('²') raises
        (root / MODEL / odd).mkdir()
        shutil.copy(root / MODEL / "1" / store.METADATA, root / MODEL / odd / store.METADATA)
    (root / "bad name").mkdir()
    assert store.list_versions(root, MODEL) == [1]
    assert store.list_models(root) == [MODEL]


@pytest.mark.parametrize(
    ("artifact", "fragment"),
    [
        ("/etc/hostname", "not a path"),
        ("../../evil.onnx", "not a path"),
        ("..", "not a path"),
        ("training_curves.png.unlisted", 'not listed with its SHA-256 in "files"'),
    ],
)
def test_every_artifact_that_can_load_is_a_hashed_file_of_its_version(tmp_path, artifact, fragment):
    root = _store(tmp_path, MODEL)
    path = root / MODEL / "1" / store.METADATA
    meta = json.loads(path.read_text())
    meta["artifacts"]["onnx"] = artifact
    path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=fragment) as err:
        store.get_version(root, MODEL)
    _one_line(str(err.value))
    assert str(tmp_path) not in str(err.value)


def test_a_file_listed_as_a_path_is_refused(tmp_path):
    root = _store(tmp_path, MODEL)
    path = root / MODEL / "1" / store.METADATA
    meta = json.loads(path.read_text())
    meta["files"][".."] = {"sha256": "0" * 64}
    path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="not a path"):
        store.get_version(root, MODEL)


# --- the engine: failed loads, odd names and folders (in this process) ---------------------------------


def _odd_version(model: Path) -> None:
    """`<model>/²/metadata.json`: '²'.isdigit() is True, and int('²') raises."""
    (model / "²").mkdir()
    shutil.copy(model / "1" / store.METADATA, model / "²" / store.METADATA)


def _settings(root: Path, **extra) -> Settings:
    return Settings(model_store=root, warmup=False, precision="fp32", threads=1, max_batch_size=8, **extra)


def _sha_mismatch(version: Path) -> None:
    (version / "model.int8.onnx").write_bytes(b"altered after publishing")


def _missing_file(version: Path) -> None:
    (version / "model.int8.onnx").unlink()


def _malformed_metadata(version: Path) -> None:
    meta = json.loads((version / store.METADATA).read_text())
    meta["labels"] = "airplane,automobile"
    (version / store.METADATA).write_text(json.dumps(meta))


def _one_label(version: Path) -> None:
    meta = json.loads((version / store.METADATA).read_text())
    meta["labels"] = ["airplane"]
    (version / store.METADATA).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        (_sha_mismatch, "model.int8.onnx is missing or altered since publish (SHA-256 mismatch)"),
        (_missing_file, "model.int8.onnx is missing or altered since publish"),
        (_malformed_metadata, '"labels" must be a list of strings'),
        (_one_label, "metadata.json has 1 label(s) but the model outputs 10 classes"),
    ],
    ids=["sha256", "missing-file", "malformed-metadata", "one-label"],
)
def test_a_failed_load_says_why_and_the_repository_keeps_working(tmp_path, breakage, reason):
    root = _store(tmp_path, MODEL, "twin", "broken")
    breakage(root / "broken" / "1")

    async def scenario() -> None:
        engine = Engine(_settings(root, model_control_mode="explicit"))
        await engine.load()
        try:
            with pytest.raises(RepositoryError) as err:
                await engine.load_model("broken")
            message = str(err.value)
            _one_line(message)
            assert reason in message and "picks none" not in message
            assert str(tmp_path) not in message, "no server path in what a client reads"
            assert "broken" not in engine.requested, "a failed load leaves nothing requested"
            index = {(e["name"], e["version"]): e for e in engine.index()}
            assert index[("broken", "1")]["state"] == "UNAVAILABLE"
            assert all(str(tmp_path) not in e["reason"] for e in index.values())
            await engine.load_model("twin")  # an intact model still loads
            assert ("twin", 1) in engine.loaded
            await engine.unload_model("twin")  # and an unload really unloads
            assert ("twin", 1) not in engine.loaded
            with pytest.raises(RepositoryError, match=reason.replace("(", r"\(").replace(")", r"\)")):
                await engine.load_model("broken")  # a retry says why again
            assert sorted(engine.loaded) == [(MODEL, 1)]
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_a_load_where_one_version_fails_says_so_and_the_rest_serve(tmp_path):
    """Every version the policy asks for (`all`) must load: one that does not makes the load answer
    its reason (400 / FAILED_PRECONDITION, via the CLI exit 2), naming what does serve."""
    root = _store(tmp_path, MODEL, "twin")
    publish_shipped(root, "twin")  # twin v2
    _sha_mismatch(root / "twin" / "2")

    async def scenario() -> None:
        engine = Engine(_settings(root, model_control_mode="explicit", version_policy="all"))
        await engine.load()
        try:
            with pytest.raises(RepositoryError) as err:
                await engine.load_model("twin")
            message = str(err.value)
            _one_line(message)
            assert message.startswith("failed to load 'twin': twin v2: model.int8.onnx is missing or altered"), message
            assert message.endswith("(v1 serving)"), message
            assert ("twin", 1) in engine.loaded and "twin" in engine.requested, "what did load serves"
        finally:
            await engine.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("mode", ["none", "explicit"])
def test_odd_names_and_folders_never_crash_the_engine(tmp_path, mode):
    root = _store(tmp_path, MODEL, "twin")
    evil = _store(tmp_path / "outside", "evil")
    for name in (MODEL, "twin"):  # a start in any mode and the index both list versions
        _odd_version(root / name)

    async def scenario() -> None:
        engine = Engine(_settings(root, model_control_mode=mode))
        await engine.load()
        try:
            names = {e["name"] for e in engine.index()}
            assert names == {MODEL, "twin"}
            if mode != "explicit":
                return
            for name in [*PATH_NAMES, str(evil / "evil")]:
                with pytest.raises(RepositoryError, match="is not a model name") as err:
                    await engine.load_model(name)
                _one_line(str(err.value), 200)
                with pytest.raises(RepositoryError, match="is not a model name"):
                    await engine.unload_model(name)
            assert sorted(engine.loaded) == [(MODEL, 1)], "no second engine, nothing from outside the store"
            with pytest.raises(ModelNotFound) as err:
                await engine.load_model("nope")
            assert "not found" in str(err.value)
            assert str(tmp_path) not in str(err.value) and "twin" not in str(err.value), "no path, no model list"
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_a_model_with_one_label_never_starts(tmp_path):
    root = _store(tmp_path, MODEL)
    _one_label(root / MODEL / "1")

    async def scenario() -> None:
        engine = Engine(_settings(root))
        with pytest.raises(StoreError, match="1 label\\(s\\) but the model outputs 10 classes"):
            await engine.load()
        await engine.close()

    asyncio.run(scenario())


# --- who may load and unload (REST, in this process) ----------------------------------------------------


class _Repository:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def index(self, ready_only: bool) -> list[dict]:
        return []

    async def load(self, name: str) -> None:
        self.calls.append(("load", name))

    async def unload(self, name: str) -> None:
        self.calls.append(("unload", name))


def _rest(tmp_path: Path, keys: bool, admin: bool) -> tuple[TestClient, _Repository]:
    settings = {}
    if keys:
        settings["api_keys_file"] = tmp_path / "keys"
        settings["api_keys_file"].write_text(KEY + "\n")
    if admin:
        settings["admin_api_keys_file"] = tmp_path / "admin-keys"
        settings["admin_api_keys_file"].write_text(ADMIN + "\n")
    runtime = Runtime(Settings(**settings))
    runtime.repository = repository = _Repository()
    return TestClient(create_app(runtime, [kserve_rest, web])), repository


def _bearer(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.mark.parametrize(
    ("keys", "admin", "key", "status"),
    [
        (True, True, KEY, 403),  # an inference key alone
        (True, True, ADMIN, 200),
        (True, True, None, 401),
        (True, False, KEY, 403),  # keys in force, no admin set: nobody
        (False, True, None, 401),  # an admin set alone guards only the repository
        (False, True, KEY, 401),
        (False, True, ADMIN, 200),
        (False, False, None, 200),  # no keys at all: as before
    ],
)
def test_only_admin_keys_load_and_unload(tmp_path, keys, admin, key, status):
    client, repository = _rest(tmp_path, keys, admin)
    with client:
        for action in ("load", "unload"):
            r = client.post(f"/v2/repository/models/twin/{action}", headers=_bearer(key))
            assert r.status_code == status, r.text
            _one_line(r.json()["error"] if status != 200 else "")
            if status == 403:
                assert "admin" in r.json()["error"]
            if status == 401:  # RFC 9110: a 401 says how to authenticate
                assert r.headers["www-authenticate"] == 'Bearer realm="quicknet"', r.headers
    assert repository.calls == ([("load", "twin"), ("unload", "twin")] if status == 200 else [])


def test_admin_keys_work_on_every_route_and_health_docs_stay_open(tmp_path):
    client, _ = _rest(tmp_path, keys=True, admin=True)
    with client:
        assert client.post("/v2/repository/index", headers=_bearer(ADMIN)).status_code == 200
        assert client.post("/v2/repository/index", headers=_bearer(KEY)).status_code == 200
        assert client.post("/v2/repository/index").status_code == 401
        from tests.test_auth import DOCS, OPEN_WITHOUT_MODELS

        for path, status in {**OPEN_WITHOUT_MODELS, **DOCS}.items():
            assert client.get(path).status_code == status, path  # answered as without keys, not refused


@pytest.mark.parametrize("name", [LONG, "a..b", ".hidden", "-x", "%C2%B2", "a%20b"])  # a client folds ".."
def test_rest_names_are_checked_before_the_repository(tmp_path, name):
    client, repository = _rest(tmp_path, keys=False, admin=False)
    with client:
        for action in ("load", "unload"):
            r = client.post(f"/v2/repository/models/{name}/{action}")
            assert r.status_code == 400 and "is not a model name" in r.json()["error"], r.text
            _one_line(r.json()["error"], 200)
        r = client.post(f"/v2/models/{name}/infer", json={"inputs": []})
        assert r.status_code == 400 and "is not a model name" in r.json()["error"], r.text
    assert repository.calls == []


# --- the real server: REST and gRPC, one process and front processes ----------------------------------


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "engine-process"])
def test_the_repository_api_over_both_protocols(tmp_path, workers):
    root = _store(tmp_path, MODEL, "twin", "broken")
    _sha_mismatch(root / "broken" / "1")
    _odd_version(root / MODEL)
    evil = _store(tmp_path / "x", "evil")  # a model outside the store, where a path name would reach
    keys, admin = tmp_path / "keys", tmp_path / "admin-keys"
    keys.write_text(KEY + "\n")
    admin.write_text(ADMIN + "\n")
    srv = start_server(
        tmp_path,
        store=root,
        model_control_mode="explicit",
        workers=workers,
        api_keys_file=keys,
        admin_api_keys_file=admin,
        warmup=False,
        precision="fp32",
    )
    user, boss = _bearer(KEY), _bearer(ADMIN)
    grpc_user, grpc_boss = {"authorization": f"Bearer {KEY}"}, {"authorization": f"Bearer {ADMIN}"}
    try:
        client = tgrpc.InferenceServerClient(srv.grpc_target)
        url = f"{srv.url}/v2/repository/models"

        # roles: an inference key may not load or unload (REST 403, gRPC PERMISSION_DENIED)
        assert httpx.post(f"{url}/twin/load", headers=user).status_code == 403
        for call in (client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException) as err:
                call("twin", headers=grpc_user, client_timeout=30)
            assert err.value.status() == "StatusCode.PERMISSION_DENIED"

        # names: paths, odd names and a name too long for the file system load nothing, never hang
        for name in [*PATH_NAMES, str(evil / "evil")]:
            with pytest.raises(InferenceServerException) as err:
                client.load_model(name, headers=grpc_boss, client_timeout=30)
            assert err.value.status() == "StatusCode.INVALID_ARGUMENT", (name, err.value.message())
            _one_line(err.value.message(), 200)
            with pytest.raises(InferenceServerException) as err:
                client.infer(name, [_zeros()], headers=grpc_user, client_timeout=30)
            assert err.value.status() == "StatusCode.INVALID_ARGUMENT", name
        r = httpx.post(f"{url}/{LONG}/load", headers=boss, timeout=30)
        assert r.status_code == 400 and "is not a model name" in r.json()["error"]

        # a missing model: 404 naming no server path and no other model
        r = httpx.post(f"{url}/nope/load", headers=boss, timeout=30)
        assert r.status_code == 404 and str(tmp_path) not in r.text and "twin" not in r.text, r.text

        # a failed load says why; the repository keeps working after it
        r = httpx.post(f"{url}/broken/load", headers=boss, timeout=60)
        assert r.status_code == 400 and "SHA-256 mismatch" in r.json()["error"], r.text
        with pytest.raises(InferenceServerException) as err:
            client.load_model("broken", headers=grpc_boss, client_timeout=60)
        assert err.value.status() == "StatusCode.FAILED_PRECONDITION", err.value.message()
        assert "SHA-256 mismatch" in err.value.message() and str(tmp_path) not in err.value.message()
        assert str(tmp_path) not in r.text
        index = httpx.post(f"{srv.url}/v2/repository/index", headers=user, json={}).json()
        assert {(e["name"], e["state"]) for e in index} == {
            (MODEL, "READY"),
            ("twin", "UNAVAILABLE"),
            ("broken", "UNAVAILABLE"),
        }
        assert all(str(tmp_path) not in e["reason"] and not e["reason"].startswith("/") for e in index)
        client.load_model("twin", headers=grpc_boss, client_timeout=60)
        assert client.is_model_ready("twin", headers=grpc_user)
        assert httpx.post(f"{url}/twin/unload", headers=boss, timeout=30).status_code == 200
        _wait_unloaded(srv.url, "twin", user)

        # only the default model's one engine was ever left serving
        stats = httpx.get(f"{srv.url}/v2/models/stats", headers=user).json()["model_stats"]
        assert [(s["name"], s["version"]) for s in stats] == [(MODEL, "1")]
    finally:
        assert srv.stop() == 0, srv.log()


def _zeros() -> tgrpc.InferInput:
    inp = tgrpc.InferInput("images", [1, 32, 32, 3], "UINT8")
    inp.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.uint8))
    return inp


def _wait_unloaded(url: str, name: str, headers: dict, timeout: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/v2/models/{name}/ready", headers=headers).status_code != 404:
        assert time.monotonic() < deadline, f"{name} still served"
        time.sleep(0.1)


def test_a_bug_in_a_repository_call_still_answers_the_front_process():
    """With front processes, an exception the engine did not expect must still answer the front:
    before, the engine's task died and the front's request waited forever."""
    from quicknet.serve.engine_core import EngineCore
    from quicknet.serve.engine_server import EngineServer
    from quicknet.serve.messages import Error, Index

    class Broken:
        def index(self, ready_only: bool) -> list[dict]:
            raise OSError(36, "File name too long")

    class Outbox:
        def __init__(self) -> None:
            self.sent: list[object] = []

        def send(self, message: object) -> None:
            self.sent.append(message)

    outbox = Outbox()
    asyncio.run(EngineServer("unused", Broken(), EngineCore())._repository_call(outbox, Index(7, False)))
    (error,) = outbox.sent
    assert (type(error), error.id, error.kind) == (Error, 7, "repository")
    message = error.message
    _one_line(message)
    assert "File name too long" not in message


def test_a_bad_name_on_every_inference_and_model_route_is_400_or_invalid_argument(tmp_path):
    """Not only load and infer: `/classify?model=`, KServe metadata and readiness, our gRPC Classify
    (the server's check, not the client's: the raw stub sends the name as given) and KServe gRPC
    metadata refuse a name that is not one store folder, in one line, and never reach the store."""
    import grpc

    from quicknet.api._generated import classifier_pb2 as pb
    from quicknet.api._generated import classifier_pb2_grpc as pb_grpc
    from quicknet.api._generated import grpc_predict_v2_pb2 as kpb
    from quicknet.api._generated import grpc_predict_v2_pb2_grpc as kpb_grpc

    srv = start_server(tmp_path)
    try:
        for name in ("a..b", ".hidden", "a b", LONG):  # ("..", a path segment, never reaches a route)
            quoted = httpx.URL(f"{srv.url}/v2/models/").join(name.replace("/", "%2F"))
            for path in (str(quoted), f"{quoted}/ready"):
                r = httpx.get(path, timeout=30)
                assert r.status_code == 400 and "is not a model name" in r.json()["error"], (name, r.text)
            r = httpx.post(f"{srv.url}/classify", params={"model": name}, content=bytes(3072), timeout=30)
            assert r.status_code == 400 and "\n" not in r.json()["error"], (name, r.text)
        with grpc.insecure_channel(srv.grpc_target) as channel:
            for name in PATH_NAMES:
                image = pb.Image(pixels=bytes(3072))
                with pytest.raises(grpc.RpcError) as err:
                    pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(image=image, model=name), timeout=30)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())
                with pytest.raises(grpc.RpcError) as err:
                    kpb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
                        kpb.ModelMetadataRequest(name=name), timeout=30
                    )
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())
    finally:
        assert srv.stop() == 0, srv.log()
