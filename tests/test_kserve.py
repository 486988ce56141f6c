"""Triton's own clients (tritonclient.http and .grpc), unchanged, against the real server.

The store holds two models, one in two versions, to show every model and version is served.
This module imports tritonclient, so it must not import our generated KServe stubs (both
register `inference.*` in protobuf's default pool).
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from PIL import Image
from tritonclient.utils import InferenceServerException

from quicknet import store
from quicknet.testing import metric, publish_shipped, start_server
from tests.hung import assert_nothing_else_computed, computed_images, held_engine, the_server_gives_up_first

MODEL = "quicknet-xs"
RAW = {"Content-Type": "application/octet-stream"}
OTHER = "twin"


@pytest.fixture(scope="module")
def kserve_store(tmp_path_factory):
    """Our shipped model as `quicknet-xs` v1 and v2, plus a second model `twin`."""
    root = tmp_path_factory.mktemp("store")
    for name in (MODEL, MODEL, OTHER):
        publish_shipped(root, name)
    store.set_default(root, MODEL)
    return root


@pytest.fixture(scope="module")
def server(kserve_store, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("logs"), store=kserve_store, version_policy="all")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def http(server):
    return thttp.InferenceServerClient(f"127.0.0.1:{server.http_port}")


@pytest.fixture(scope="module")
def grpc_client(server):
    return tgrpc.InferenceServerClient(server.grpc_target)


@pytest.fixture(scope="module")
def samples(cifar):
    return cifar.test.sample(24, seed=21)


@pytest.fixture(scope="module")
def classify_top1(server, samples) -> np.ndarray:
    """What our own /classify answers for the same images."""
    r = httpx.post(
        f"{server.url}/classify",
        content=samples.images.tobytes(),
        headers={"Content-Type": "application/octet-stream"},
        params={"top_k": 1},
    )
    assert r.status_code == 200, r.text
    return np.array([preds[0]["index"] for preds in r.json()["predictions"]])


def test_health_and_server_metadata(http, grpc_client):
    for client in (http, grpc_client):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1") and client.is_model_ready(OTHER)
    meta = http.get_server_metadata()
    assert meta["name"] == "quicknet-serving"
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    assert "classification" in grpc_client.get_server_metadata().extensions


def test_model_metadata_and_config(http, grpc_client):
    meta = http.get_model_metadata(MODEL)
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    gmeta = grpc_client.get_model_metadata(MODEL, "2")
    assert list(gmeta.inputs[0].shape) == [-1, 32, 32, 3] and gmeta.outputs[0].datatype == "FP32"
    config = http.get_model_config(MODEL)
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [32, 32, 3]
    gconfig = grpc_client.get_model_config(MODEL).config
    assert gconfig.max_batch_size == 64 and list(gconfig.output[0].dims) == [10]
    assert gconfig.input[0].data_type == 2  # TYPE_UINT8 in Triton's enum


@pytest.mark.parametrize("binary", [True, False])
def test_http_inference_matches_classify(http, samples, classify_top1, binary):
    inp = thttp.InferInput("images", list(samples.images.shape), "UINT8")
    inp.set_data_from_numpy(samples.images, binary_data=binary)
    result = http.infer(MODEL, [inp], outputs=[thttp.InferRequestedOutput("logits", binary_data=binary)])
    logits = result.as_numpy("logits")
    assert logits.shape == (24, 10) and logits.dtype == np.float32
    assert np.array_equal(logits.argmax(1), classify_top1)


def test_grpc_inference_raw_and_typed_contents(grpc_client, samples, classify_top1):
    inp = tgrpc.InferInput("images", list(samples.images.shape), "UINT8")
    inp.set_data_from_numpy(samples.images)  # raw_input_contents
    raw = grpc_client.infer(MODEL, [inp]).as_numpy("logits")
    assert np.array_equal(raw.argmax(1), classify_top1)
    typed = tgrpc.InferInput("images", [2, 32, 32, 3], "UINT8")
    typed._get_tensor().contents.uint_contents.extend(samples.images[:2].reshape(-1).tolist())
    got = grpc_client.infer(MODEL, [typed]).as_numpy("logits")
    assert np.allclose(got, raw[:2], atol=1e-5)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_encoded_images_as_bytes_tensor(http, grpc_client, samples, classify_top1):
    blobs = np.array([_png(im) for im in samples.images[:6]], dtype=np.object_)
    inp = thttp.InferInput("images", [6], "BYTES")
    inp.set_data_from_numpy(blobs, binary_data=True)
    assert np.array_equal(http.infer(MODEL, [inp]).as_numpy("logits").argmax(1), classify_top1[:6])
    ginp = tgrpc.InferInput("images", [6], "BYTES")
    ginp.set_data_from_numpy(blobs)
    assert np.array_equal(grpc_client.infer(MODEL, [ginp]).as_numpy("logits").argmax(1), classify_top1[:6])


@pytest.mark.parametrize("binary", [True, False])
def test_classification_extension(http, grpc_client, samples, classify_top1, binary):
    inp = thttp.InferInput("images", [4, 32, 32, 3], "UINT8")
    inp.set_data_from_numpy(samples.images[:4], binary_data=binary)
    out = thttp.InferRequestedOutput("logits", binary_data=binary, class_count=3)
    rows = http.infer(MODEL, [inp], outputs=[out]).as_numpy("logits")
    assert rows.shape == (4, 3)
    for row, top1 in zip(rows, classify_top1[:4], strict=True):
        first = row[0].decode() if isinstance(row[0], bytes) else row[0]
        score, index, label = first.split(":")
        assert int(index) == top1 and 0 < float(score) <= 1 and label
    ginp = tgrpc.InferInput("images", [4, 32, 32, 3], "UINT8")
    ginp.set_data_from_numpy(samples.images[:4])
    grows = grpc_client.infer(MODEL, [ginp], outputs=[tgrpc.InferRequestedOutput("logits", class_count=2)])
    assert grows.as_numpy("logits").shape == (4, 2)


def test_versions_and_models_are_addressable(http, grpc_client, samples):
    inp = thttp.InferInput("images", [2, 32, 32, 3], "UINT8")
    inp.set_data_from_numpy(samples.images[:2])
    for name, version in ((MODEL, "1"), (MODEL, "2"), (OTHER, "")):
        result = http.infer(name, [inp], model_version=version)
        assert result.get_response()["model_name"] == name
        if version:
            assert result.get_response()["model_version"] == version


def test_infer_takes_the_version_from_the_query_where_the_path_has_none(server, samples):
    """As the model's GET routes do: `/v2/models/{name}/infer?version=N`."""
    doc = {
        "inputs": [
            {"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": samples.images[0].ravel().tolist()}
        ]
    }
    url = f"{server.url}/v2/models/{MODEL}/infer"
    assert httpx.post(url + "?version=1", json=doc).json()["model_version"] == "1"
    assert httpx.post(url, json=doc).json()["model_version"] == "2", "the newest without one"
    missing = httpx.post(url + "?version=99", json=doc)
    assert missing.status_code == 404 and "no version 99" in missing.json()["error"]


