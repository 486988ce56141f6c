"""The process's cores, shared by its CPU engines in arrival order (quicknet/serve/backends/cores.py)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from quicknet import store
from quicknet.serve.backends import cores, load_backend
from quicknet.serve.backends.cores import CoreGate
from quicknet.serve.config import Settings
from quicknet.testing import REPO


def _holder(gate: CoreGate, threads: int, order: list, name: str, release: threading.Event) -> threading.Thread:
    def run():
        with gate.hold(threads):
            order.append(name)
            release.wait(10)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait(predicate, seconds=5.0):
    end = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


def test_the_cores_go_to_the_waiters_in_the_order_they_came():
    """A release hands the cores to the head waiter: a thread that arrives while others wait queues
    behind them, even when it could have taken what was just freed (a plain lock let the faster
    model take every turn)."""
    gate, order = CoreGate(2), []
    first = threading.Event()
    a = _holder(gate, 2, order, "a", first)
    _wait(lambda: order == ["a"])
    go = threading.Event()
    b = _holder(gate, 2, order, "b", go)
    _wait(lambda: gate.waiting == 1)
    c = _holder(gate, 1, order, "c", go)  # one core would do, but b came first
    _wait(lambda: gate.waiting == 2)
    first.set()
    a.join(5)
    _wait(lambda: order[:2] == ["a", "b"])
    assert order == ["a", "b"] and gate.waiting == 1, "c waits for b: the head of the line is served first"
    go.set()
    for t in (b, c):
        t.join(5)
    assert order == ["a", "b", "c"] and gate.waiting == 0


def test_runs_within_the_cores_go_side_by_side_and_more_threads_than_cores_still_run():
    gate, order = CoreGate(2), []
    go = threading.Event()
    ts = [_holder(gate, 1, order, name, go) for name in ("a", "b")]
    _wait(lambda: len(order) == 2)  # 2 x 1 thread on 2 cores: both at once
    go.set()
    for t in ts:
        t.join(5)
    with gate.hold(8):  # more threads than cores: takes them all rather than waiting forever
        assert gate.waiting == 0
    with gate.hold(2):
        pass


def test_a_forked_child_has_a_gate_of_its_own():
    """The parent's runs hold its gate; a child forked meanwhile must not wait for them."""
    parent = cores.gate()
    with parent.hold(parent.cores):
        pid = os.fork()
        if pid == 0:  # the child: a fresh gate, free
            child = cores.gate()
            ok = child is not parent and child.waiting == 0
            with child.hold(1):
                pass
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


class _Counting:
    """An ORT session's stand-in that counts the runs in progress across every engine."""

    running = 0
    most = 0
    lock = threading.Lock()

    def __init__(self, session):
        self.session = session

    def run(self, *args):
        with _Counting.lock:
            _Counting.running += 1
            _Counting.most = max(_Counting.most, _Counting.running)
        try:
            time.sleep(0.01)  # long enough that runs left free would overlap
            return self.session.run(*args)
        finally:
            with _Counting.lock:
                _Counting.running -= 1


def test_two_models_in_one_process_never_run_more_threads_than_its_cores(monkeypatch, cifar):
    """Two published models with 2 threads each on a 2-core process take turns; each alone, or one
    thread each, would not."""
    monkeypatch.setattr(cores, "_gate", CoreGate(2))
    engines = []
    for name in ("quicknet", "quicknet-xs"):
        engine = load_backend(store.get_version(REPO / "model_store", name), Settings(backend="onnxruntime", threads=2))
        engine.session = _Counting(engine.session)
        engines.append(engine)
    images = cifar.test.images[:4]
    expected = [e.session.session.run(None, {e.input_name: images})[0] for e in engines]

    def serve(engine, want):
        for _ in range(15):
            np.testing.assert_array_equal(engine.infer(images), want)

    ts = [threading.Thread(target=serve, args=pair) for pair in zip(engines, expected, strict=True)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert _Counting.most == 1, "2 + 2 threads on 2 cores ran at once"

    for engine in engines:
        engine.threads = 1
    _Counting.most = 0
    ts = [threading.Thread(target=serve, args=pair) for pair in zip(engines, expected, strict=True)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert _Counting.most == 2, "1 + 1 threads fit 2 cores: side by side"


@pytest.mark.parametrize("provider", ["CUDAExecutionProvider"])
def test_an_engine_off_the_cpu_takes_no_cores(provider):
    from quicknet.serve.backends.onnxruntime import OnnxRuntimeBackend

    class Session:
        def get_inputs(self):
            return [type("Input", (), {"name": "images"})()]

    engine = OnnxRuntimeBackend(Session(), "m.onnx", Settings(), provider, {"precision": "fp32"}, {})
    assert engine.gate is None
