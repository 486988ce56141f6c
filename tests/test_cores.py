"""The process's cores, shared by its CPU engines in arrival order (quicknet/serve/backends/cores.py)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from quicknet import store
from quicknet.serve import metrics
from quicknet.serve.backends import cores, load_backend
from quicknet.serve.backends.cores import CoreGate
from quicknet.serve.config import Settings
from quicknet.testing import REPO
from tests.hung import wait_for


def _holder(gate: CoreGate, threads: int, order: list, name: str, release: threading.Event) -> threading.Thread:
    def run():
        with gate.hold(threads):
            order.append(name)
            release.wait(10)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_the_cores_go_to_the_waiters_in_the_order_they_came():
    """A release hands the cores to the head waiter: a thread that arrives while others wait queues
    behind them, even when it could have taken what was just freed (a plain lock let the faster
    model take every turn)."""
    gate, order = CoreGate(2), []
    first = threading.Event()
    a = _holder(gate, 2, order, "a", first)
    wait_for(lambda: order == ["a"])
    go = threading.Event()
    b = _holder(gate, 2, order, "b", go)
    wait_for(lambda: gate.waiting == 1)
    c = _holder(gate, 1, order, "c", go)  # one core would do, but b came first
    wait_for(lambda: gate.waiting == 2)
    first.set()
    a.join(5)
    wait_for(lambda: order[:2] == ["a", "b"])
    assert order == ["a", "b"] and gate.waiting == 1, "c waits for b: the head of the line is served first"
    go.set()
    for t in (b, c):
        t.join(5)
    assert order == ["a", "b", "c"] and gate.waiting == 0


def test_a_run_that_arrives_while_others_wait_queues_even_with_cores_free():
    """a holds 1 of 2 cores, b waits for both: c, asking for the free one, waits behind b. Taking
    it would let a stream of small runs starve b forever, as a plain lock starved the slower
    model's turns."""
    gate, order = CoreGate(2), []
    first, go = threading.Event(), threading.Event()
    a = _holder(gate, 1, order, "a", first)
    wait_for(lambda: order == ["a"])
    b = _holder(gate, 2, order, "b", go)
    wait_for(lambda: gate.waiting == 1)
    c = _holder(gate, 1, order, "c", go)
    wait_for(lambda: gate.waiting == 2)
    time.sleep(0.05)
    assert order == ["a"], "c took the free core ahead of b"
    first.set()
    wait_for(lambda: order[:2] == ["a", "b"])
    go.set()
    for t in (a, b, c):
        t.join(5)
    assert order == ["a", "b", "c"]


def test_a_release_serves_the_head_of_the_line_not_whoever_fits():
    """a and x hold a core each, b waits for both, c for one. When a is done, one core is free:
    c would fit, but b is first, so nobody runs until x is done too; then b, then c."""
    gate, order = CoreGate(2), []
    a_done, x_done, go = threading.Event(), threading.Event(), threading.Event()
    a = _holder(gate, 1, order, "a", a_done)
    x = _holder(gate, 1, order, "x", x_done)
    wait_for(lambda: sorted(order) == ["a", "x"])
    b = _holder(gate, 2, order, "b", go)
    wait_for(lambda: gate.waiting == 1)
    c = _holder(gate, 1, order, "c", go)
    wait_for(lambda: gate.waiting == 2)
    a_done.set()
    a.join(5)
    time.sleep(0.05)
    assert order[2:] == [], "the freed core went past the head of the line"
    x_done.set()
    wait_for(lambda: order[2:3] == ["b"])
    time.sleep(0.05)
    assert order[2:] == ["b"] and gate.waiting == 1, "c ran beside b: b's cores were not taken"
    go.set()
    for t in (x, b, c):
        t.join(5)
    assert order[2:] == ["b", "c"]


def test_runs_within_the_cores_go_side_by_side_and_more_threads_than_cores_still_run():
    gate, order = CoreGate(2), []
    go = threading.Event()
    ts = [_holder(gate, 1, order, name, go) for name in ("a", "b")]
    wait_for(lambda: len(order) == 2)  # 2 x 1 thread on 2 cores: both at once
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
        if pid == 0:  # the child: a fresh gate, all its cores free; it never returns into pytest
            ok = False
            try:
                child = cores.gate()
                ok = child is not parent and child._free == child.cores and not child.waiting
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child inherited its parent's held gate"


class _Counting:
    """An ORT session's stand-in that counts the runs in progress across the engines it wraps."""

    def __init__(self, session, tally: dict):
        self.session, self.tally = session, tally

    def run(self, *args):
        tally = self.tally
        with tally["lock"]:
            tally["running"] += 1
            tally["most"] = max(tally["most"], tally["running"])
        try:
            # With company expected (runs that fit the cores together), wait for it, once, rather
            # than hope two threads overlap on a busy machine; a gate that serializes them makes
            # it never come, and the count stays 1.
            end = time.monotonic() + (2.0 if tally["company"] else 0.01)
            while time.monotonic() < end and not (tally["company"] and tally["most"] >= 2):
                time.sleep(0.001)
            return self.session.run(*args)
        finally:
            with tally["lock"]:
                tally["running"] -= 1


def _serve_both(engines, images, expected) -> list[BaseException]:
    errors = []

    def serve(engine, want):
        try:
            for _ in range(10):
                np.testing.assert_array_equal(engine.infer(images), want)
        except BaseException as e:  # a thread's failure is reported to the test, not lost as a warning
            errors.append(e)

    ts = [threading.Thread(target=serve, args=pair) for pair in zip(engines, expected, strict=True)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return errors


def test_two_models_in_one_process_never_run_more_threads_than_its_cores(monkeypatch, cifar):
    """Two published models with 2 threads each on a 2-core process take turns; with one thread
    each they fit the cores together and run side by side. Their answers are the sessions' own."""
    monkeypatch.setattr(cores, "_gate", CoreGate(2))
    tally = {"lock": threading.Lock(), "running": 0, "most": 0, "company": False}
    engines = []
    for name in ("quicknet", "quicknet-xs"):
        engine = load_backend(store.get_version(REPO / "model_store", name), Settings(backend="onnxruntime", threads=2))
        engine.session = _Counting(engine.session, tally)
        engines.append(engine)
    images = cifar.test.images[:4]
    expected = [e.session.session.run(None, {e.input_name: images})[0] for e in engines]
    tally["most"] = 0
    waited = metrics.CPU_WAIT._value.get()
    assert _serve_both(engines, images, expected) == []
    assert tally["most"] == 1, "2 + 2 threads on 2 cores ran at once"
    assert metrics.CPU_WAIT._value.get() > waited, "the turns' waits are counted (quicknet_cpu_wait_seconds)"

    for engine in engines:
        engine.threads = 1
    tally.update(most=0, company=True)
    assert _serve_both(engines, images, expected) == []
    assert tally["most"] == 2, "1 + 1 threads fit 2 cores: side by side"


def test_an_engine_off_the_cpu_takes_no_cores():
    from quicknet.serve.backends.onnxruntime import OnnxRuntimeBackend

    class Session:
        def get_inputs(self):
            return [type("Input", (), {"name": "images"})()]

    engine = OnnxRuntimeBackend(Session(), "m.onnx", Settings(), "CUDAExecutionProvider", {"precision": "fp32"}, {})
    assert engine.gate is None
