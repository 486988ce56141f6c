"""Hardening, round 2 (issue 22): bounded inflates on every PNG path, a limited REST request head,
bounded parsing work on the event loop, escaped log fields, and errors that echo nothing large or
internal. Each test here failed on the code before it."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import time
import zlib
from typing import ClassVar

import httpx
import numpy as np
import pytest
from PIL import Image

from quicknet.serve import images
from quicknet.serve.errors import InputError
from quicknet.serve.images import Limits, decode_image

LIMITS = Limits(max_image_bytes=8 << 20, max_image_pixels=40_000_000, max_images=256)


# --- 2. every inflate is bounded ---------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(*chunks: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0)  # 32x32 8-bit RGB: the fast path's image
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(chunks) + _chunk(b"IEND", b"")


def _deflated(n: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(bytes(n)) + c.flush()


def _stored_then_bomb(bomb_bytes: int) -> bytes:
    """First IDAT: the zlib header and a stored (non-final) block one byte longer than the 32 rows;
    second IDAT: a deflate bomb. Before the fix the fast path's second inflate got max_length 0."""
    rows = bytes(images._SCANLINES + 1)
    first = b"\x78\x01" + b"\x00" + struct.pack("<HH", len(rows), len(rows) ^ 0xFFFF) + rows
    return _png(_chunk(b"IDAT", first), _chunk(b"IDAT", _deflated(bomb_bytes)))


class _CountingInflate:
    """zlib.decompressobj, counting every byte it produces and every max_length it is given."""

    produced = 0
    limits: ClassVar[list[int]] = []

    def __init__(self, *args):
        self._real = _REAL_DECOMPRESSOBJ(*args)

    def decompress(self, data, max_length=0):
        _CountingInflate.limits.append(max_length)
        out = self._real.decompress(data, max_length)
        _CountingInflate.produced += len(out)
        return out

    def __getattr__(self, name):
        return getattr(self._real, name)


_REAL_DECOMPRESSOBJ = zlib.decompressobj


@pytest.fixture
def inflates(monkeypatch):
    """Every Python-level inflate (the fast path's, Pillow's text chunks'), counted."""
    _CountingInflate.produced, _CountingInflate.limits = 0, []
    monkeypatch.setattr(zlib, "decompressobj", _CountingInflate)
    return _CountingInflate


def _pillow_answer(data: bytes):
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def test_fast_png_path_never_inflates_without_a_limit(inflates):
    bomb = _stored_then_bomb(64 << 20)  # ~64 KiB that inflate to 64 MiB
    assert len(bomb) < 80_000
    assert not images._intact(bomb)  # more image data than 32 rows: not the fast path's
    assert 0 not in inflates.limits, "max_length=0 is zlib's 'no limit'"
    assert inflates.produced <= images._SCANLINES + 1, f"inflated {inflates.produced} bytes"


def test_stored_block_bomb_answers_like_pillow_without_inflating_it(inflates):
    bomb = _stored_then_bomb(64 << 20)
    pixels = decode_image(bomb, LIMITS)
    assert inflates.produced <= images._SCANLINES + 1, f"inflated {inflates.produced} bytes"
    assert np.array_equal(pixels, _pillow_answer(bomb))


def test_png_text_chunks_cannot_inflate_a_bomb(inflates):
    """60 zTXt chunks of ~1 KiB, each inflating to 1 MiB: Pillow's own cap was 64 MiB of text."""
    plain = io.BytesIO()
    Image.new("RGB", (32, 32)).save(plain, "PNG")
    one = zlib.compress(bytes((1 << 20) - 100), 9)
    text = b"".join(_chunk(b"zTXt", b"k%d\0\0" % i + one) for i in range(60))
    data = plain.getvalue()[:33] + text + plain.getvalue()[33:]
    assert len(data) < 80_000
    with pytest.raises(InputError) as err:
        decode_image(data, LIMITS)
    assert err.value.status == 400
    assert inflates.produced <= 6 << 20, f"inflated {inflates.produced >> 20} MiB"
    for leak in ("MAX_TEXT_CHUNK", "PngImagePlugin", "Error", "PIL"):  # Pillow's own words stay in the log
        assert leak not in str(err.value), str(err.value)


