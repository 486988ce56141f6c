"""The real server on 127.0.0.1, driven by real clients (httpx, gRPC stubs)."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import socket
import threading
import time
import typing

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from quicknet import store
from quicknet.api._generated import classifier_pb2 as pb
from quicknet.api._generated import classifier_pb2_grpc as pb_grpc
from quicknet.build.ortrun import onnx_logits
from quicknet.testing import STORE, metric, start_server
from tests.hung import assert_nothing_else_computed, computed_images, held_engine, the_server_gives_up_first


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("logs"), max_queue_delay_ms=5, workers=2)  # the IPC path, in CI
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def served_version() -> store.ModelVersion:
    root = STORE
    return store.get_version(root, store.default_model(root))


@pytest.fixture(scope="module")
def samples(cifar):
    return cifar.test.sample(16, seed=11)


@pytest.fixture(scope="module")
def expected(server, samples, served_version):
    """Direct ONNX Runtime inference on the same pixels, with the file the server says it serves
    (`--precision auto` times FP32 and INT8 at start and may pick either): what every front must answer."""
    default = next(m for m in httpx.get(f"{server.url}/v1/models").json()["models"] if m["default"])
    logits = onnx_logits(served_version.file(default["backend"]["file"]), samples.images).astype(np.float64)
    z = np.exp(logits - logits.max(1, keepdims=True))  # float64, as the server computes it
    return z / z.sum(1, keepdims=True)


RAW = {"Content-Type": "application/octet-stream"}


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def assert_matches(preds: list[dict], probs: np.ndarray, k: int = 5) -> None:
    assert len(preds) == k
    order = np.argsort(-probs, kind="stable")[:k]  # INT8 logits tie exactly; the server's order is stable
    assert [p["index"] for p in preds] == order.tolist()
    assert np.allclose([p["score"] for p in preds], probs[order], atol=1e-5)


# --- REST, every input form ----------------------------------------------------------------


def test_multipart_single_image(server, samples, expected):
    r = httpx.post(f"{server.url}/classify", files={"image": ("a.png", png(samples.images[0]), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] and body["version"]
    assert_matches(body["predictions"], expected[0])
    assert r.headers["X-Request-ID"]
    timing = r.headers["Server-Timing"]
    assert "decode;dur=" in timing and "queue;dur=" in timing and "infer;dur=" in timing


def test_multipart_several_images(server, samples, expected):
    files = [("images", (f"{i}.png", png(samples.images[i]), "image/png")) for i in range(4)]
    r = httpx.post(f"{server.url}/classify", files=files, params={"top_k": 3})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 4
    for i in range(4):
        assert_matches(preds[i], expected[i], k=3)


def test_raw_image_body(server, samples, expected):
    r = httpx.post(f"{server.url}/classify", content=png(samples.images[1]), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert_matches(r.json()["predictions"], expected[1])


def test_json_single_and_several(server, samples, expected):
    one = {"image": base64.b64encode(png(samples.images[2])).decode(), "top_k": 2}
    r = httpx.post(f"{server.url}/classify", json=one)
    assert r.status_code == 200, r.text
    assert_matches(r.json()["predictions"], expected[2], k=2)
    several = {"images": [base64.b64encode(png(samples.images[i])).decode() for i in range(3, 6)]}
    r = httpx.post(f"{server.url}/classify", json=several)
    assert r.status_code == 200, r.text
    for j, preds in enumerate(r.json()["predictions"]):
        assert_matches(preds, expected[3 + j])


def test_raw_pixel_tensor(server, samples, expected):
    body = samples.images[:8].tobytes()
    r = httpx.post(f"{server.url}/classify", content=body, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    for i, preds in enumerate(r.json()["predictions"]):
        assert_matches(preds, expected[i])


def test_request_id_is_echoed(server, samples):
    r = httpx.post(
        f"{server.url}/classify",
        content=samples.images[:1].tobytes(),
        headers={"Content-Type": "application/octet-stream", "X-Request-ID": "abc-123"},
    )
    assert r.headers["X-Request-ID"] == "abc-123"


# --- REST errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "content", "status", "fragment"),
    [
        ({"Content-Type": "image/png"}, b"\x00garbage\xff" * 10, 415, "not a recognised image"),
        ({"Content-Type": "image/png"}, b"", 400, "empty request body"),
        ({"Content-Type": "text/plain"}, b"hello", 415, "unsupported Content-Type"),
        ({}, b"hello", 415, "has no Content-Type and its body is not a PNG"),
        (
            {"Content-Type": "application/x-www-form-urlencoded"},  # curl --data-binary's own
            b"hello",
            415,
            "says only application/x-www-form-urlencoded (curl's default for --data-binary) and its body is not a PNG",
        ),
        ({"Content-Type": "application/json"}, b"{not json", 400, "not valid JSON"),
        ({"Content-Type": "application/json"}, b'{"image": "***"}', 400, "not valid base64"),
        ({"Content-Type": "application/json"}, b'{"x": 1}', 400, "exactly one of"),
        ({"Content-Type": "application/octet-stream"}, b"\x00" * 100, 400, "multiple of 3072"),
        (
            {"Content-Type": "application/octet-stream", "X-Request-Timeout-Ms": "soon"},
            b"\x00" * 3072,
            400,
            "milliseconds",
        ),
    ],
)
def test_bad_requests_get_clear_4xx(server, headers, content, status, fragment):
    r = httpx.post(f"{server.url}/classify", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]
    assert "\n" not in r.json()["error"]


def test_bad_top_k_and_truncated_image(server, samples):
    r = httpx.post(
        f"{server.url}/classify",
        params={"top_k": 99},
        content=samples.images[:1].tobytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 400 and "top_k" in r.json()["error"]
    cut = png(samples.images[0])[:60]
    r = httpx.post(f"{server.url}/classify", content=cut, headers={"Content-Type": "image/png"})
    assert r.status_code == 400 and r.json()["error"].startswith("image 1 "), "counted from 1"


@pytest.mark.parametrize("n", [257, 300])
@pytest.mark.parametrize("form", ["multipart", "json", "raw"])
def test_too_many_images_is_one_rule_on_every_body_form(server, samples, form, n):
    tiny = png(samples.images[0])
    if form == "multipart":
        files = [("images", (f"{i}.png", tiny, "image/png")) for i in range(n)]
        r = httpx.post(f"{server.url}/classify", files=files)
    elif form == "json":
        r = httpx.post(f"{server.url}/classify", json={"images": [base64.b64encode(tiny).decode()] * n})
    else:
        r = httpx.post(f"{server.url}/classify", content=bytes(3072 * n), headers=RAW)
    assert r.status_code == 413, r.text
    assert r.json()["error"] == f"{n} images in one request; the limit is 256"


def test_image_and_images_fields_are_classified_together(server, samples, expected):
    files = [
        ("image", ("a.png", png(samples.images[0]), "image/png")),
        ("images", ("b.png", png(samples.images[1]), "image/png")),
        ("images", ("c.png", png(samples.images[2]), "image/png")),
    ]
    r = httpx.post(f"{server.url}/classify", files=files)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3
    for i in range(3):
        assert_matches(preds[i], expected[i])


def test_an_unset_file_field_from_the_docs_page_is_ignored(server, samples, expected):
    """Swagger UI's "Try it out" sends the unused `image` input as an empty, unnamed file part."""
    files = [
        ("image", ("", b"", "application/octet-stream")),
        ("images", ("b.png", png(samples.images[1]), "image/png")),
    ]
    r = httpx.post(f"{server.url}/classify", files=files)
    assert r.status_code == 200, r.text
    assert_matches(r.json()["predictions"][0], expected[1])


