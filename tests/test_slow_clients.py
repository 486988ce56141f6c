"""Slow and idle clients on the REST port: each is closed on time (its timeout is a setting), and
while they hang, everyone else is served. The throughput others keep is measured in
`python -m benchmarks.reliability`; here, that they are served at all, and the limits hold."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time

import httpx
import pytest

from quicknet.testing import metric, start_server

LIMITS = {"http_idle_timeout_s": 1, "header_timeout_s": 1, "body_read_timeout_s": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("slow"), **LIMITS)
    yield srv
    assert srv.stop() == 0, srv.log()


async def _open(srv):
    return await asyncio.open_connection("127.0.0.1", srv.http_port)


async def _read_all(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed."""
    start = time.monotonic()
    data = await asyncio.wait_for(reader.read(), timeout)
    return data, time.monotonic() - start


def _status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def test_a_connection_that_says_nothing_is_closed(server):
    async def run():
        reader, writer = await _open(server)
        data, waited = await _read_all(reader, timeout=10)
        writer.close()
        return data, waited

    data, waited = asyncio.run(run())
    assert data == b"", "closed without a word: nothing was asked"
    assert waited < 5, f"closed after {waited:.1f}s; the idle limit is 1s"


def test_a_trickled_request_head_gets_408_and_is_closed(server):
    async def run():
        reader, writer = await _open(server)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        closed = asyncio.ensure_future(reader.read())
        while not closed.done() and time.monotonic() - start < 10:  # slowloris: a header byte at a time
            writer.write(b"X")
            await asyncio.sleep(0.1)
        data = await asyncio.wait_for(closed, 5)
        writer.close()
        return data, time.monotonic() - start

    data, waited = asyncio.run(run())
    status, body = _status_and_body(data)
    assert status == 408 and body == {"error": "request head not received in time"}
    assert waited < 5, f"the head had 1s; the connection lasted {waited:.1f}s"


def test_a_body_sent_a_byte_at_a_time_gets_408_and_is_closed(server):
    async def run():
        reader, writer = await _open(server)
        writer.write(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 3072\r\n\r\n"
        )
        start = time.monotonic()
        closed = asyncio.ensure_future(reader.read())
        while not closed.done() and time.monotonic() - start < 10:
            writer.write(b"\0")
            await asyncio.sleep(0.1)
        data = await asyncio.wait_for(closed, 5)
        writer.close()
        return data, time.monotonic() - start

    data, waited = asyncio.run(run())
    status, body = _status_and_body(data)
    assert status == 408 and body == {"error": "request body not received within 1s"}
    assert b"connection: close" in data.lower()
    assert waited < 5


