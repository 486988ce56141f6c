"""The Python client (`quicknet.client`) and the batch `quicknet classify` built on it, against a
real `quicknet serve` (one per module), plus tiny fake servers where a test needs the server to
refuse on cue (429 / RESOURCE_EXHAUSTED with a Retry-After)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from quicknet.api._generated import classifier_pb2 as pb
from quicknet.api._generated import classifier_pb2_grpc as pb_grpc
from quicknet.client import AsyncClient, Client, Prediction, QuickNetClientError, Result, Retry
from quicknet.testing import REPO, metric, start_server

TRANSPORTS = ("rest", "grpc")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("client"))
    yield srv
    assert srv.stop() == 0, srv.log()


def _url(server, transport: str) -> str:
    """REST without a scheme on purpose: `host:port` means http."""
    return f"127.0.0.1:{server.http_port}" if transport == "rest" else f"grpc://{server.grpc_target}"


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _counts(server) -> dict[str, float]:
    """Answered requests by front. Successes only: a request an earlier test gave up on (its deadline
    test) may still be finishing on the server, and would be counted when it ends."""
    text = httpx.get(f"{server.url}/metrics").text
    count = "quicknet_request_duration_seconds_count"
    return {
        "rest": metric(text, count, endpoint="/classify", protocol="rest", code="200"),
        "grpc": metric(text, count, endpoint="ClassifyBatch", protocol="grpc", code="OK"),
        "too_many": metric(text, "quicknet_rejections_total", reason="too_many_images"),
    }


# --- the library, against the real server -------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_input_kind_gets_the_same_answer(server, test_images, tmp_path, transport):
    """A path (str and Path), encoded bytes, a uint8 array (raw pixels on the wire) and a PIL image
    of the same pixels get the same Result; one batch of every kind agrees with them, mixed or not."""
    pixels = test_images.images[0]
    path = tmp_path / "one.png"
    path.write_bytes(_png(pixels))
    with Client(_url(server, transport)) as client:
        answers = [client.classify(x) for x in (str(path), path, _png(pixels), pixels, Image.fromarray(pixels))]
        assert all(a == answers[0] for a in answers), answers
        first = answers[0]
        assert isinstance(first, Result) and first.model == "quicknet-xs" and first.version
        assert len(first.predictions) == 5 and all(isinstance(p, Prediction) for p in first.predictions)
        assert first.label == first.predictions[0].label and 0 < first.score <= 1
        assert [p.score for p in first.predictions] == sorted((p.score for p in first.predictions), reverse=True)

        mixed = client.classify_batch([path, _png(pixels), pixels, Image.fromarray(pixels)], top_k=2)
        assert [r.predictions for r in mixed] == [first.predictions[:2]] * 4
        stack = test_images.images[:6]
        raw = client.classify_batch(stack)  # one N x 32 x 32 x 3 array: raw pixels
        encoded = client.classify_batch([_png(p) for p in stack])
        assert raw == encoded and raw[0] == first
        big = client.classify(np.repeat(np.repeat(pixels, 2, 0), 2, 1))  # 64x64: sent encoded, resized by the server
        assert big.label in {p.label for p in first.predictions}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_async_client_agrees_with_the_sync_one(server, test_images, transport):
    images = list(test_images.images[:40])

    async def run() -> tuple[Result, list]:
        async with AsyncClient(_url(server, transport), max_images_per_request=8, max_concurrency=3) as client:
            one = await client.classify(images[0])
            many, again = await asyncio.gather(client.classify_batch(images), client.classify_batch(images[:5]))
            assert again == many[:5]
            return one, many

    one, many = asyncio.run(run())
    with Client(_url(server, transport)) as client:
        assert many == client.classify_batch(images) and one == many[0]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_many_images_go_in_requests_under_the_servers_limit(server, test_images, transport):
    images = np.concatenate([test_images.images, test_images.images[:88]])  # 600
    before = _counts(server)
    with Client(_url(server, transport)) as client:
        results = client.classify_batch(images, top_k=1)
    after = _counts(server)
    assert len(results) == 600 and results[512:] == results[:88]
    assert after[transport] - before[transport] == 3, "256 + 256 + 88"
    assert after["too_many"] == before["too_many"], "no request was over the limit"
    labels = np.array([r.predictions[0].index for r in results[:512]])
    assert (labels == test_images.labels).mean() > 0.6, "the answers are the model's, in input order"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_smaller_limit_named_by_the_server_is_learned(server, test_images, transport):
    """The client assumes 1,000 images a request; the server's 413 names 256 and the client splits."""
    images = test_images.images[:300]
    before = _counts(server)
    with Client(_url(server, transport), max_images_per_request=1000) as client:
        results = client.classify_batch(images)
        assert client.limits.max_images == 256
    after = _counts(server)
    assert len(results) == 300 and all(isinstance(r, Result) for r in results)
    assert after["too_many"] - before["too_many"] == 1
    assert after[transport] - before[transport] == 2, "after the refused one (too_many), 256 + 44"


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_deadline_that_expires_is_a_504(server, transport, mode):
    """Eight 2000x2000 images take the server far longer to decode than the 50 ms allowed: the call
    ends at its deadline, not when the server is done, and is not retried."""
    ramp = np.linspace(0, 255, 2000, dtype=np.uint8)
    planes = [np.tile(ramp, (2000, 1)), np.tile(ramp[:, None], (1, 2000)), np.zeros((2000, 2000), np.uint8)]
    big = _png(np.stack(planes, -1))
    url = _url(server, transport)

    async def run_async():
        async with AsyncClient(url) as client:
            await client.classify_batch([big] * 8, timeout=0.05)

    start = time.monotonic()
    with pytest.raises(QuickNetClientError) as err:
        if mode == "sync":
            with Client(url) as client:
                client.classify_batch([big] * 8, timeout=0.05)
        else:
            asyncio.run(run_async())
    elapsed = time.monotonic() - start
    assert err.value.status == 504 and not err.value.retryable, err.value
    assert 0.04 <= elapsed < 5, elapsed


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_bad_image_is_one_error_with_the_servers_message(server, test_images, transport):
    good = _png(test_images.images[0])
    truncated = _png(np.tile(test_images.images[1], (4, 4, 1)))[:200]
    said = httpx.post(f"{server.url}/classify", content=truncated, headers={"Content-Type": "image/png"})
    assert said.status_code == 400
    with Client(_url(server, transport)) as client:
        with pytest.raises(QuickNetClientError) as err:
            client.classify(truncated)
        assert err.value.status == 400 and err.value.image == 0
        assert err.value.message == said.json()["error"], "the server's own one-line message"
        assert err.value.message.startswith("image 1 is damaged or truncated")
        assert (err.value.grpc_code == "INVALID_ARGUMENT") == (transport == "grpc")

        with pytest.raises(QuickNetClientError) as err:  # the caller's index, not the request's
            client.classify_batch([good, good, truncated, good])
        assert err.value.image == 2 and err.value.status == 400

        outcomes = client.classify_batch([good, truncated, good, b"not an image"], return_exceptions=True)
        assert outcomes[0] == outcomes[2] == client.classify(good)
        assert [o.image for o in outcomes[1::2]] == [1, 3]
        assert outcomes[3].status == (415 if transport == "rest" else 400)
        assert outcomes[3].reason == "not a recognised image (send PNG, JPEG, WebP, BMP or GIF)"


