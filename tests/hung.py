"""A server whose engine is held busy on purpose, so that a queue outlasts a deadline on any CPU.

The `hung_server` fixture (tests/conftest.py) runs `quicknet serve` with two front processes (the
IPC path) and `--fault-injection hang-every=1,hang-seconds=HANG_S`: every engine batch first sleeps
HANG_S. `held_engine` sends one image and yields while its batch sleeps, so whatever is sent
meanwhile waits in the queue for the rest of HANG_S, however fast the machine; deadlines and
cancellations far shorter than HANG_S are then decided in the queue, deterministically."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import httpx
import pytest

from quicknet.testing import metric

HANG_S = 0.8
RAW = {"Content-Type": "application/octet-stream"}
T = TypeVar("T")


def computed_images(server) -> float:
    """Images the engine has run, over every batch (the batch-size histogram's sum)."""
    return metric(httpx.get(f"{server.url}/metrics").text, "quicknet_batch_size_sum")


def wait_for(predicate, timeout: float = 5.0, what: str = "the condition") -> None:
    """Poll `predicate` until it holds; fail the test, naming `what`, after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@contextlib.contextmanager
def held_engine(server):
    """Yields while the engine sleeps in a one-image batch (HANG_S from its start); on the way out,
    that request must have succeeded. Sent over REST: hold the queue for any protocol's test."""
    results: list[int] = []

    def fill() -> None:
        results.append(httpx.post(f"{server.url}/classify", content=bytes(3072), headers=RAW, timeout=60).status_code)

    before = metric(httpx.get(f"{server.url}/metrics").text, "quicknet_batches_in_flight")
    thread = threading.Thread(target=fill)
    thread.start()
    wait_for(
        lambda: metric(httpx.get(f"{server.url}/metrics").text, "quicknet_batches_in_flight") > before,
        10,
        "the held batch to start",
    )
    try:
        yield
    finally:
        thread.join(60)
    assert results == [200], "the request holding the engine failed"


def assert_nothing_else_computed(server, computed_before: float) -> None:
    """After a `held_engine` block: a probe request (one image) is answered, and the engine ran
    exactly the held image and the probe's since `computed_before`. The queue is first in, first
    out, so anything left queued ahead of the probe would have run by then and been counted."""
    probe = httpx.post(f"{server.url}/classify", content=bytes(3072), headers=RAW, timeout=60)
    assert probe.status_code == 200, probe.text
    assert computed_images(server) - computed_before == 2, "images past their deadline or cancelled were computed"


def the_server_gives_up_first(attempt: Callable[[], tuple[str, T]], tries: int = 3) -> T:
    """Runs `attempt` (one gRPC call held in the queue past its deadline; it returns the error's
    message, or a line saying the call was answered, and what it measured before sending) until the
    server's own DEADLINE_EXCEEDED ended the call, and returns that attempt's measure. The server
    answers 20 ms before the deadline it reads at receipt (transport/grpc.py `deadline_of`); a host
    slowed enough to spend those 20 ms on the way back lets the client's own timer win the race, and
    one slowed for most of HANG_S lets the hold end first: neither says anything of the server."""
    for _ in range(tries):
        message, measured = attempt()
        if "while queued" in message:
            return measured
    pytest.fail(f"in {tries} tries the server never answered DEADLINE_EXCEEDED itself before the client gave up")
