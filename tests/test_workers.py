"""`--workers 2`: two front processes feeding one engine process, end to end.

The whole of tests/test_service.py also runs against a two-front server; this module covers
what only exists with several processes: one metrics view, crashes and restarts, drain order.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from quicknet.api._generated import classifier_pb2 as pb
from quicknet.api._generated import classifier_pb2_grpc as pb_grpc
from quicknet.testing import Server, metric, queued_images, start_server

RAW = {"Content-Type": "application/octet-stream"}


def _pids(server: Server) -> dict[str, int]:
    """Process name -> pid of the newest instance of each child, from the server log."""
    pids = {}
    for name, pid in re.findall(r"(front-\d+) uvicorn\.error: Started server process \[(\d+)\]", server.log()):
        pids[name] = int(pid)
    for pid in re.findall(r"engine ready: .* \(pid (\d+)\)", server.log()):
        pids["engine"] = int(pid)
    return pids


def _wait(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _ready(server: Server) -> bool:
    try:
        return httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("logs"), workers=2)
    _wait(lambda: len([k for k in _pids(srv) if k.startswith("front")]) == 2, what="two fronts")
    yield srv
    assert srv.stop() == 0, srv.log()


def test_every_protocol_through_the_engine_process_and_one_metrics_view(server, cifar):
    images = cifar.test.sample(8, seed=3).images
    before = metric(httpx.get(f"{server.url}/metrics").text, "quicknet_images_total")
    for _ in range(12):  # new connections each time: the kernel spreads them over both fronts
        r = httpx.post(f"{server.url}/classify", content=images.tobytes(), headers=RAW)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 8
    with grpc.insecure_channel(server.grpc_target) as ch:
        reply = pb_grpc.ClassifierStub(ch).ClassifyBatch(
            pb.ClassifyBatchRequest(images=[pb.Image(pixels=im.tobytes()) for im in images[:4]])
        )
    assert len(reply.results) == 4
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "quicknet_images_total") - before == 12 * 8 + 4, "every front's and the engine's counts merged"
    assert metric(text, "quicknet_ready") == 1
    fronts = set(re.findall(r"(front-\d) quicknet\.access: POST /classify", server.log()))
    assert fronts == {"front-0", "front-1"}, f"only {fronts} took requests"


def test_the_engine_and_front_processes_are_named_for_ps_and_top(server):
    pids = _pids(server)
    names = {name: Path(f"/proc/{pid}/comm").read_text().strip() for name, pid in pids.items()}
    assert names == {"engine": "quicknet-engine", "front-0": "quicknet-front", "front-1": "quicknet-front"}, names


def test_a_crashed_front_is_restarted(server):
    old = _pids(server)["front-1"]
    os.kill(old, signal.SIGKILL)
    _wait(lambda: _pids(server).get("front-1") not in (None, old), what="front-1 to restart")
    _wait(lambda: _ready(server), what="readiness")
    for _ in range(6):
        r = httpx.post(f"{server.url}/classify", content=bytes(3072), headers=RAW)
        assert r.status_code == 200
    assert "front-1 exited with -9; restarting it" in server.log()


def test_a_crashed_engine_fails_waiting_requests_fast_and_comes_back(tmp_path, cifar):
    srv = start_server(tmp_path, workers=2, max_batch_size=8, max_queue_images=100_000)
    try:
        body = np.repeat(cifar.test.images[:1], 256, axis=0).tobytes()

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                tasks = [
                    asyncio.create_task(client.post(f"{srv.url}/classify", content=body, headers=RAW))
                    for _ in range(16)
                ]
                for _ in range(200):  # kill the engine once its queue holds work
                    await asyncio.sleep(0.02)
                    if metric((await client.get(f"{srv.url}/metrics")).text, "quicknet_queue_images") > 0:
                        break
                os.kill(_pids(srv)["engine"], signal.SIGKILL)
                started = time.monotonic()
                responses = await asyncio.gather(*tasks)
                assert time.monotonic() - started < 5, "requests waiting on a dead engine must not hang"
                unready = (await client.get(f"{srv.url}/readyz")).status_code
                return responses, unready

        responses, unready = asyncio.run(scenario())
        codes = [r.status_code for r in responses]
        assert 503 in codes and set(codes) <= {200, 503}, codes
        assert unready == 503, "no engine: the fronts are out of readiness"
        _wait(lambda: _ready(srv), what="readiness after the engine restart")
        assert httpx.post(f"{srv.url}/classify", content=bytes(3072), headers=RAW).status_code == 200
        assert "engine exited with -9; restarting it" in srv.log()
    finally:
        assert srv.stop() == 0, srv.log()


def test_sigterm_drains_every_front_before_the_engine(tmp_path, cifar):
    srv = start_server(tmp_path, workers=2, max_batch_size=16, max_queue_images=100_000, drain_seconds=60)
    body = np.repeat(cifar.test.images[:1], 128, axis=0).tobytes()

    async def scenario() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            tasks = [
                asyncio.create_task(client.post(f"{srv.url}/classify", content=body, headers=RAW)) for _ in range(24)
            ]
            queued = await queued_images(client, srv.url)
            srv.proc.terminate()
            return await asyncio.gather(*tasks), queued

    responses, queued = asyncio.run(scenario())
    assert queued > 0, "SIGTERM must arrive while the engine holds queued work"
    assert srv.proc.wait(120) == 0, srv.log()
    assert [r.status_code for r in responses] == [200] * 24, srv.log()
    log = srv.log()
    engine_stopped = log.index("engine quicknet.service: engine stopped")
    for front in ("front-0", "front-1"):
        assert log.index(f"{front} quicknet.service: stopped") < engine_stopped, f"{front} stopped after the engine"


def test_kserve_rest_and_grpc_through_the_engine_process(server, cifar):
    import tritonclient.grpc as tgrpc  # never our own KServe stubs beside it: both register `inference.*`

    images = cifar.test.images[:3]
    body = {
        "inputs": [
            {"name": "images", "datatype": "UINT8", "shape": [3, 32, 32, 3], "data": images.reshape(-1).tolist()}
        ]
    }
    r = httpx.post(f"{server.url}/v2/models/quicknet-xs/infer", json=body)
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [3, 10]
    client = tgrpc.InferenceServerClient(server.grpc_target)
    inp = tgrpc.InferInput("images", [3, 32, 32, 3], "UINT8")
    inp.set_data_from_numpy(images)
    logits = client.infer("quicknet-xs", [inp]).as_numpy("logits")
    stats = client.get_inference_statistics("quicknet-xs")
    assert np.allclose(logits, np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(3, 10), atol=1e-5)
    assert stats.model_stats[0].inference_count >= 6, "statistics come from the engine process"


def test_a_request_larger_than_the_fronts_ring_is_429(tmp_path):
    """A front holds at most what the engine can queue (plus a batch per instance) in its shared
    memory; more is refused at once, like a full queue."""
    srv = start_server(tmp_path, workers=2, max_queue_images=32, max_batch_size=8)
    try:
        r = httpx.post(f"{srv.url}/classify", content=bytes(3072 * 64), headers=RAW)
        assert r.status_code == 429 and r.headers["Retry-After"]
        assert httpx.post(f"{srv.url}/classify", content=bytes(3072 * 8), headers=RAW).status_code == 200
    finally:
        assert srv.stop() == 0, srv.log()


FORK_AND_COUNT = """
import os
import sys
from quicknet.serve import metrics