def test_the_readmes_python_example_runs_as_written(server):
    """The README's example, verbatim but for the port, from the repository root."""
    import re

    text = (REPO / "README.md").read_text()
    (example,) = re.findall(r"### Python client\n\n```python\n(.*?)```", text, re.S)
    code = example.replace("127.0.0.1:8000", f"127.0.0.1:{server.http_port}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUICKNET_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "cat" and [line.split()[0] for line in lines[1:]] == ["ship", "airplane"], lines


def test_urls_and_the_default_from_the_environment(server, monkeypatch):
    for name in ("QUICKNET_URL", "QUICKNET_HTTP_PORT", "QUICKNET_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with Client() as client:
        assert client.url == "http://127.0.0.1:8000"
    monkeypatch.setenv("QUICKNET_HTTP_PORT", str(server.http_port))
    with Client() as client:
        assert client.url == server.url and client.classify(REPO / "examples" / "cat.png").label == "cat"
    monkeypatch.setenv("QUICKNET_URL", f"localhost:{server.http_port}/")
    with Client() as client:
        assert client.url == f"http://localhost:{server.http_port}"
        assert client.classify(REPO / "examples" / "cat.png").label == "cat"
    with Client(f"grpc://{server.grpc_target}") as client:
        assert client.classify(REPO / "examples" / "cat.png").label == "cat"
    with Client("grpc://localhost") as client:
        assert client.url == "grpc://localhost:8001"
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        Client("ftp://127.0.0.1:8000")


def test_an_unreachable_server_is_retried_then_one_error(monkeypatch):
    import socket

    from quicknet.testing import free_port

    hint = (
        "is `quicknet serve` running there? Another address: the client's url (--url or --grpc on the command line), "
        "or QUICKNET_URL"
    )
    port = free_port()
    for url in (f"127.0.0.1:{port}", f"grpc://127.0.0.1:{port}"):
        with Client(url, retry=Retry(attempts=3, backoff_s=0.05)) as client, pytest.raises(QuickNetClientError) as err:
            client.classify(REPO / "examples" / "cat.png")
        assert err.value.status is None and err.value.retryable
        assert "cannot reach" in str(err.value) and str(err.value).endswith(hint), err.value

    async def refused_async() -> str:  # its error says only "All connection attempts failed"
        async with AsyncClient(f"127.0.0.1:{port}", retry=Retry(attempts=1)) as client:
            with pytest.raises(QuickNetClientError) as err:
                await client.classify(REPO / "examples" / "cat.png")
        return str(err.value)

    assert asyncio.run(refused_async()).endswith(hint)

    def no_such_name(host, *args, **kwargs):  # a name that does not resolve, without asking the host's DNS
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    for proxy in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    unresolved = Client("http://nonexistent.invalid:8000", retry=Retry(attempts=1))  # not a refusal: no such hint
    with unresolved as client, pytest.raises(QuickNetClientError) as err:
        client.classify(REPO / "examples" / "cat.png")
    assert "cannot reach" in str(err.value) and "quicknet serve" not in str(err.value), err.value


def test_inputs_are_checked_before_anything_is_sent():
    with Client("127.0.0.1:9") as client:
        with pytest.raises(ValueError, match="uint8"):
            client.classify(np.zeros((32, 32, 3), np.float32))
        with pytest.raises(ValueError, match="H x W x 3"):
            client.classify(np.zeros((32, 32), np.uint8))
        with pytest.raises(TypeError, match="list of images"):
            client.classify_batch("examples/cat.png")
        with pytest.raises(TypeError):
            client.classify(42)
    with pytest.raises(ValueError, match="whole number"):
        Client("127.0.0.1:9", version=0)


# --- retries, against fake servers that refuse on cue -------------------------------------------

ANSWER = {"model": "fake", "version": "1", "predictions": [[{"label": "cat", "index": 3, "score": 0.5}]]}


@contextmanager
def _fake_rest(script: list[tuple[int, dict]]) -> Iterator[tuple[str, list[dict]]]:
    """Answers POST /classify from `script` (status, headers), the last entry forever after; 200s
    carry ANSWER. Yields its URL and the headers of every request it got, with the time."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append({**{k.lower(): v for k, v in self.headers.items()}, "at": time.monotonic()})
            status, headers = script[min(len(seen), len(script)) - 1]
            body = json.dumps(ANSWER if status == 200 else {"error": "queue full (1024 images queued)"}).encode()
            self.send_response(status)
            for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextmanager
def _fake_grpc(refusals: int, retry_after: str) -> Iterator[tuple[str, list[dict]]]:
    """A Classifier that answers RESOURCE_EXHAUSTED with `retry-after` trailing metadata (as the
    real server does when its queue is full) `refusals` times, then classifies everything a cat."""
    seen: list[dict] = []

    class Flaky(pb_grpc.ClassifierServicer):
        def ClassifyBatch(self, request, context):
            seen.append({**dict(context.invocation_metadata()), "at": time.monotonic()})
            if len(seen) <= refusals:
                context.set_trailing_metadata((("retry-after", retry_after),))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full (retry after 1s)")
            cat = pb.Classification(predictions=[pb.Prediction(label="cat", index=3, score=0.5)])
            return pb.ClassifyBatchResponse(model="fake", version="1", results=[cat] * len(request.images))

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ClassifierServicer_to_server(Flaky(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"grpc://127.0.0.1:{port}", seen
    finally:
        server.stop(None)


def _classify(url: str, mode: str, **options) -> Result:
    cat = REPO / "examples" / "cat.png"
    if mode == "sync":
        with Client(url, **options) as client:
            return client.classify(cat)

    async def run() -> Result:
        async with AsyncClient(url, **options) as client:
            return await client.classify(cat)

    return asyncio.run(run())


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_refusal_is_retried_after_the_servers_retry_after(transport, mode):
    """429 + `Retry-After: 1` (REST) or RESOURCE_EXHAUSTED + `retry-after: 1` metadata (gRPC), then
    an answer: the client waited at least the second it was told, though its own backoff is 10 ms."""
    fake = _fake_rest([(429, {"Retry-After": "1"}), (200, {})]) if transport == "rest" else _fake_grpc(1, "1")
    with fake as (url, seen):
        result = _classify(url, mode, retry=Retry(attempts=3, backoff_s=0.01), api_key="k" * 24, timeout=20)
    assert result.label == "cat" and result.model == "fake"
    assert len(seen) == 2
    assert seen[1]["at"] - seen[0]["at"] >= 1.0, "Retry-After was honoured"
    assert seen[0]["authorization"] == "Bearer " + "k" * 24
    if transport == "rest":
        assert 19_000 < float(seen[0]["x-request-timeout-ms"]) <= 20_000, "the deadline travels with the request"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_retries_are_bounded_and_keep_to_the_deadline(transport):
    fake = _fake_rest([(503, {})]) if transport == "rest" else _fake_grpc(99, "0")
    with fake as (url, seen), Client(url, retry=Retry(attempts=3, backoff_s=0.01)) as client:
        with pytest.raises(QuickNetClientError) as err:
            client.classify(b"x")
        assert len(seen) == 3, "three attempts in all"
        assert err.value.status == (503 if transport == "rest" else 429) and err.value.retryable
    far = _fake_rest([(429, {"Retry-After": "30"})]) if transport == "rest" else _fake_grpc(99, "30")
    with far as (url, seen), Client(url, timeout=1.0) as client:
        start = time.monotonic()
        with pytest.raises(QuickNetClientError) as err:
            client.classify(b"x")
        assert time.monotonic() - start < 1.0 and len(seen) == 1, "a wait past the deadline is not taken"
        assert err.value.status == 429 and err.value.retry_after == 30


# --- `quicknet classify`, the batch tool ----------------------------------------------------------


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUICKNET_")}
    return subprocess.run(
        [sys.executable, "-m", "quicknet", "classify", *args],
        cwd=REPO,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _tree(root: Path, images: np.ndarray) -> list[Path]:
    """root/a.png, root/b.jpg, root/sub/c.png, root/sub/deeper/d.webp, and files that are not images."""
    names = ["a.png", "b.jpg", "sub/c.png", "sub/deeper/d.webp"]
    paths = []
    for name, pixels in zip(names, images, strict=False):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=95)
        paths.append(path)
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / ".hidden.png").write_bytes(b"not an image either")
    return paths


def _jsonl(stdout: str) -> dict[str, str]:
    return {(d := json.loads(line))["image"]: d["predictions"][0]["label"] for line in stdout.splitlines()}


def test_cli_takes_folders_globs_and_paths_on_stdin(server, test_images, tmp_path):
    paths = _tree(tmp_path / "imgs", test_images.images)
    url = f"127.0.0.1:{server.http_port}"  # no scheme

    folder = _cli(str(tmp_path / "imgs"), "--url", url, "--format", "jsonl")
    assert folder.returncode == 0 and folder.stderr == "", folder.stderr
    assert list(_jsonl(folder.stdout)) == sorted(str(p) for p in paths), "recursive, images only, in order"

    pattern = _cli(str(tmp_path / "imgs" / "**" / "*.png"), "--url", url, "--json")
    assert pattern.returncode == 0, pattern.stderr
    assert set(_jsonl(pattern.stdout)) == {str(paths[0]), str(paths[2])}

    listed = _cli("-", "--url", url, "--json", stdin=f"{paths[3]}\n{paths[1]}\n\n")
    assert listed.returncode == 0, listed.stderr
    assert list(_jsonl(listed.stdout)) == [str(paths[3]), str(paths[1])]

    table = _cli(str(paths[0]), "-", "--url", url, "--top-k", "2", stdin=f"{paths[1]}\n")
    lines = table.stdout.splitlines()
    assert table.returncode == 0 and len(lines) == 2 and lines[0].startswith(f"{paths[0]}: ")
    assert all(line.count(", ") == 1 for line in lines), "two classes each"


def test_cli_splits_hundreds_of_images_and_writes_csv(server, test_images, tmp_path):
    images = test_images.images[:300]
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(tmp_path / f"{i:03d}.png")
    before = _counts(server)
    out = _cli(str(tmp_path), "--url", server.url, "--format", "csv", "--top-k", "2", "--concurrency", "1")
    after = _counts(server)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert list(rows[0]) == ["image", "rank", "label", "index", "score", "model", "version"]
    assert len(rows) == 600 and [r["rank"] for r in rows[:4]] == ["1", "2", "1", "2"]
    assert [r["image"] for r in rows[::2]] == [str(tmp_path / f"{i:03d}.png") for i in range(300)]
    assert after["rest"] - before["rest"] == 2 and after["too_many"] == before["too_many"], "256 + 44"
    with Client(server.url) as client:
        expected = client.classify_batch(images, top_k=1)
    assert [r["label"] for r in rows[::2]] == [r.label for r in expected]
    assert [float(r["score"]) for r in rows[::2]] == [r.score for r in expected]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cli_lists_what_failed_and_exits_1(server, test_images, tmp_path, transport):
    paths = _tree(tmp_path / "imgs", test_images.images)
    (tmp_path / "imgs" / "sub" / "broken.png").write_text("this is text")
    target = ["--url", server.url] if transport == "rest" else ["--grpc", server.grpc_target]
    missing = str(tmp_path / "gone.png")
    out = _cli(str(tmp_path / "imgs"), missing, str(tmp_path / "none-*.jpg"), *target, "--json")
    assert out.returncode == 1
    assert set(_jsonl(out.stdout)) == {str(p) for p in paths}, "every good image is still classified"
    assert out.stderr.splitlines() == [
        "3 of 7 inputs failed:",
        f"{missing}: not found",
        f"{tmp_path / 'none-*.jpg'}: no file matches this pattern",
        f"{tmp_path / 'imgs' / 'sub' / 'broken.png'}: not a recognised image (send PNG, JPEG, WebP, BMP or GIF)",
    ]


def test_cli_whole_run_errors_are_one_line_and_exit_2(server):
    cat = str(REPO / "examples" / "cat.png")
    bad_k = _cli(cat, "--url", server.url, "--top-k", "11")
    assert bad_k.returncode == 2 and bad_k.stderr == "error: server answered 400: top_k must be from 1 to 10, got 11\n"
    nothing = _cli("-", "--url", server.url, stdin="")
    assert nothing.returncode == 2 and nothing.stderr.startswith("error: no images to classify")


def test_cli_needs_only_the_client_extra(server, tmp_path):
    """torch and every server library shadowed by modules that fail on import: classify still runs."""
    stubs = tmp_path / "stubs"
    for name in ("torch", "fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "onnxruntime", "orjson"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('quicknet classify imported {name}')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUICKNET_")}
    env["PYTHONPATH"] = str(stubs)
    cat = str(REPO / "examples" / "cat.png")
    for target in (["--url", server.url], ["--grpc", server.grpc_target]):
        out = subprocess.run(
            [sys.executable, "-m", "quicknet", "classify", cat, *target],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and out.stdout.startswith(f"{cat}: cat "), out.stderr


def test_cli_shows_a_progress_bar_only_on_a_terminal(server, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes((REPO / "examples" / "cat.png").read_bytes())
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUICKNET_")}
    args = [sys.executable, "-m", "quicknet", "classify", str(tmp_path), "--url", server.url]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = bytearray()

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child and its terminal are gone
                return
            if not data:
                return
            seen.extend(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stdout, _ = proc.communicate(timeout=60)
    reader.join(10)
    os.close(master)
    assert proc.returncode == 0
    assert b"/5 [" in seen and b"img/s" in seen, seen
    assert stdout.decode().count(": cat ") == 5 and b"img/s" not in stdout, "results alone on stdout"


def test_pooled_connections_expire_after_4_s_idle_before_the_servers_5(monkeypatch):
    """A kept-alive connection idle for 4 s is dropped by the client (a new one is opened), so it
    never sends on one the server (idle limit 5 s by default) is closing. The pool's clock is faked."""
    import httpcore._sync.http11

    from quicknet.serve.config import Settings

    assert Settings().http_idle_timeout_s == 5
    now = [1000.0]
    monkeypatch.setattr(httpcore._sync.http11.time, "monotonic", lambda: now[0])
    connections: set[tuple] = set()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            connections.add(self.client_address)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    stub = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        with Client(f"127.0.0.1:{stub.server_port}") as client:
            http = client._transport._http  # the pool every request of this client goes through
            seen = []
            for idle in (0, 3.9, 4.1):
                now[0] += idle
                assert http.get("/").status_code == 200
                seen.append(len(connections))
        assert seen == [1, 1, 2], "kept for 3.9 s idle, dropped after 4.1 s"
    finally:
        stub.shutdown()
        stub.server_close()
