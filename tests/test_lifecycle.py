"""Model lifecycle without restarts: new versions go live under load with no failed request, the
repository API (driven by Triton's own clients), broken versions never served, DEFAULT followed.

This module imports tritonclient, so it must not import our generated KServe stubs."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from quicknet import store
from quicknet.api._generated import classifier_pb2 as pb
from quicknet.api._generated import classifier_pb2_grpc as pb_grpc
from quicknet.testing import STORE, free_port, metric, publish_shipped, start_server

MODEL = "quicknet-xs"
RAW = {"Content-Type": "application/octet-stream"}


def _shipped() -> store.ModelVersion:
    return store.get_version(STORE, store.default_model(STORE))


def _publish(root: Path, name: str) -> store.ModelVersion:
    return publish_shipped(root, name)


def _store(tmp_path: Path, *names: str) -> Path:
    root = tmp_path / "store"
    for name in names:
        _publish(root, name)
    store.set_default(root, names[0])
    return root


def _wait(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Hammer:
    """Clients on three protocols sending back to back; every answer's status and version kept.

    Every failure, of any kind (a status, a dropped connection, a client error), is recorded as an
    answer "FAILED: ..." and the client goes on: a thread never dies of it. `alive_at_end` says
    which threads were still running when the hammering stopped (all of them, or the test fails)."""

    def __init__(self, srv):
        self.srv = srv
        self.stop = threading.Event()
        self.answers: list[tuple[str, float, str]] = []  # (protocol, time, version or "FAILED: ...")
        self.threads = {
            name: threading.Thread(target=f, daemon=True)
            for name, f in (("rest", self._rest), ("grpc", self._grpc), ("kserve", self._kserve))
        }
        self.alive_at_end: dict[str, bool] = {}

    def __enter__(self) -> Hammer:
        for t in self.threads.values():
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.alive_at_end = {name: t.is_alive() for name, t in self.threads.items()}
        self.stop.set()
        for t in self.threads.values():
            t.join(30)

    def _record(self, protocol: str, outcome: str) -> None:
        self.answers.append((protocol, time.monotonic(), outcome))

    def _loop(self, protocol: str, call) -> None:
        while not self.stop.is_set():
            try:
                outcome = call()
            except Exception as e:  # anything: recorded, and the client keeps going
                outcome = f"FAILED: {type(e).__name__} {e}"
            self._record(protocol, outcome)

    def failures(self) -> list[str]:
        return [f"{p}: {v}" for p, _, v in self.answers if v.startswith("FAILED")]

    def check_no_failure(self) -> None:
        """No answer failed, every protocol answered, and every thread outlived the hammering."""
        assert not self.failures(), self.failures()[:5]
        assert self.alive_at_end == {"rest": True, "grpc": True, "kserve": True}, self.alive_at_end
        assert {p for p, _, _ in self.answers} == {"rest", "grpc", "kserve-grpc"}

    def _rest(self) -> None:
        with httpx.Client(timeout=30) as client:

            def call() -> str:
                r = client.post(f"{self.srv.url}/classify", content=bytes(3072 * 4), headers=RAW)
                return r.json()["version"] if r.status_code == 200 else f"FAILED: {r.status_code} {r.text}"

            self._loop("rest", call)

    def _grpc(self) -> None:
        with grpc.insecure_channel(self.srv.grpc_target) as ch:
            stub = pb_grpc.ClassifierStub(ch)

            def call() -> str:
                try:
                    return stub.Classify(pb.ClassifyRequest(image=pb.Image(pixels=bytes(3072))), timeout=30).version
                except grpc.RpcError as e:
                    return f"FAILED: {e.code().name} {e.details()}"

            self._loop("grpc", call)

    def _kserve(self) -> None:
        client = tgrpc.InferenceServerClient(self.srv.grpc_target)
        pixels = np.zeros((2, 32, 32, 3), np.uint8)

        def call() -> str:
            inp = tgrpc.InferInput("images", [2, 32, 32, 3], "UINT8")
            inp.set_data_from_numpy(pixels)
            try:
                return client.infer(MODEL, [inp], client_timeout=30).get_response().model_version
            except InferenceServerException as e:
                return f"FAILED: {e.status()} {e.message()}"

        self._loop("kserve-grpc", call)


def test_the_hammer_records_every_failure_and_outlives_it(tmp_path):
    """Against a server that is not there (every connection refused), each client records its
    failures and keeps going: a dropped connection can never end a client silently."""

    class Nowhere:
        url = f"http://127.0.0.1:{free_port()}"
        grpc_target = f"127.0.0.1:{free_port()}"

    with Hammer(Nowhere()) as hammer:
        _wait(lambda: {p for p, _, _ in hammer.answers} == {"rest", "grpc", "kserve-grpc"}, 30, "every client to fail")
        time.sleep(0.2)
    assert hammer.alive_at_end == {"rest": True, "grpc": True, "kserve": True}
    assert Counter(p for p, _, v in hammer.answers if v.startswith("FAILED")).keys() == {"rest", "grpc", "kserve-grpc"}
    with pytest.raises(AssertionError):
        hammer.check_no_failure()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "engine-process"])
def test_a_published_version_goes_live_under_load_with_no_failed_request(tmp_path, workers):
    root = _store(tmp_path, MODEL)
    srv = start_server(tmp_path, store=root, model_control_mode="poll", poll_interval_s=0.3, workers=workers)
    try:
        with Hammer(srv) as hammer:
            _wait(lambda: len(hammer.answers) > 30, what="traffic on version 1")
            _publish(root, MODEL)  # version 2, published atomically while clients hammer
            published = time.monotonic()
            _wait(lambda: "unloaded quicknet-xs v1" in srv.log(), what="version 1 to unload")
            _wait(lambda: sum(1 for _, t, _ in hammer.answers if t > time.monotonic() - 0.5) > 10, what="traffic")
            time.sleep(0.5)
        hammer.check_no_failure()
        outcomes = {v for _, _, v in hammer.answers}
        assert outcomes == {"1", "2"}, "every answer from exactly one of the two versions"
        swapped = max(t for _, t, v in hammer.answers if v == "1")
        after = [v for _, t, v in hammer.answers if t > swapped]
        assert after and set(after) == {"2"}, "after the swap every answer comes from the new version"
        assert {p for p, t, _ in hammer.answers if t > published} >= {"rest", "grpc", "kserve-grpc"}
        index = httpx.post(f"{srv.url}/v2/repository/index", json={}).json()
        assert {(e["version"], e["state"]) for e in index} == {("1", "UNAVAILABLE"), ("2", "READY")}
        text = httpx.get(f"{srv.url}/metrics").text
        assert metric(text, "quicknet_model_state", name=MODEL, version="2", state="READY") == 1
        assert metric(text, "quicknet_model_loads_total", name=MODEL, outcome="loaded") == 1, "v2, not v1 at start"
        assert metric(text, "quicknet_model_unloads_total", name=MODEL) == 1
        assert (
            metric(text, "quicknet_request_duration_seconds_count", endpoint="/classify", model=MODEL, version="2") > 0
        )
    finally:
        assert srv.stop() == 0, srv.log()


def test_a_broken_version_is_never_served_and_says_why(tmp_path):
    root = _store(tmp_path, MODEL)
    srv = start_server(tmp_path, store=root, model_control_mode="poll", poll_interval_s=0.3)
    try:
        staging = tmp_path / "broken"
        shutil.copytree(_shipped().path, staging)
        shipped_meta = json.loads((staging / "metadata.json").read_text())
        (staging / "model.int8.onnx").write_bytes(b"not the published bytes")  # a corrupted copy
        meta = {k: v for k, v in shipped_meta.items() if k not in ("files", "name", "version")}
        broken = store.publish(root, MODEL, [staging / f for f in shipped_meta["files"]], meta)
        (broken.path / "model.int8.onnx").write_bytes(b"altered after publishing")
        _wait(lambda: "cannot load quicknet-xs v2" in srv.log(), what="the failed load")
        index = {e["version"]: e for e in httpx.post(f"{srv.url}/v2/repository/index", json={}).json()}
        assert index["2"]["state"] == "UNAVAILABLE" and "SHA-256 mismatch" in index["2"]["reason"]
        assert index["1"]["state"] == "READY"
        r = httpx.post(f"{srv.url}/classify", content=bytes(3072), headers=RAW)
        assert r.status_code == 200 and r.json()["version"] == "1", "the serving version is untouched"
        assert httpx.get(f"{srv.url}/v2/models/{MODEL}/versions/2/ready").status_code == 404
        assert httpx.get(f"{srv.url}/v2/models/{MODEL}/versions/1/ready").status_code == 200
    finally:
        assert srv.stop() == 0, srv.log()


def test_a_version_copied_in_file_by_file_goes_live_once_complete(tmp_path):
    """`kubectl cp` of a version folder (deploy/README.md) is not atomic: a poll can find its
    metadata before its model. That load fails, with why; once the rest of the files are there
    the next poll tries the version again and it goes live (a failed version was never retried)."""
    root = _store(tmp_path, MODEL)
    _publish(tmp_path / "elsewhere", MODEL)
    complete = _publish(tmp_path / "elsewhere", MODEL)  # a v2 folder, complete, for the user to copy in
    srv = start_server(tmp_path, store=root, model_control_mode="poll", poll_interval_s=0.3)
    try:
        arriving = root / MODEL / "2"
        arriving.mkdir()
        shutil.copy(complete.path / "metadata.json", arriving)  # the first file of the copy
        _wait(lambda: "cannot load quicknet-xs v2" in srv.log(), what="the load of the half-copied version")
        index = {e["version"]: e for e in httpx.post(f"{srv.url}/v2/repository/index", json={}).json()}
        assert index["2"]["state"] == "UNAVAILABLE" and index["1"]["state"] == "READY", index
        assert index["2"]["reason"], "the index says why"
        time.sleep(1.0)  # three polls: a folder as it was when it failed is not tried again
        assert srv.log().count("cannot load quicknet-xs v2") == 1, srv.log()
        for f in complete.path.iterdir():
            shutil.copy(f, arriving)  # the rest arrives
        _wait(
            lambda: httpx.post(f"{srv.url}/classify", content=bytes(3072), headers=RAW).json()["version"] == "2",
            what="the completed version to serve",
        )
    finally:
        assert srv.stop() == 0, srv.log()


def test_a_copy_that_completes_while_its_load_fails_is_tried_again_and_nothing_stops_serving(tmp_path):
    """The folder a failed load is compared with later is the folder as that load found it: a copy
    that finished while the load was failing is tried again at the next poll. Until then the
    version it would replace keeps serving (the plan after a failure does not count on it)."""
    import asyncio

    from quicknet.errors import StoreError
    from quicknet.serve.config import Settings
    from quicknet.serve.engine import Engine

    root = _store(tmp_path, MODEL)
    _publish(tmp_path / "elsewhere", MODEL)
    complete = _publish(tmp_path / "elsewhere", MODEL)
    engine = Engine(Settings(model_store=root, model_control_mode="poll", warmup=False))
    tries: list[int] = []

    async def load_version(version):  # stands in for the load: the copy completes while v2's first one fails
        tries.append(version.version)
        if tries.count(2) == 1 and version.version == 2:
            for f in complete.path.iterdir():
                shutil.copy(f, version.path)
            raise StoreError("model.onnx is missing")
        return f"model v{version.version}"

    engine._load_version = load_version

    async def scenario() -> None:
        await engine.load()
        (root / MODEL / "2").mkdir()
        shutil.copy(complete.path / "metadata.json", root / MODEL / "2")  # a poll finds the copy begun
        await engine.reconcile()
        assert engine.states[(MODEL, 2)].state == "UNAVAILABLE" and list(engine.loaded) == [(MODEL, 1)]
        await engine.reconcile()  # the next poll: the folder differs from what the failed load found
        assert list(engine.loaded) == [(MODEL, 2)] and tries == [1, 2, 2]

    asyncio.run(scenario())


def test_default_changes_are_followed(tmp_path):
    root = _store(tmp_path, MODEL, "twin")
    srv = start_server(tmp_path, store=root, model_control_mode="poll", poll_interval_s=0.3)
    try:
        assert httpx.post(f"{srv.url}/classify", content=bytes(3072), headers=RAW).json()["model"] == MODEL
        store.set_default(root, "twin")
        _wait(
            lambda: httpx.post(f"{srv.url}/classify", content=bytes(3072), headers=RAW).json()["model"] == "twin",
            what="/classify to follow DEFAULT",
        )
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "engine-process"])
def test_explicit_mode_with_tritons_own_clients(tmp_path, workers):
    root = _store(tmp_path, MODEL, "twin")
    srv = start_server(tmp_path, store=root, model_control_mode="explicit", workers=workers)
    try:
        http = thttp.InferenceServerClient(f"127.0.0.1:{srv.http_port}")
        grpc_client = tgrpc.InferenceServerClient(srv.grpc_target)
        index = {e["name"]: e for e in http.get_model_repository_index()}
        assert index[MODEL]["state"] == "READY" and index["twin"]["state"] == "UNAVAILABLE"
        assert not http.is_model_ready("twin")
        grpc_client.load_model("twin")
        assert http.is_model_ready("twin") and grpc_client.is_model_ready("twin")
        inp = thttp.InferInput("images", [1, 32, 32, 3], "UINT8")
        inp.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.uint8))
        assert http.infer("twin", [inp]).as_numpy("logits").shape == (1, 10)
        states = {m.name: m.state for m in grpc_client.get_model_repository_index().models}
        assert states == {MODEL: "READY", "twin": "READY"}
        http.unload_model("twin")
        _wait(lambda: not http.is_model_ready("twin"), what="twin to unload")
        with pytest.raises(InferenceServerException) as err:
            http.infer("twin", [inp])
        assert str(err.value.status()) == "404"
        with pytest.raises(InferenceServerException, match="default model"):
            http.unload_model(MODEL)
        with pytest.raises(InferenceServerException, match="not found"):
            grpc_client.load_model("nope")
        assert http.is_model_ready(MODEL), "the default model served throughout"
    finally:
        assert srv.stop() == 0, srv.log()


def test_load_and_unload_are_refused_outside_explicit_mode(tmp_path):
    root = _store(tmp_path, MODEL, "twin")
    srv = start_server(tmp_path, store=root)
    try:
        r = httpx.post(f"{srv.url}/v2/repository/models/twin/load", json={})
        assert r.status_code == 400 and "explicit" in r.json()["error"]
        r = httpx.post(f"{srv.url}/v2/repository/models/twin/unload", json={})
        assert r.status_code == 400 and "explicit" in r.json()["error"]
        _publish(root, "twin")  # mode none: the store was read once, at start
        time.sleep(1.0)
        index = httpx.post(f"{srv.url}/v2/repository/index", json={"ready": True}).json()
        assert sorted((e["name"], e["version"]) for e in index) == [(MODEL, "1"), ("twin", "1")]
    finally:
        assert srv.stop() == 0, srv.log()


def test_unloading_under_load_finishes_what_was_accepted(tmp_path):
    root = _store(tmp_path, MODEL, "twin")
    srv = start_server(
        tmp_path,
        store=root,
        model_control_mode="explicit",
        max_batch_size=8,
        max_queue_images=100_000,
        fault_injection="hang-every=1,hang-seconds=0.05",  # a slow engine: work is still queued at unload
    )
    try:
        http = thttp.InferenceServerClient(f"127.0.0.1:{srv.http_port}", concurrency=8)
        http.load_model("twin")
        inp = thttp.InferInput("images", [64, 32, 32, 3], "UINT8")
        inp.set_data_from_numpy(np.zeros((64, 32, 32, 3), np.uint8))
        pending = [http.async_infer("twin", [inp]) for _ in range(6)]
        time.sleep(0.3)
        http.unload_model("twin")
        results = [p.get_result() for p in pending]
        assert all(r.as_numpy("logits").shape == (64, 10) for r in results), "accepted work finished"
        one = thttp.InferInput("images", [1, 32, 32, 3], "UINT8")
        one.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.uint8))
        with pytest.raises(InferenceServerException) as err:
            http.infer("twin", [one])
        assert str(err.value.status()) == "404", "new work for an unloaded model is a clear 404"
    finally:
        assert srv.stop() == 0, srv.log()