def test_unknown_model_and_version(server, http, grpc_client, samples):
    inp = thttp.InferInput("images", [1, 32, 32, 3], "UINT8")
    inp.set_data_from_numpy(samples.images[:1])
    with pytest.raises(InferenceServerException, match="'nope' is not served") as err:
        http.infer("nope", [inp])
    assert str(err.value.status()) == "404"
    with pytest.raises(InferenceServerException, match="no version 7"):
        http.get_model_metadata(MODEL, "7")
    with pytest.raises(InferenceServerException) as gerr:
        grpc_client.get_model_metadata("nope")
    assert gerr.value.status() == "StatusCode.NOT_FOUND"
    r = httpx.get(f"{server.url}/v2/models/nope")
    assert r.status_code == 404 and "is not served" in r.json()["error"]
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/versions/9/ready").status_code == 404


def _raw_http(server, body: dict | bytes, headers: dict | None = None) -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body)
    return httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers=headers or {})


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        ({"name": "images", "datatype": "UINT8", "shape": [1, 32, 32], "data": [0] * 1024}, "shape [N,32,32,3]"),
        ({"name": "images", "datatype": "FP32", "shape": [1, 32, 32, 3], "data": [0.0] * 3072}, "got FP32"),
        ({"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0] * 100}, "needs 3072"),
        ({"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0] * 3072}, "unknown input"),
        ({"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [300] * 3072}, "outside 0..255"),
        ({"name": "images", "datatype": "BYTES", "shape": [1], "data": ["@@@"]}, "base64"),
    ],
)
def test_malformed_json_tensors_get_clear_400(server, tensor, fragment):
    r = _raw_http(server, {"inputs": [tensor]})
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]


def test_binary_byte_count_mismatch(server, http, grpc_client, samples):
    header = (
        b'{"inputs":[{"name":"images","datatype":"UINT8","shape":[2,32,32,3],"parameters":{"binary_data_size":3072}}]}'
    )
    body = header + samples.images[:1].tobytes()
    r = _raw_http(server, body, {"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "needs 6144" in r.json()["error"]
    r = _raw_http(server, b"{bad", {"Inference-Header-Content-Length": "4"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    inp = tgrpc.InferInput("images", [3, 32, 32, 3], "UINT8")
    inp.set_data_from_numpy(samples.images[:3])
    inp._get_tensor().shape[0] = 4  # claims 4 images, carries 3
    with pytest.raises(InferenceServerException) as err:
        grpc_client.infer(MODEL, [inp])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "needs" in err.value.message()


def test_statistics_count_inferences(http, grpc_client, samples):
    before = http.get_inference_statistics(MODEL, "2")["model_stats"][0]["inference_count"]
    inp = thttp.InferInput("images", [5, 32, 32, 3], "UINT8")
    inp.set_data_from_numpy(samples.images[:5])
    http.infer(MODEL, [inp], model_version="2")
    stats = http.get_inference_statistics(MODEL, "2")["model_stats"][0]
    assert stats["inference_count"] == before + 5 and stats["execution_count"] >= 1
    # Triton's semantics (what perf_analyzer checks): the per-request counts agree with each other
    counts = {k: v["count"] for k, v in stats["inference_stats"].items() if k != "fail"}
    assert len(set(counts.values())) == 1 and counts["success"] >= 1, counts
    for b in stats["batch_stats"]:
        assert b["compute_input"]["count"] == b["compute_infer"]["count"] == b["compute_output"]["count"] >= 1
    gstats = grpc_client.get_inference_statistics(MODEL, "2").model_stats[0]
    assert gstats.inference_count == stats["inference_count"]
    assert len(http.get_inference_statistics()["model_stats"]) == 3


def test_grpc_stream_infer(grpc_client, samples, classify_top1):
    results, done = [], threading.Event()

    def callback(result, error):
        results.append((result, error))
        if len(results) == 4:
            done.set()

    grpc_client.start_stream(callback=callback)
    try:
        for i in range(3):
            inp = tgrpc.InferInput("images", [1, 32, 32, 3], "UINT8")
            inp.set_data_from_numpy(samples.images[i : i + 1])
            grpc_client.async_stream_infer(MODEL, [inp], request_id=str(i))
        bad = tgrpc.InferInput("images", [1, 32, 32, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.float32))
        grpc_client.async_stream_infer(MODEL, [bad], request_id="bad")
        assert done.wait(30)
    finally:
        grpc_client.stop_stream()
    ok = [(r, e) for r, e in results if e is None]
    assert len(ok) == 3 and sum(e is not None for _, e in results) == 1
    by_id = {r.get_response().id: r.as_numpy("logits").argmax(1)[0] for r, _ in ok}
    assert [by_id[str(i)] for i in range(3)] == classify_top1[:3].tolist()


def _one_image_json(samples) -> dict:
    return {
        "inputs": [
            {
                "name": "images",
                "datatype": "UINT8",
                "shape": [1, 32, 32, 3],
                "data": samples.images[0].reshape(-1).tolist(),
            }
        ]
    }


def test_kserve_requests_are_counted_under_their_protocol(server, http, grpc_client, samples):
    before = httpx.get(f"{server.url}/metrics").text
    inp = thttp.InferInput("images", [3, 32, 32, 3], "UINT8")
    inp.set_data_from_numpy(samples.images[:3])
    http.infer(MODEL, [inp])
    ginp = tgrpc.InferInput("images", [2, 32, 32, 3], "UINT8")
    ginp.set_data_from_numpy(samples.images[:2])
    grpc_client.infer(MODEL, [ginp])
    r = httpx.post(
        f"{server.url}/v2/models/{MODEL}/infer",
        json=_one_image_json(samples),
        headers={"X-Request-Timeout-Ms": "0.001"},
    )
    assert r.status_code == 504
    after = httpx.get(f"{server.url}/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("quicknet_images_total", protocol="kserve-rest") == 3
    assert delta("quicknet_images_total", protocol="kserve-grpc") == 2
    assert delta("quicknet_rejections_total", protocol="kserve-rest", reason="deadline") == 1
    assert (
        delta(
            "quicknet_request_duration_seconds_count",
            protocol="kserve-rest",
            endpoint="/v2/models/{name}/infer",
            code="200",
        )
        == 1
    )
    assert (
        delta(
            "quicknet_request_duration_seconds_count",
            protocol="kserve-rest",
            endpoint="/v2/models/{name}/infer",
            code="504",
        )
        == 1
    )
    assert (
        delta("quicknet_request_duration_seconds_count", protocol="kserve-grpc", endpoint="ModelInfer", code="OK") == 1
    )


def _in_background(call, n: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=call) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def _wait_until_queued(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(httpx.get(f"{server.url}/metrics").text, "quicknet_queue_images") == 0:
        assert time.monotonic() < deadline, "nothing queued"
        time.sleep(0.005)


def test_kserve_grpc_deadline_passing_in_the_queue(hung_server, samples):
    """The engine is held busy for HANG_S (tests/hung.py), so a 0.2 s deadline passes in the queue
    on any CPU; the server answers DEADLINE_EXCEEDED itself and never computes the request."""
    server = hung_server
    inp = tgrpc.InferInput("images", [1, 32, 32, 3], "UINT8")
    inp.set_data_from_numpy(samples.images[:1])

    def attempt():
        before = (httpx.get(f"{server.url}/metrics").text, computed_images(server))
        client = tgrpc.InferenceServerClient(server.grpc_target)
        assert client.is_server_live()  # connected before the hold starts
        with held_engine(server):
            try:
                client.infer(MODEL, [inp], client_timeout=0.2)
            except InferenceServerException as e:
                assert e.status() == "StatusCode.DEADLINE_EXCEEDED", e
                return e.message(), before
        return "answered: the hold ended before the call reached the queue", before

    before, computed = the_server_gives_up_first(attempt)
    after = httpx.get(f"{server.url}/metrics").text
    assert (
        metric(after, "quicknet_rejections_total", protocol="kserve-grpc", reason="deadline")
        - metric(before, "quicknet_rejections_total", protocol="kserve-grpc", reason="deadline")
        == 1
    )
    assert metric(after, "quicknet_images_total", protocol="kserve-grpc") == metric(
        before, "quicknet_images_total", protocol="kserve-grpc"
    ), "a request past its deadline was computed"
    assert_nothing_else_computed(server, computed)


def test_kserve_too_many_images_is_413_and_invalid_argument(server, grpc_client):
    big = np.zeros((257, 32, 32, 3), np.uint8)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [257, 32, 32, 3],
                    "parameters": {"binary_data_size": big.nbytes},
                }
            ]
        }
    ).encode()
    r = _raw_http(server, header + big.tobytes(), {"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 413 and "limit is 256" in r.json()["error"]
    inp = tgrpc.InferInput("images", [257, 32, 32, 3], "UINT8")
    inp.set_data_from_numpy(big)
    with pytest.raises(InferenceServerException) as err:
        grpc_client.infer(MODEL, [inp])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "limit is 256" in err.value.message()


def test_kserve_full_queue_is_429_and_draining_is_503(kserve_store, tmp_path, samples):
    # every engine batch takes 50 ms more, so the queue fills and the drain lasts seconds, on any CPU
    srv = start_server(
        tmp_path,
        store=kserve_store,
        max_queue_images=64,
        max_batch_size=8,
        drain_seconds=30,
        fault_injection="hang-every=1,hang-seconds=0.05",
    )
    try:
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "UINT8",
                        "shape": [64, 32, 32, 3],
                        "parameters": {"binary_data_size": 64 * 3072},
                    }
                ]
            }
        ).encode()
        body = header + bytes(64 * 3072)
        headers = {"Inference-Header-Content-Length": str(len(header))}

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=40)) as client:
                url = f"{srv.url}/v2/models/{MODEL}/infer"
                return await asyncio.gather(*(client.post(url, content=body, headers=headers) for _ in range(30)))

        codes = [r.status_code for r in asyncio.run(burst())]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        gclient = tgrpc.InferenceServerClient(srv.grpc_target)
        inp = tgrpc.InferInput("images", [1, 32, 32, 3], "UINT8")
        inp.set_data_from_numpy(samples.images[:1])
        url = f"{srv.url}/v2/models/{MODEL}/infer"
        fillers = _in_background(lambda: httpx.post(url, content=body, headers=headers, timeout=60), 3)
        _wait_until_queued(srv)
        srv.proc.terminate()
        time.sleep(0.2)
        r = httpx.post(f"{srv.url}/v2/models/{MODEL}/infer", json=_one_image_json(samples))
        assert r.status_code == 503 and "shutting down" in r.json()["error"]
        with pytest.raises(InferenceServerException) as err:
            gclient.infer(MODEL, [inp])
        assert err.value.status() == "StatusCode.UNAVAILABLE"
        for t in fillers:
            t.join(60)
        assert srv.proc.wait(60) == 0, srv.log()
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.mark.parametrize("binary", [True, False])
def test_kserve_sdk_rest_client(server, samples, classify_top1, tmp_path, binary):
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("kserve") is None:
        pytest.skip("the kserve SDK is not installed (dev extra)")
    pixels = tmp_path / "pixels.npy"
    np.save(pixels, samples.images[:8])
    script = str(__import__("pathlib").Path(__file__).with_name("kserve_sdk_client.py"))
    out = subprocess.run(
        [sys.executable, script, server.url, MODEL, str(pixels), "1" if binary else "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["live"] and result["ready"] and result["model_ready"]
    assert result["top1"] == classify_top1[:8].tolist()