def test_decompression_bomb_is_refused_before_decoding(server):
    bomb = io.BytesIO()
    Image.new("L", (10000, 10000)).save(bomb, format="PNG", optimize=True)  # 100 Mpx in ~100 KB
    assert len(bomb.getvalue()) < 200_000
    r = httpx.post(f"{server.url}/classify", content=bomb.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and "pixels" in r.json()["error"]


def test_multipart_without_image_field(server):
    r = httpx.post(f"{server.url}/classify", files={"picture": ("a.png", b"x", "image/png")})
    assert r.status_code == 400 and "`image`, `images` or `file`" in r.json()["error"]


def test_a_text_field_where_the_file_should_be_says_so(server):
    """`curl -F image=examples/cat.png` (the @ forgotten) sends the path as text: said as such, not
    as an unrecognised image."""
    r = httpx.post(f"{server.url}/classify", files={"image": (None, "examples/cat.png")})  # no file name: text
    assert r.status_code == 400 and r.json()["error"] == (
        "form field `image` is text ('examples/cat.png'), not a file: send the file (curl: -F image=@path)"
    )


# --- deadlines, cancellation: each counted once, never computed ----------------------------


def _counts(server, protocol: str) -> tuple[float, float, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return (
        metric(text, "quicknet_images_total", protocol=protocol),
        metric(text, "quicknet_rejections_total", protocol=protocol, reason="deadline"),
        metric(text, "quicknet_rejections_total", protocol=protocol, reason="cancelled"),
    )


def test_rest_deadline_passing_in_the_queue_is_504_counted_once_never_computed(hung_server, samples):
    server = hung_server
    images_before, deadline_before, _ = _counts(server, "rest")
    computed = computed_images(server)
    in_flight = metric(httpx.get(f"{server.url}/metrics").text, "quicknet_batches_in_flight")
    with held_engine(server):  # the engine is busy for HANG_S: an 80 ms deadline passes in the queue
        r = httpx.post(
            f"{server.url}/classify",
            content=samples.images[:4].tobytes(),
            headers={**RAW, "X-Request-Timeout-Ms": "80"},
        )
        held = metric(httpx.get(f"{server.url}/metrics").text, "quicknet_batches_in_flight") > in_flight
    assert r.status_code == 504, r.text
    assert held, "the 504 waited for the engine's batch to end instead of answering at its deadline"
    images_after, deadline_after, _ = _counts(server, "rest")
    assert images_after - images_before == 1, "only the request holding the engine was answered"
    assert deadline_after - deadline_before == 1
    assert_nothing_else_computed(server, computed)


def test_grpc_deadline_passing_in_the_queue_is_the_servers_deadline_exceeded(hung_server, samples):
    server = hung_server

    def attempt():
        before = (_counts(server, "grpc"), computed_images(server))
        with grpc.insecure_channel(server.grpc_target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            grpc.channel_ready_future(ch).result(timeout=30)  # connected before the hold starts
            with held_engine(server):
                try:
                    stub.Classify(pb.ClassifyRequest(image=pb.Image(pixels=samples.images[0].tobytes())), timeout=0.2)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
                    return e.details() or "", before
        return "answered: the hold ended before the call reached the queue", before

    (images_before, deadline_before, cancelled_before), computed = the_server_gives_up_first(attempt)
    images_after, deadline_after, cancelled_after = _counts(server, "grpc")
    assert images_after == images_before, "a request past its deadline was computed"
    assert (deadline_after - deadline_before, cancelled_after - cancelled_before) == (1, 0)
    assert_nothing_else_computed(server, computed)


def test_rest_disconnect_drops_queued_images_and_counts_one_cancel(hung_server):
    server = hung_server
    _, _, cancelled_before = _counts(server, "rest")
    computed = computed_images(server)
    with held_engine(server), pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/classify", content=bytes(3072 * 256), headers=RAW, timeout=0.15)
    _wait_for(lambda: _counts(server, "rest")[2] > cancelled_before)
    assert _counts(server, "rest")[2] - cancelled_before == 1, "one request, one cancellation (not one per chunk)"
    assert_nothing_else_computed(server, computed)  # the 256 images left with their client
    assert re.search(r"POST /classify 499 ", server.log()), "the access log records 499"


async def _work(seen: list, seconds: float) -> str:
    """The engine call in the disconnect tests: answers after `seconds`, notes a cancel in `seen`."""
    try:
        await asyncio.sleep(seconds)
        return "answer"
    except asyncio.CancelledError:
        seen.append("cancelled")
        raise


class _Client:
    """A request as `run_unless_disconnected` sees it off our REST protocol (a test client, another
    server): no connection state in its scope, `receive()` says when the client leaves."""

    scope: typing.ClassVar[dict] = {}

    def __init__(self, leaves_after_s: float | None):
        self.leaves_after_s = leaves_after_s

    async def receive(self) -> dict:
        if self.leaves_after_s is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.leaves_after_s)
        return {"type": "http.disconnect"}


def test_the_engine_call_ends_with_the_client_or_the_server_never_later():
    """The call answers; or the client leaves and the call is cancelled (499); or the server
    cancels the handler (shutdown) and the call is cancelled with it, not left running, not a 499."""
    from quicknet.serve.transport.http import HTTPError, run_unless_disconnected

    seen = []

    def work(seconds: float):
        return _work(seen, seconds)

    async def answered():
        return await run_unless_disconnected(_Client(None), work(0.01))

    async def answered_as_the_client_leaves():
        """The disconnect and the answer in one turn of the loop, the disconnect first: the answer
        stands, and the handler goes on (sends it) with no stray cancel from the watcher."""
        loop = asyncio.get_running_loop()
        leave, answer = loop.create_future(), loop.create_future()

        class Client:
            scope: typing.ClassVar[dict] = {}

            async def receive(self) -> dict:
                await leave
                return {"type": "http.disconnect"}

        async def call():
            return await answer

        loop.call_later(0.01, lambda: (leave.set_result(None), answer.set_result("answer")))
        result = await run_unless_disconnected(Client(), call())
        await asyncio.sleep(0.05)
        return result

    async def client_leaves():
        with pytest.raises(HTTPError) as err:
            await run_unless_disconnected(_Client(0.01), work(10))
        assert asyncio.current_task().cancelling() == 0, "the 499 left a cancel pending"
        return err.value.status

    async def server_stops():
        handler = asyncio.ensure_future(run_unless_disconnected(_Client(None), work(10)))
        await asyncio.sleep(0.01)
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        await asyncio.sleep(0)
        return len([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])

    assert asyncio.run(answered()) == "answer" and seen == []
    assert asyncio.run(answered_as_the_client_leaves()) == "answer"
    assert asyncio.run(client_leaves()) == 499 and seen == ["cancelled"]
    assert asyncio.run(server_stops()) == 0 and seen == ["cancelled", "cancelled"]


def test_on_our_rest_protocol_the_connection_cancels_the_call_without_a_task_of_its_own():
    """The connection state (`transport.connections`) does the watcher's job: the call answers with
    no task created; the connection lost cancels it (499, no cancel left pending, reading resumed
    so a paused connection sees the client go); a handler cancelled by the server is not a 499; a
    client already gone is 499 before the work starts; and a body received whole needs no timer."""
    from quicknet.serve.transport.connections import CONNECTION, ConnectionState
    from quicknet.serve.transport.http import HTTPError, run_unless_disconnected
    from quicknet.serve.transport.middleware import BodyTimeout, body_deadline

    resumed = []
    seen = []

    class Request:
        def __init__(self) -> None:
            self.state = ConnectionState(lambda: resumed.append(1))
            self.scope = {CONNECTION: self.state}

    def work(seconds: float):
        return _work(seen, seconds)

    async def answered():
        before = len(asyncio.all_tasks())
        request = Request()
        call = run_unless_disconnected(request, work(0.01))
        task = asyncio.ensure_future(call)
        await asyncio.sleep(0)
        during = len(asyncio.all_tasks()) - 1  # less the call's own
        result = await task
        return result, during - before, request.state.handler

    async def client_leaves():
        request = Request()
        asyncio.get_running_loop().call_later(
            0.01, lambda: (setattr(request.state, "lost", True), request.state.handler.cancel())
        )
        with pytest.raises(HTTPError) as err:
            await run_unless_disconnected(request, work(10))
        assert asyncio.current_task().cancelling() == 0, "the 499 left a cancel pending"
        return err.value.status

    async def server_stops():
        handler = asyncio.ensure_future(run_unless_disconnected(Request(), work(10)))
        await asyncio.sleep(0.01)
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        return 0

    async def gone_before():
        request = Request()
        request.state.lost = True
        with pytest.raises(HTTPError) as err:
            await run_unless_disconnected(request, work(10))
        return err.value.status

    async def slow_receive():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def read(pending: bool):
        state = ConnectionState(lambda: None)
        state.body_pending = pending
        return await body_deadline(slow_receive, 0.01, state)()

    assert asyncio.run(answered()) == ("answer", 0, None) and seen == [] and resumed == [1]
    assert asyncio.run(client_leaves()) == 499 and seen == ["cancelled"]
    assert asyncio.run(server_stops()) == 0 and seen == ["cancelled", "cancelled"]
    assert asyncio.run(gone_before()) == 499 and seen == ["cancelled", "cancelled"], "the work never started"
    assert asyncio.run(read(pending=False))["type"] == "http.request", "a body already in: no deadline to miss"
    with pytest.raises(BodyTimeout):
        asyncio.run(read(pending=True))


def test_the_rest_protocol_hands_handlers_their_connection_and_cancels_their_work_when_lost():
    """Our uvicorn protocol puts the connection's state in every request's scope (a body received
    whole says so before it is read) and, when the connection is lost, cancels the task watching it."""
    import uvicorn
    from uvicorn.server import ServerState

    from quicknet.serve.transport.connections import CONNECTION, protocol_for
    from tests.test_hardening2 import _Transport

    seen: dict = {}

    async def app(scope, receive, send):
        state = scope[CONNECTION]
        seen["pending_at_start"] = state.body_pending
        seen["body"] = (await receive())["body"]
        state.watch(asyncio.current_task())
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen["cancelled_as_lost"] = state.lost
            raise

    async def main():
        cls = protocol_for(10, 5, 30)
        config = uvicorn.Config(app, http=cls, lifespan="off", log_config=None, access_log=False)
        config.load()
        protocol = cls(config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop())
        protocol.connection_made(_Transport())
        protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcd")
        await asyncio.sleep(0.05)
        protocol.connection_lost(None)
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert seen == {"pending_at_start": False, "body": b"abcd", "cancelled_as_lost": True}


def test_grpc_cancel_drops_queued_images_and_counts_one_cancel(hung_server):
    server = hung_server
    images_before, _, cancelled_before = _counts(server, "grpc")
    computed = computed_images(server)
    with held_engine(server), grpc.insecure_channel(server.grpc_target) as ch:
        call = pb_grpc.ClassifierStub(ch).ClassifyBatch.future(
            pb.ClassifyBatchRequest(images=[pb.Image(pixels=bytes(3072))] * 256)
        )
        _wait_for(lambda: metric(httpx.get(f"{server.url}/metrics").text, "quicknet_queue_images") >= 256)
        assert call.cancel()
    _wait_for(lambda: _counts(server, "grpc")[2] > cancelled_before)
    images_after, _, cancelled_after = _counts(server, "grpc")
    assert cancelled_after - cancelled_before == 1
    assert images_after == images_before
    assert_nothing_else_computed(server, computed)


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- gRPC ----------------------------------------------------------------------------------


def _grpc_preds(preds) -> list[dict]:
    return [{"label": p.label, "index": p.index, "score": p.score} for p in preds]


def test_grpc_unary_batch_and_stream(server, samples, expected):
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        one = stub.Classify(pb.ClassifyRequest(image=pb.Image(encoded=png(samples.images[0])), request_id="r0"))
        assert one.request_id == "r0"
        assert_matches(_grpc_preds(one.predictions), expected[0])
        batch = stub.ClassifyBatch(
            pb.ClassifyBatchRequest(images=[pb.Image(pixels=samples.images[i].tobytes()) for i in range(6)], top_k=3)
        )
        assert len(batch.results) == 6
        for i, res in enumerate(batch.results):
            assert_matches(_grpc_preds(res.predictions), expected[i], k=3)
        stream = stub.ClassifyStream(
            iter(
                [
                    pb.ClassifyRequest(image=pb.Image(encoded=png(samples.images[i])), request_id=str(i))
                    for i in range(5)
                ]
            )
        )
        answers = list(stream)
        assert [a.request_id for a in answers] == [str(i) for i in range(5)]
        for i, a in enumerate(answers):
            assert_matches(_grpc_preds(a.predictions), expected[i])


def test_grpc_errors_are_status_codes(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        for request, fragment in (
            (pb.ClassifyRequest(image=pb.Image(encoded=b"garbage")), "not a recognised image"),
            (pb.ClassifyRequest(), "is empty"),
            (pb.ClassifyRequest(image=pb.Image(pixels=b"\x00" * 10)), "3072"),
            (pb.ClassifyRequest(image=pb.Image(pixels=b"\x00" * 3072), top_k=50), "top_k"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert fragment in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.ClassifyBatch(pb.ClassifyBatchRequest(images=[pb.Image(pixels=b"\x00" * 3072)] * 300))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 256" in err.value.details()


def test_grpc_accepts_messages_over_the_4mib_default(server):
    images = [pb.Image(pixels=bytes(3072))] * 256  # small, but pad with a large encoded image
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)).save(big, "PNG")
    assert len(big.getvalue()) > 4 << 20
    with grpc.insecure_channel(server.grpc_target, options=[("grpc.max_send_message_length", 16 << 20)]) as ch:
        reply = pb_grpc.ClassifierStub(ch).ClassifyBatch(
            pb.ClassifyBatchRequest(images=[*images[:10], pb.Image(encoded=big.getvalue())])
        )
    assert len(reply.results) == 11


# --- health, reflection, metrics -----------------------------------------------------------


def test_health_readiness_and_model_list(server, served_version):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    models = httpx.get(f"{server.url}/v1/models").json()["models"]
    default = next(m for m in models if m["default"])
    assert default["name"] == served_version.name and default["version"] == str(served_version.version)
    with grpc.insecure_channel(server.grpc_target) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        # what grpcurl's `describe` asks: the .proto file that defines each service
        asks = [
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
            for name in ("quicknet.v1.Classifier", "inference.GRPCInferenceService", "grpc.health.v1.Health")
        ]
        files = [r.file_descriptor_response.file_descriptor_proto for r in refl.ServerReflectionInfo(iter(asks))]
    assert {"quicknet.v1.Classifier", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert all(len(f) == 1 and f[0] for f in files), "each service's .proto is served"


def test_request_metrics_carry_protocol_endpoint_and_code(server):
    def counts() -> dict:
        text = httpx.get(f"{server.url}/metrics").text
        labels = [
            ("rest", "/classify", "200"),
            ("rest", "/classify", "400"),
            ("grpc", "Classify", "OK"),
            ("grpc", "Classify", "INVALID_ARGUMENT"),
        ]
        return {
            k: metric(text, "quicknet_request_duration_seconds_count", protocol=k[0], endpoint=k[1], code=k[2])
            for k in labels
        }

    before = counts()
    assert httpx.post(f"{server.url}/classify", content=bytes(3072), headers=RAW).status_code == 200
    assert httpx.post(f"{server.url}/classify", content=bytes(10), headers=RAW).status_code == 400
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        stub.Classify(pb.ClassifyRequest(image=pb.Image(pixels=bytes(3072))))
        with pytest.raises(grpc.RpcError):
            stub.Classify(pb.ClassifyRequest(image=pb.Image(pixels=bytes(10))))
    after = counts()
    assert {k: after[k] - before[k] for k in after} == dict.fromkeys(after, 1)


def test_openapi_documents_every_body_form(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    content = spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/json", "application/octet-stream"} <= set(content)
    assert content["application/json"]["examples"]


async def _burst(url: str, bodies: list[bytes], headers: dict) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post(f"{url}/classify", content=b, headers=headers) for b in bodies))


async def _mixed_burst(url: str, samples, n: int) -> list[tuple[int, httpx.Response]]:
    """n requests at once, cycling through every REST body form; returns (image index, response)."""

    def request(client: httpx.AsyncClient, i: int):
        pixels = samples.images[i % 16]
        form = i % 4
        if form == 0:
            return client.post(f"{url}/classify", files={"image": ("a.png", png(pixels), "image/png")})
        if form == 1:
            return client.post(f"{url}/classify", content=png(pixels), headers={"Content-Type": "image/png"})
        if form == 2:
            return client.post(f"{url}/classify", json={"image": base64.b64encode(png(pixels)).decode()})
        return client.post(
            f"{url}/classify", content=pixels.tobytes(), headers={"Content-Type": "application/octet-stream"}
        )

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        responses = await asyncio.gather(*(request(client, i) for i in range(n)))
    return list(enumerate(responses))


def test_metrics_move_and_concurrent_mixed_requests_share_batches(server, samples, expected):
    before = httpx.get(f"{server.url}/metrics").text
    answered = asyncio.run(_mixed_burst(server.url, samples, 48))
    for i, r in answered:
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert_matches(preds[0] if i % 4 == 3 else preds, expected[i % 16])
    after = httpx.get(f"{server.url}/metrics").text
    grew = metric(after, "quicknet_images_total") - metric(before, "quicknet_images_total")
    assert grew == 48
    batches = metric(after, "quicknet_batch_size_count") - metric(before, "quicknet_batch_size_count")
    assert batches < 48, "48 concurrent one-image requests of four body forms never shared a batch"
    for name in (
        "quicknet_request_duration_seconds_bucket",
        "quicknet_decode_duration_seconds_count",
        "quicknet_queue_wait_seconds_count",
        "quicknet_inference_duration_seconds_count",
        "quicknet_queue_images",
        "quicknet_batches_in_flight",
        "quicknet_model_info",
        "quicknet_ready",
    ):
        assert name in after, name
    assert metric(after, "quicknet_ready") == 1


# --- overload and shutdown (own servers) ---------------------------------------------------


def test_burst_beyond_the_queue_gets_429_then_recovers(tmp_path, samples):
    srv = start_server(tmp_path, max_queue_images=64, max_batch_size=64)
    try:
        body = np.repeat(samples.images[:1], 64, axis=0).tobytes()
        responses = asyncio.run(_burst(srv.url, [body] * 40, {"Content-Type": "application/octet-stream"}))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
        rejected = next(r for r in responses if r.status_code == 429)
        assert int(rejected.headers["Retry-After"]) >= 1 and "capacity" in rejected.json()["error"]
        assert httpx.get(f"{srv.url}/readyz").status_code == 200
        # the default 256 images a request is more than this queue holds: said once at start
        (doubt,) = [line for line in srv.log().splitlines() if "--max-images-per-request" in line]
        assert "is more than --max-queue-images 64" in doubt and "429 every time" in doubt
        ok = httpx.post(f"{srv.url}/classify", content=body, headers={"Content-Type": "application/octet-stream"})
        assert ok.status_code == 200
        text = httpx.get(f"{srv.url}/metrics").text
        assert metric(text, "quicknet_rejections_total", reason="queue_full") == codes.count(429)
        with grpc.insecure_channel(srv.grpc_target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            futures = [
                stub.ClassifyBatch.future(pb.ClassifyBatchRequest(images=[pb.Image(pixels=bytes(3072))] * 64))
                for _ in range(40)
            ]
            codes = [f.code() for f in futures]
            refused = next(f for f in futures if f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert grpc.StatusCode.OK in codes
        assert int(dict(refused.trailing_metadata())["retry-after"]) >= 1, "gRPC refusals say when to retry too"
    finally:
        assert srv.stop() == 0


def head_alone(port: int, head: bytes, timeout: float = 5) -> bytes:
    """Send a request head that declares a body, send no body, and read the answer's head: what a
    server that answers before reading the body says (a socket timeout if it waits for the body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed without an answer: {data!r}"
            data += chunk
        return data


def test_a_full_queue_is_refused_before_the_body_is_read(tmp_path):
    """One process (REST refuses before the body there): the engine held, its queue full, a head
    declaring a body and no body gets 429 at once, on /classify and on KServe's infer."""
    srv = start_server(tmp_path, workers=1, max_queue_images=4, fault_injection="hang-every=1,hang-seconds=1")
    try:
        with held_engine(srv):
            queued = threading.Thread(
                target=lambda: httpx.post(f"{srv.url}/classify", content=bytes(3072 * 4), headers=RAW, timeout=60)
            )
            queued.start()
            _wait_for(lambda: metric(httpx.get(f"{srv.url}/metrics").text, "quicknet_queue_images") == 4)
            for path, kind in (
                ("/classify", "application/octet-stream"),
                ("/v2/models/quicknet-xs/infer", "application/json"),
            ):
                head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\nContent-Length: 3072\r\n\r\n"
                answer = head_alone(srv.http_port, head.encode())
                assert answer.startswith(b"HTTP/1.1 429 "), (path, answer[:300])
                assert b"retry-after:" in answer.lower(), path
            queued.join(60)
    finally:
        assert srv.stop() == 0, srv.log()


def test_cpu_service_never_imports_torch_on_the_default_path(tmp_path):
    """`auto` backend, torch installed: a stub `torch` that fails on import shadows it, so any
    import of torch anywhere in the serving process (choice, load, warm-up, requests) fails it."""
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('the CPU service imported torch')\n")
    srv = start_server(tmp_path, env={"PYTHONPATH": str(stub.parent)})
    try:
        r = httpx.post(f"{srv.url}/classify", content=bytes(3072), headers=RAW)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{srv.url}/v1/models").json()["models"][0]["backend"]["backend"] == "onnxruntime"
    finally:
        assert srv.stop() == 0, srv.log()
    assert "imported torch" not in srv.log()


def test_stubs_are_reproducible(tmp_path):
    from quicknet.api import protos

    protos.generate(tmp_path)
    for made in tmp_path.glob("*.py*"):
        committed = protos.OUT / made.name
        assert committed.read_text() == made.read_text(), f"{made.name} is stale: run `make protos`"


def test_settings_have_flags_and_env_twins():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "quicknet", "serve", "--help"], capture_output=True, text=True)
    assert "--http-port" in out.stdout and "QUICKNET_HTTP_PORT" in out.stdout
    assert "--max-queue-delay-ms" in out.stdout and "--backend" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "quicknet", "serve", "--http-port", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: invalid setting http_port")


def test_multipart_over_the_request_limit_is_413(tmp_path):
    srv = start_server(tmp_path, max_request_bytes=4096)
    try:
        big = png(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        assert len(big) > 4096
        r = httpx.post(f"{srv.url}/classify", files={"image": ("a.png", big, "image/png")})
        assert r.status_code == 413 and "limit is 4096" in r.json()["error"]
        r = httpx.post(f"{srv.url}/classify", content=big, headers={"Content-Type": "image/png"})
        assert r.status_code == 413
    finally:
        assert srv.stop() == 0


def test_framework_errors_share_the_error_shape(server):
    r = httpx.get(f"{server.url}/nope")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = httpx.get(f"{server.url}/classify")
    assert r.status_code == 405 and r.json() == {"error": "GET is not allowed on /classify: use POST"}
    assert r.headers["allow"] == "POST"
    r = httpx.post(f"{server.url}/classify", content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{server.url}/classify", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in r.json()["error"]