# --- 9. image errors say what is wrong, not how the library failed -------------------------------


def _damaged_images() -> dict[str, bytes]:
    good = io.BytesIO()
    Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)).save(good, "PNG")
    png = good.getvalue()
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(jpeg, "JPEG")
    bad_crc = bytearray(png)
    bad_crc[40] ^= 0xFF
    return {
        "truncated png": png[: len(png) // 2],
        "bad chunk crc": bytes(bad_crc),
        "png header only": png[:33],
        "png, huge chunk length": png[:33] + b"\x7f\xff\xff\xffIDAT",
        "truncated jpeg": jpeg.getvalue()[:200],
        "gif, no frames": b"GIF89a\x20\x00\x20\x00\x00\x00\x00;",
        "bmp, bad offset": b"BM"
        + b"\0" * 8
        + b"\xff\xff\xff\x7f"
        + struct.pack("<IiiHH", 40, 32, 32, 1, 24)
        + b"\0" * 24,
    }


@pytest.mark.parametrize("case", sorted(_damaged_images()))
def test_image_errors_name_no_exception_class_or_library_internals(case):
    with pytest.raises(InputError) as err:
        decode_image(_damaged_images()[case], LIMITS)
    message = str(err.value)
    assert err.value.status < 500
    assert message.startswith("image 1 "), message
    for leak in ("Error", "Exception", "Plugin", "PIL", "MAX_TEXT", "Traceback", "0x", "b'"):
        assert leak not in message, f"{case}: {message!r}"


# --- 6. the REST request head is limited ---------------------------------------------------------


class _Transport(asyncio.Transport):
    """What uvicorn's protocol writes to, kept in memory."""

    def __init__(self):
        super().__init__()
        self.written, self.closing, self.eof = bytearray(), False, False

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data):
        self.written += data

    def write_eof(self):
        self.eof = True

    def can_write_eof(self):
        return True

    def close(self):
        self.closing = True

    def is_closing(self):
        return self.closing

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_write_buffer_size(self):
        return 0


class _CountingParser:
    """The protocol's httptools parser, counting the bytes it is fed."""

    def __init__(self, parser):
        self.parser, self.fed = parser, 0

    def feed_data(self, data):
        self.fed += len(data)
        return self.parser.feed_data(data)

    def __getattr__(self, name):
        return getattr(self.parser, name)


async def _app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _connection(*chunks: bytes, max_head_bytes: int = 64 << 10) -> tuple[bytes, int, _Transport]:
    """Feed `chunks` to one connection of the server's protocol; what it wrote, what its parser read."""
    import uvicorn
    from uvicorn.server import ServerState

    from quicknet.serve.transport.connections import protocol_for

    cls = protocol_for(10, 5, 30, max_head_bytes)
    config = uvicorn.Config(_app, http=cls, lifespan="off", log_config=None, access_log=False)
    config.load()
    protocol = cls(config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop())
    transport = _Transport()
    protocol.connection_made(transport)
    protocol.parser = parser = _CountingParser(protocol.parser)
    for chunk in chunks:
        protocol.data_received(chunk)
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    protocol.connection_lost(None)
    return bytes(transport.written), parser.fed, transport


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def test_a_32_mib_header_gets_431_after_the_limit_reached_the_parser():
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
    piece = b"a" * (256 << 10)
    chunks = [head, *[piece] * 128, b"\r\n\r\n"]  # 32 MiB, as a client's reads of 256 KiB arrive
    written, fed, transport = asyncio.run(_connection(*chunks))
    assert _status(written) == 431
    assert json.loads(written.partition(b"\r\n\r\n")[2]) == {"error": "request head exceeds 65536 bytes"}
    assert fed <= 64 << 10, f"the parser read {fed} bytes of one head"
    assert transport.eof, "closed lingering: the client, still sending, reads the 431 without a reset"