calls = []
sys.setprofile(lambda frame, event, arg: event == "c_call" and arg is os.getpid and calls.append(1))
for _ in range(100):
    metrics.IMAGES.labels("m", "rest").inc()
sys.setprofile(None)
assert not calls, f"{len(calls)} getpid calls for 100 samples"
child = os.fork()
if child == 0:
    metrics.IMAGES.labels("m", "rest").inc(5)
    os._exit(0)
os.waitpid(child, 0)
print(os.getpid(), child)
"""


def test_metric_samples_do_not_ask_the_pid_each_time_and_a_forked_child_keeps_its_own(tmp_path):
    from prometheus_client import CollectorRegistry, multiprocess

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", FORK_AND_COUNT], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    parent, child = done.stdout.split()
    assert {p.name for p in tmp_path.glob("counter_*.db")} == {f"counter_{parent}.db", f"counter_{child}.db"}
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, str(tmp_path))
    assert registry.get_sample_value("quicknet_images_total", {"model": "m", "protocol": "rest"}) == 105


def test_auto_workers_on_a_machine_reporting_many_cores_binds_grpc_in_every_front(tmp_path):
    """`--workers 0` (auto) resolves to several fronts on a big machine; every one of them must share
    the gRPC port (SO_REUSEPORT followed the literal `workers`, so fronts 2..N could not bind it)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(  # 6 cores, and no cgroup CPU limit whatever the host has
        "import os\nos.sched_getaffinity = lambda pid: set(range(6))\n"
        "import quicknet.serve.config as c\nc.CPU_LIMIT_FILES = (c.Path('/nonexistent/a'), c.Path('/nonexistent/b'))\n"
    )
    srv = start_server(tmp_path, workers=0, env={"PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}"})
    try:
        _wait(lambda: len([k for k in _pids(srv) if k.startswith("front")]) == 3, what="three fronts (6 cores / 2)")
        for _ in range(12):  # new channels: the kernel spreads connections over the fronts
            with grpc.insecure_channel(srv.grpc_target) as channel:
                stub = pb_grpc.ClassifierStub(channel)
                answer = stub.Classify(pb.ClassifyRequest(image=pb.Image(pixels=bytes(3072))), timeout=30)
                assert answer.predictions
        assert "restarting it" not in srv.log() and "Failed to bind" not in srv.log(), srv.log()
        assert "Error in sitecustomize" not in srv.log(), "the fake machine was not set up"
    finally:
        assert srv.stop() == 0, srv.log()
