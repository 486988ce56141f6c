"""Start-up and shutdown on the real server: readiness only after warm-up; SIGTERM drains accepted
work (every one answered), refuses new work on every front, and answers 503 past the drain period."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quicknet.api._generated import classifier_pb2 as pb
from quicknet.api._generated import classifier_pb2_grpc as pb_grpc
from quicknet.testing import FAST_MODEL, STORE, queued_images, start_server

RAW = {"Content-Type": "application/octet-stream"}


async def _load_then_sigterm(srv, body: bytes, n: int, during_drain=None) -> tuple[list, float, object]:
    """n requests in flight; SIGTERM once the engine's queue holds work; `during_drain(client)` runs then."""
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n + 8)) as client:
        tasks = [asyncio.create_task(client.post(f"{srv.url}/classify", content=body, headers=RAW)) for _ in range(n)]
        queued = await queued_images(client, srv.url)
        srv.proc.terminate()
        observed = await during_drain(client) if during_drain else None
        responses = await asyncio.gather(*tasks, return_exceptions=True)
        return responses, queued, observed


def test_sigterm_under_load_answers_every_accepted_request_and_refuses_new_work(tmp_path, cifar):
    srv = start_server(tmp_path, max_batch_size=16, max_queue_images=100_000, drain_seconds=60)
    body = np.repeat(cifar.test.images[:1], 256, axis=0).tobytes()

    async def refusals(client: httpx.AsyncClient) -> dict:
        await asyncio.sleep(0.2)  # the signal has been handled; the queue still holds seconds of work
        seen = {"readyz": (await client.get(f"{srv.url}/readyz")).status_code}
        r = await client.post(f"{srv.url}/classify", content=bytes(3072), headers=RAW)
        seen["rest"] = (r.status_code, r.json()["error"])
        async with grpc.aio.insecure_channel(srv.grpc_target) as ch:
            try:
                await pb_grpc.ClassifierStub(ch).Classify(pb.ClassifyRequest(image=pb.Image(pixels=bytes(3072))))
                seen["grpc"] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                seen["grpc"] = e.code()
            stub = health_pb2_grpc.HealthStub(ch)
            seen["health"] = [
                (await stub.Check(health_pb2.HealthCheckRequest(service=n))).status
                for n in ("", "quicknet.v1.Classifier", "inference.GRPCInferenceService")
            ]
        return seen

    responses, queued, seen = asyncio.run(_load_then_sigterm(srv, body, 24, refusals))
    assert queued > 0, "SIGTERM must arrive while work is queued"
    assert srv.proc.wait(120) == 0, srv.log()
    codes = [getattr(r, "status_code", repr(r)) for r in responses]
    assert codes == [200] * 24, "every request accepted before SIGTERM is answered"
    assert all(len(r.json()["predictions"]) == 256 for r in responses)
    assert seen["readyz"] == 503
    assert seen["rest"][0] == 503 and "shutting down" in seen["rest"][1]
    assert seen["grpc"] == grpc.StatusCode.UNAVAILABLE
    assert seen["health"] == [health_pb2.HealthCheckResponse.NOT_SERVING] * 3


def test_work_left_past_the_drain_period_is_answered_503(tmp_path, cifar):
    srv = start_server(tmp_path, max_batch_size=8, max_queue_images=100_000, drain_seconds=1)
    body = np.repeat(cifar.test.images[:1], 256, axis=0).tobytes()
    started = time.monotonic()
    # 64 x 256 images: several seconds of the engine's work (16 requests no longer outlast the
    # 1 s drain once quicknet-xs ran 1.7x faster)
    responses, queued, _ = asyncio.run(_load_then_sigterm(srv, body, 64))
    assert queued > 0
    assert srv.proc.wait(60) == 0, srv.log()
    codes = [getattr(r, "status_code", repr(r)) for r in responses]
    assert set(codes) <= {200, 503} and 503 in codes, codes  # answered, never reset or hung
    assert all("shutting down" in r.json()["error"] for r in responses if r.status_code == 503)
    assert time.monotonic() - started < 30
    assert "drain period ended with work still queued" in srv.log()