def test_a_head_just_under_the_limit_and_100_headers_are_served():
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 500) for i in range(99))
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    assert 50_000 < len(head) < 64 << 10
    written, _, _ = asyncio.run(_connection(head[:1000], head[1000:]))
    assert _status(written) == 200


def test_a_head_with_101_headers_gets_431():
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n"
    written, _, _ = asyncio.run(_connection(head))
    assert _status(written) == 431
    assert b"101 headers; the limit is 100" in written


def test_pipelined_requests_are_not_one_head():
    """Several small requests in one read, together over the limit: each head is its own."""
    one = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 4000 + b"\r\n\r\n"
    written, _, _ = asyncio.run(_connection(one * 40, max_head_bytes=8192))  # 160 KB in one read
    assert written.count(b"HTTP/1.1 200") == 40 and b"431" not in written


def test_a_huge_url_gets_431():
    written, fed, _ = asyncio.run(_connection(b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\n\r\n"))
    assert _status(written) == 431 and fed <= 64 << 10


# --- a running server with API keys: the head limit before the key check, the log, the echoes ------

KEY = "hardening-two-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "quicknet-xs"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from quicknet.testing import start_server

    root = tmp_path_factory.mktemp("hardening2")
    (root / "keys").write_text(KEY + "\n")
    srv = start_server(root, api_keys_file=root / "keys", warmup=False, precision="fp32")
    yield srv
    assert srv.stop() == 0, srv.log()


async def _exchange(srv, head: bytes, body_pieces: int = 0, piece: bytes = b"") -> bytes:
    """Send `head` then `body_pieces` copies of `piece` (while reading), return all the server sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.http_port)
    answer = asyncio.ensure_future(reader.read())

    async def send():
        try:
            writer.write(head)
            for _ in range(body_pieces):
                writer.write(piece)
                await writer.drain()
            writer.write(b"\r\n\r\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the server may close first: its answer is what counts

    sender = asyncio.ensure_future(send())
    data = await asyncio.wait_for(answer, 60)
    await asyncio.wait_for(sender, 60)
    writer.close()
    return data


def test_a_32_mib_header_without_a_key_gets_431_not_401(server):
    head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nX-Big: "
    data = asyncio.run(_exchange(server, head, 128, b"a" * (256 << 10)))  # 32 MiB of one header
    assert data.startswith(b"HTTP/1.1 431 "), data[:200]
    assert json.loads(data.partition(b"\r\n\r\n")[2]) == {"error": "request head exceeds 65536 bytes"}
    headers = "".join(f"X-H{i}: v\r\n" for i in range(150)).encode()
    data = asyncio.run(_exchange(server, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + headers[:-2]))
    assert data.startswith(b"HTTP/1.1 431 "), data[:200]
    r = httpx.get(f"{server.url}/v1/models", headers={**AUTH, **{f"X-H{i}": "v" * 400 for i in range(90)}})
    assert r.status_code == 200, r.text


def test_a_request_without_a_key_gets_401_before_any_body_is_read(server):
    """A head declaring a body, and no body: the 401 comes at once, on every front's routes (a
    server that read the body first would wait for it, and the socket times out)."""
    import socket

    routes = ("/classify", f"/v2/models/{MODEL}/infer", f"/v2/repository/models/{MODEL}/load")
    for path in routes:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 3072\r\n\r\n"
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock:
            sock.sendall(head.encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                assert chunk, (path, data)
                data += chunk
        assert data.startswith(b"HTTP/1.1 401 "), (path, data[:300])
        assert b"www-authenticate: bearer" in data.lower(), path


def test_log_fields_cannot_forge_a_line(server):
    forged = "2030-01-01 00:00:00,000 WARNING MainProcess quicknet.access: forged"
    for path in (f"/x%0A{forged}", f"/x%0D{forged}", f"/x%E2%80%A8{forged}", "/x%1B[31mred"):
        r = httpx.get(server.url + path)  # no key: refused, and logged all the same
        assert r.status_code == 401, r.text
    deadline = time.monotonic() + 10
    while "\\x1b[31mred" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = server.log().splitlines()
    assert not [line for line in lines if line.startswith("2030-01-01") or "forged" in line.split(":", 1)[0]]
    assert sum("GET /x\\x0a2030-01-01" in line for line in lines) == 1
    assert sum("GET /x\\x0d2030-01-01" in line for line in lines) == 1
    assert sum("GET /x\\u20282030-01-01" in line for line in lines) == 1
    assert sum("GET /x\\x1b[31mred 401" in line for line in lines) == 1
    assert not any(c in line for line in lines for c in "\x1b\r\u2028")


def _infer_doc(shape: list[int]) -> dict:
    return {"inputs": [{"name": "images", "datatype": "UINT8", "shape": shape, "data": [0]}]}


def test_a_kserve_error_echoes_no_huge_shape_on_rest(server):
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=_infer_doc([1] * 100_000), headers=AUTH)
    assert r.status_code == 400
    message = r.json()["error"]
    assert len(r.content) < 400, f"{len(r.content)} bytes"
    assert message.startswith("input 'images' of datatype UINT8 must have shape [N,32,32,3], got [1, 1, 1, 1, 1, …")
    assert "(100000 dims)" in message


def test_a_kserve_error_echoes_no_huge_shape_on_grpc(server):
    import grpc

    from quicknet.api._generated import grpc_predict_v2_pb2 as kpb
    from quicknet.api._generated import grpc_predict_v2_pb2_grpc as kpb_grpc

    request = kpb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="images", datatype="UINT8")
    tensor.shape.extend([1] * 1_000_000)
    tensor.contents.uint_contents.append(0)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, metadata=[("authorization", f"Bearer {KEY}")], timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "(1000000 dims)" in err.value.details() and len(err.value.details()) < 300


# --- 7. parsing on the event loop: the work is bounded before it starts -------------------------


def _request(body: bytes, content_type: str):
    from starlette.requests import Request

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/classify",
        "query_string": b"",
        "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())],
    }
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def _runtime():
    from quicknet.serve.config import Settings
    from quicknet.serve.runtime import Runtime

    return Runtime(Settings())


def test_a_multipart_flood_is_refused_before_any_part_is_split_or_parsed(monkeypatch):
    from quicknet.serve.classifier import rest as classifier_rest

    touched = []
    monkeypatch.setattr(classifier_rest, "_count_image_parts", lambda *a: touched.append("count") or 0)
    monkeypatch.setattr(classifier_rest, "MultiPartParser", lambda *a, **k: touched.append("parse"))
    body = b"--X" * ((8 << 20) // 3)  # 8 MiB, boundary X: ~2.8 M delimiters
    with pytest.raises(InputError) as err:
        asyncio.run(classifier_rest.parse_classify(_request(body, "multipart/form-data; boundary=X"), _runtime()))
    assert err.value.status == 413 and "the limit is 256 images" in str(err.value)
    assert touched == [], "refused on a count of delimiters, nothing split or parsed"


def test_a_12_mb_json_tensor_is_refused_before_it_is_parsed(monkeypatch):
    from quicknet.serve.kserve import rest as kserve_rest

    parsed = []
    real_loads = json.loads
    monkeypatch.setattr(json, "loads", lambda *a, **k: parsed.append(1) or real_loads(*a, **k))
    data = b"0," * (6 << 20)
    body = b'{"inputs":[{"name":"images","datatype":"UINT8","shape":[256,32,32,3],"data":[' + data + b"0]}]}"
    limits = _runtime().limits
    with pytest.raises(InputError) as err:
        kserve_rest._parse_body(body, None, kserve_rest.max_json_values(limits))
    assert err.value.status == 413 and parsed == []
    # the largest tensor the limits allow is still parsed
    most = b"0," * (limits.max_images * 3072 - 1)
    doc, _ = kserve_rest._parse_body(body.replace(data, most), None, kserve_rest.max_json_values(limits))
    assert len(doc["inputs"][0]["data"]) == limits.max_images * 3072


def test_a_classify_json_flood_is_refused_before_it_is_parsed(monkeypatch):
    from quicknet.serve.classifier import rest as classifier_rest

    parsed = []
    real_loads = json.loads
    monkeypatch.setattr(json, "loads", lambda *a, **k: parsed.append(1) or real_loads(*a, **k))
    body = b'{"images": [' + b'"",' * (4 << 20) + b'""]}'
    with pytest.raises(InputError) as err:
        asyncio.run(classifier_rest.parse_classify(_request(body, "application/json"), _runtime()))
    assert err.value.status == 413 and parsed == []


def test_grpc_uint_contents_are_counted_before_they_are_copied(monkeypatch):
    from quicknet.api._generated import grpc_predict_v2_pb2 as kpb
    from quicknet.serve import kserve
    from quicknet.serve.kserve import grpc as kserve_grpc

    copied = []
    monkeypatch.setattr(kserve, "_integers", lambda values: copied.append(len(values)))
    request = kpb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 3])
    tensor.contents.uint_contents.extend(np.zeros(3_000_000, dtype=np.uint32))
    with pytest.raises(InputError, match=r"has 3000000 values; shape \[1, 32, 32, 3\] needs 3072"):
        kserve_grpc._images(request, _runtime())
    assert copied == [], "the count is checked on the repeated field itself"
    tensor.contents.ClearField("uint_contents")
    tensor.contents.uint_contents.extend(np.arange(3072, dtype=np.uint32) % 256)
    assert kserve_grpc._images(request, _runtime()).reshape(-1).tolist() == (np.arange(3072) % 256).tolist()


def test_grpc_bytes_contents_and_batches_are_counted_before_they_are_copied(monkeypatch):
    from quicknet.api._generated import classifier_pb2 as cpb
    from quicknet.api._generated import grpc_predict_v2_pb2 as kpb
    from quicknet.serve.classifier import grpc as classifier_grpc
    from quicknet.serve.kserve import grpc as kserve_grpc

    request = kpb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="images", datatype="BYTES", shape=[2_000_000])
    tensor.contents.bytes_contents.extend([b""] * 2_000_000)
    with pytest.raises(InputError, match="2000000 images in one request; the limit is 256"):
        kserve_grpc._images(request, _runtime())

    service = classifier_grpc.ClassifierService(_runtime())
    copied = []
    monkeypatch.setattr(service, "_classify", lambda images, *a: copied.append(len(images)))
    batch = cpb.ClassifyBatchRequest(images=[cpb.Image()] * 100_000)
    with pytest.raises(InputError, match="100000 images in one request"):
        asyncio.run(service._classify_batch(batch, None))
    assert copied == []


# --- 8. and 9., without a server ---------------------------------------------------------------


def test_text_log_lines_escape_every_control_character():
    import logging

    from quicknet.serve.logs import TextFormatter

    record = logging.LogRecord(
        "quicknet.access", logging.INFO, __file__, 1, "%s %s %d", ("GET", "/x\n2030 forged\r\x1b[2J\u2028", 404), None
    )
    record.request_id = "id\x07\n"
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert "/x\\x0a2030 forged\\x0d\\x1b[2J\\u2028 404" in line and line.endswith("request_id=id\\x07\\x0a")


def test_error_echoes_are_capped():
    from quicknet.serve.kserve import decode_input

    with pytest.raises(InputError) as err:
        decode_input("images", "UINT8", [7] * 1_000_000, LIMITS, values=[0])
    assert str(err.value).endswith("got [7, 7, 7, 7, 7, … (1000000 dims)]")
    with pytest.raises(InputError) as err:
        decode_input("x" * 1_000_000, "UINT8", [1, 32, 32, 3], LIMITS, values=[0])
    assert len(str(err.value)) < 100
    with pytest.raises(InputError) as err:
        decode_input("images", "Q" * 1_000_000, [1], LIMITS, values=[0])
    assert len(str(err.value)) < 200