def test_others_are_served_while_idle_and_slow_clients_hang(server):
    """300 idle connections, 20 slowloris heads and 20 byte-a-second uploads, all at once: every
    normal request in the meantime is answered 200, and every slow client is cut off on time."""

    async def slow_head():
        reader, writer = await _open(server)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        closed = asyncio.ensure_future(reader.read())
        while not closed.done():
            writer.write(b"X")
            await asyncio.sleep(0.2)
        return await closed

    async def slow_body():
        reader, writer = await _open(server)
        writer.write(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 3072\r\n\r\n")
        closed = asyncio.ensure_future(reader.read())
        while not closed.done():
            writer.write(b"\0")
            await asyncio.sleep(0.2)
        return await closed

    async def idle():
        reader, _writer = await _open(server)
        return await reader.read()

    async def run():
        hanging = [asyncio.ensure_future(idle()) for _ in range(300)]
        hanging += [asyncio.ensure_future(slow_head()) for _ in range(20)]
        hanging += [asyncio.ensure_future(slow_body()) for _ in range(20)]
        await asyncio.sleep(0.3)
        statuses = []
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            for _ in range(50):
                r = await client.post(
                    "/classify", content=bytes(3072), headers={"Content-Type": "application/octet-stream"}
                )
                statuses.append(r.status_code)
            ended = await asyncio.wait_for(asyncio.gather(*hanging), 15)
            text = (await client.get("/metrics")).text
        return statuses, ended, text

    statuses, ended, text = asyncio.run(run())
    assert statuses == [200] * 50
    assert sum(1 for data in ended if data.startswith(b"HTTP/1.1 408")) == 40, "every slow client heard 408"
    assert metric(text, "quicknet_rejections_total", reason="slow_client") >= 40


def test_a_request_refused_before_its_body_closes_its_connection(server):
    """413 by declared length, before the body: the rest of that body must not hold the socket
    under no timer (uvicorn's keep-alive timer stops at the next byte); it gets the body's limit."""

    async def run():
        reader, writer = await _open(server)
        writer.write(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 999999999\r\n\r\n"
        )
        start = time.monotonic()
        closed = asyncio.ensure_future(reader.read())
        while not closed.done() and time.monotonic() - start < 8:  # keep "uploading" a byte at a time
            writer.write(b"X")
            await asyncio.sleep(0.2)
        data = await asyncio.wait_for(closed, 5)
        writer.close()
        return data, time.monotonic() - start

    data, waited = asyncio.run(run())
    status, body = _status_and_body(data)
    assert status == 413 and "limit" in body["error"]
    assert 0.8 <= waited < 5, f"the refused upload held its connection {waited:.1f}s; it has the body's 1s"


def test_a_client_still_sending_after_a_408_reads_it_without_a_reset(server):
    """Lingering close: an upload too slow for the body's 1 s gets 408, and the client, still
    sending for half a second after the answer arrived, is never reset: every write succeeds (the
    server reads and drops them), then it reads the whole 408 and the server's orderly close."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 10000000\r\n\r\n"
        )
        start, answered = time.monotonic(), None
        while time.monotonic() - start < 8 and (answered is None or time.monotonic() - answered < 0.5):
            sock.sendall(b"\0" * 4096)  # still uploading (80 KiB/s), before and after the 408 arrives
            if answered is None and select.select([sock], [], [], 0)[0]:
                answered = time.monotonic()  # the 408 is here; keep writing, read it later
            time.sleep(0.05)
        assert answered is not None, "no answer within 8 s"
        assert 0.8 <= answered - start < 5, f"408 after {answered - start:.1f}s; the body has 1s"
        sock.shutdown(socket.SHUT_WR)  # done sending: the lingering server sees EOF and closes
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status, body = _status_and_body(data)
    assert status == 408 and body == {"error": "request body not received within 1s"}


def test_a_response_leaves_in_one_write_and_before_a_close():
    """uvicorn writes a response's head and body apart; the connection's transport sends what one
    loop iteration wrote in one system call, and a close sends what is pending first."""
    from quicknet.serve.transport.connections import _LingeringTransport

    class Raw:
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def is_closing(self) -> bool:
            return self.closed

        def can_write_eof(self) -> bool:
            return False

        def close(self) -> None:
            self.closed = True

    async def main() -> tuple[list[bytes], list[bytes], bool]:
        raw, later = Raw(), Raw()
        protocol = type("Protocol", (), {"loop": asyncio.get_running_loop(), "_lingering": False})()
        protocol._in_body = protocol._timing_head = False
        transport = _LingeringTransport(raw, protocol)
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"{}")
        assert raw.writes == [], "nothing leaves before the loop turns"
        await asyncio.sleep(0)
        closing = _LingeringTransport(later, protocol)
        closing.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        closing.close()
        return raw.writes, later.writes, later.closed

    writes, before_close, closed = asyncio.run(main())
    assert writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
    assert before_close == [b"HTTP/1.1 408 Request Timeout\r\n\r\n"] and closed


def _grpc_call_ports(srv, calls: int, pause_s: float) -> tuple[list[str], list]:
    """Classify one image `calls` times over one channel, `pause_s` apart: the client addresses the
    server's access log saw, and the channel's connectivity states in order."""
    import re

    import grpc

    from quicknet.api._generated import classifier_pb2 as pb
    from quicknet.api._generated import classifier_pb2_grpc as pb_grpc

    states = []
    with grpc.insecure_channel(srv.grpc_target) as channel:
        channel.subscribe(states.append, try_to_connect=False)
        stub = pb_grpc.ClassifierStub(channel)
        for i in range(calls):
            if i:
                time.sleep(pause_s)
            stub.ClassifyBatch(pb.ClassifyBatchRequest(images=[pb.Image(pixels=bytes(3072))]), timeout=10)
        time.sleep(0.2)
        channel.unsubscribe(states.append)
    lines = [line for line in srv.log().splitlines() if "ClassifyBatch" in line]
    return [m.group(1) for line in lines if (m := re.search(r"client=(\S+)", line))], states


def test_an_idle_grpc_connection_is_closed_and_the_client_reconnects(tmp_path):
    """gRPC core keeps a connection as long as its client does; `--grpc-idle-timeout-s` ends one
    with no call in flight (GOAWAY), and the channel reconnects for its next call."""
    import grpc

    # gRPC core checks idleness on a timer of that period (jittered +-10%): a connection closes
    # between 1 and ~2.2 periods after its last call, here well inside the pause
    srv = start_server(tmp_path, grpc_idle_timeout_s=0.5)
    try:
        ports, states = _grpc_call_ports(srv, calls=2, pause_s=2.5)
        assert len(ports) == 2 and ports[0] != ports[1], ports  # a new connection for the second call
        ready = states.index(grpc.ChannelConnectivity.READY)
        assert grpc.ChannelConnectivity.IDLE in states[ready:], states  # the server closed the first
    finally:
        assert srv.stop() == 0, srv.log()


def test_an_old_grpc_connection_is_renewed_while_it_is_busy(tmp_path):
    """`--grpc-max-connection-age-s`: a busy client is asked to reconnect (so that a new replica
    behind a load balancer gets its share); every call still succeeds."""
    srv = start_server(tmp_path, grpc_idle_timeout_s=0, grpc_max_connection_age_s=1)
    try:
        ports, _ = _grpc_call_ports(srv, calls=16, pause_s=0.2)
        assert len(ports) == 16 and len(set(ports)) >= 2, ports
    finally:
        assert srv.stop() == 0, srv.log()


def test_the_grpc_lifetimes_are_the_channel_arguments_grpc_core_reads():
    """Each setting goes to its own argument (idle is not age), in milliseconds, and 0 sets none;
    calls in flight at an age's GOAWAY get the default deadline to finish."""
    from quicknet.serve.config import Settings
    from quicknet.serve.transport.grpc import server_options

    def lifetimes(**settings) -> dict:
        return {k: v for k, v in server_options(Settings(**settings)) if "connection" in k}

    assert lifetimes() == {"grpc.max_connection_idle_ms": 300_000}
    assert lifetimes(grpc_idle_timeout_s=0.5, grpc_max_connection_age_s=0) == {"grpc.max_connection_idle_ms": 500}
    assert lifetimes(grpc_idle_timeout_s=0, grpc_max_connection_age_s=300, default_timeout_ms=20_000) == {
        "grpc.max_connection_age_ms": 300_000,
        "grpc.max_connection_age_grace_ms": 20_000,
    }