def test_ready_only_after_every_bucket_is_warmed(tmp_path):
    """While the engine warms up (buckets up to 1024: a second or more here) the process is live
    but not ready on every front: /readyz 503, /classify 503, gRPC health NOT_SERVING for every
    service, `quicknet probe --ready` fails; the first ready answer comes after the warm-up."""
    import os
    import shutil
    import subprocess
    import sys

    root = tmp_path / "store"  # without the model's own config.json, whose max batch of 16 would win
    shutil.copytree(STORE, root)
    (root / FAST_MODEL / "config.json").unlink(missing_ok=True)
    srv = start_server(tmp_path, store=root, max_batch_size=1024, wait_ready=False)
    names = ["", "quicknet.v1.Classifier", "inference.GRPCInferenceService"]
    seen_warming = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{srv.url}/readyz", timeout=1)
            except httpx.HTTPError:
                time.sleep(0.01)
                continue
            if ready.status_code == 200:
                break
            if seen_warming is None:
                live = httpx.get(f"{srv.url}/healthz").status_code
                refused = httpx.post(f"{srv.url}/classify", content=bytes(3072), headers=RAW)
                with grpc.insecure_channel(srv.grpc_target) as ch:
                    stub = health_pb2_grpc.HealthStub(ch)
                    health = [stub.Check(health_pb2.HealthCheckRequest(service=n)).status for n in names]
                env = {**os.environ, "QUICKNET_HTTP_PORT": str(srv.http_port)}
                probe = subprocess.run([sys.executable, "-m", "quicknet", "probe", "--ready"], env=env, timeout=30)
                seen_warming = (live, refused.status_code, refused.json()["error"], health, probe.returncode)
            time.sleep(0.005)
        first_ready_log = srv.log()
        assert seen_warming is not None, "never saw the server live and warming up"
        live, status, error, health, probe = seen_warming
        assert (live, status, probe) == (200, 503, 1) and error.startswith("model is not ready")
        assert health == [health_pb2.HealthCheckResponse.NOT_SERVING] * 3
        assert "warmed up" in first_ready_log, "ready before the engine ran every batch bucket"
        with grpc.insecure_channel(srv.grpc_target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            assert [stub.Check(health_pb2.HealthCheckRequest(service=n)).status for n in names] == [
                health_pb2.HealthCheckResponse.SERVING
            ] * 3
    finally:
        assert srv.stop() == 0


def test_callers_on_kept_alive_connections_lose_nothing_to_shutdown(tmp_path):
    """Callers that keep sending through SIGTERM on kept-alive connections: each request is answered
    (200, or 503 with `Connection: close` while draining) or finds the port closed; none is sent on
    a connection the server then drops unread (a read error the caller cannot tell from a lost
    request)."""
    srv = start_server(tmp_path)

    async def hammer() -> list:
        outcomes: list = []
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:

            async def caller() -> None:
                while True:
                    try:
                        r = await client.post(f"{srv.url}/classify", content=bytes(3072), headers=RAW)
                    except httpx.ConnectError:
                        return  # the port is closed: the caller knows to go elsewhere
                    except httpx.TransportError as e:
                        outcomes.append(type(e).__name__)
                        continue
                    outcomes.append((r.status_code, r.headers.get("connection")))

            callers = [asyncio.create_task(caller()) for _ in range(32)]
            await asyncio.sleep(1.0)
            srv.proc.terminate()
            await asyncio.wait_for(asyncio.gather(*callers), 60)
        return outcomes

    outcomes = asyncio.run(hammer())
    assert srv.proc.wait(60) == 0, srv.log()
    lost = [o for o in outcomes if isinstance(o, str)]
    assert not lost, f"{len(lost)} requests lost: {sorted(set(lost))}"
    refused = [o for o in outcomes if o[0] == 503]
    assert refused and all(header == "close" for _, header in refused), "draining answers close the connection"
    assert {status for status, _ in outcomes} <= {200, 503}
