"""What one request costs the engine process's event loop and the fronts, on this CPU.

    python -m benchmarks.engine_core [--fronts 2] [--concurrency 16 64] [--seconds 10]
                                   [--request classify|kserve|grpc|kserve-grpc]

`quicknet serve --workers N` over the small shipped model (quicknet-xs), one 32x32 PNG per `POST
/classify` (`--request kserve`: one UINT8 tensor per KServe REST `/infer`), driven by `wrk` (C: it
costs the server's cores little); `--request grpc`: one PNG per gRPC `ClassifyBatch`, as the
Python client sends a file, driven by one process of `benchmarks.loadgen` (Python, 4 channels: it
takes CPU the server then lacks, so compare gRPC rows with each other, not with wrk's);
`--request kserve-grpc`: one UINT8 tensor per KServe gRPC `ModelInfer`, the same way. Over each
window, from /proc (`benchmarks.cpu`): the engine process's main thread (its event loop: since the
engine core reads requests from shared memory it takes no part in one), its other threads (the
engine core's runners and the engine's own threads, inference included) and the fronts' CPU;
and, from the server's own counter `quicknet_engine_core_cpu_seconds_total`, the runners' CPU
outside the engine call (collecting, batching, answering: what the engine process spends on a
request besides computing it). Each divided by the requests served, in microseconds a request.
The issue's goals: the engine loop <= 5 us a request, the fronts <= 200 us a REST request.

First, the engine core alone (`core_alone`): one thread collecting, batching and answering
records a front published in its ring, over an engine that does nothing, no server and no other
thread: what a batch costs the core by its size, the cost a GPU's big batches divide among their
requests. Prints both tables and writes benchmarks/results/engine_core.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks import cpu
from benchmarks.common import save, table
from benchmarks.loadgen import run_pool
from benchmarks.peers import encode_png, run_wrk
from quicknet.serve.engine_core import EngineCore, Front
from quicknet.serve.ipc import QUEUED, Ring
from quicknet.serve.model import Statistics
from quicknet.testing import FAST_MODEL, metric, start_server


def core_cpu_s(url: str) -> float:
    return metric(httpx.get(f"{url}/metrics").text, "quicknet_engine_core_cpu_seconds_total")


def core_alone(batches: list[int], rounds: int = 2000) -> list[dict]:
    """Per batch of one-image records: publish (a front's stores, not timed), then the core's
    collect, take and execute (gather, engine, scatter, answers, the front's signal, metrics and
    statistics), on this thread, timed with perf_counter."""
    core = EngineCore()
    lane = core.lane(
        lambda x: np.zeros((len(x), 10), np.float32),
        model="alone",
        backend="none",
        max_batch_size=max(batches),
        max_queue_images=1 << 20,
        stats=Statistics(),
    )
    lane.accepting = True
    ring = Ring.create(4 * max(batches) * 16)
    bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    core.fronts.append(Front(Ring(ring.fd, ring.blocks), os.eventfd(0, os.EFD_NONBLOCK), bell, os.getpid(), None))
    tail, rows = 0, []
    for size in batches:
        spent = {"collect": 0.0, "take": 0.0, "execute": 0.0}
        for _ in range(rounds):
            blocks = ring.positions(tail, size)
            ring.requests[blocks] = np.array(
                [(0, time.monotonic() + 30, lane.key, 1, 0, 0, 0)] * size, ring.requests.dtype
            )
            ring.answers["status"][blocks] = QUEUED
            ring.sub[ring.positions(tail, size)] = blocks
            tail += size
            ring.sub_tail = tail
            t0 = time.perf_counter()
            core.collect()
            t1 = time.perf_counter()
            batch, _ = lane._take(time.monotonic())
            t2 = time.perf_counter()
            lane._execute(batch)
            t3 = time.perf_counter()
            spent["collect"] += t1 - t0
            spent["take"] += t2 - t1
            spent["execute"] += t3 - t2
            os.eventfd_read(bell)
        per_batch = {k: round(v / rounds * 1e6, 1) for k, v in spent.items()}
        total = sum(spent.values()) / rounds * 1e6
        rows.append({"batch": size, **{f"{k}_us": v for k, v in per_batch.items()}, "batch_us": round(total, 1),
                     "request_us": round(total / size, 2)})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


# --request: loadgen's case for each gRPC kind (a PNG per ClassifyBatch, as the Python client sends
# a file; raw UINT8 pixels per KServe ModelInfer, as the GPU run and Triton's clients send them)
GRPC_CASES = {"grpc": "grpc-png", "kserve-grpc": "kserve-grpc"}


def request_for(kind: str, pixels: np.ndarray) -> tuple[str, dict, bytes]:
    """(path, headers, body): one PNG to `/classify`, or one UINT8 tensor to KServe's `/infer` in
    the binary-data extension (as Triton's clients send it)."""
    if kind == "classify":
        return "/classify", {"Content-Type": "image/png"}, encode_png(pixels)
    tensor = {"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8", "parameters": {"binary_data_size": 3072}}
    head = json.dumps({"inputs": [tensor], "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]})
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    return f"/v2/models/{FAST_MODEL}/infer", headers, head.encode() + pixels.tobytes()


def drive(kind: str, srv, concurrency: int, seconds: float, work: Path) -> dict:
    """One closed-loop window of `kind`: req/s, p99 ms, errors."""
    if kind in GRPC_CASES:
        r = run_pool(GRPC_CASES[kind], srv.grpc_target, 1, concurrency, seconds, FAST_MODEL, processes=1, channels=4)
        return {"req_s": r["requests_s"], "p99_ms": round(r["p99_ms"], 2), "errors": r["rejected"]}
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path, headers, body = request_for(kind, pixels)
    return run_wrk(srv.url, path, headers, body, concurrency, seconds, work)


def measure(fronts: int, concurrency: list[int], seconds: float, work: Path, kind: str = "classify") -> list[dict]:
    srv = start_server(work, workers=fronts, access_log="false")  # the tests' store: quicknet-xs
    rows = []
    try:
        drive(kind, srv, 4, 2, work)  # warm connections, caches, the engine
        for c in concurrency:
            core_before, before = core_cpu_s(srv.url), cpu.snapshot(srv.proc.pid)
            result = drive(kind, srv, c, seconds, work)
            after = cpu.snapshot(srv.proc.pid)
            used = cpu.cores(before, after)
            core_cores = (core_cpu_s(srv.url) - core_before) / max(after.at - before.at, 1e-9)
            per_request_us = 1e6 / max(result["req_s"], 1e-9)  # cores busy x seconds per request
            rows.append(
                {
                    "request": kind,
                    "fronts": fronts,
                    "concurrency": c,
                    "req_s": round(result["req_s"], 1),
                    "p99_ms": result["p99_ms"],
                    "engine_loop_us": round(used["engine_loop_cores"] * per_request_us, 1),
                    "engine_threads_us": round(used["engine_threads_cores"] * per_request_us, 1),
                    "engine_core_us": round(core_cores * per_request_us, 1),
                    "fronts_us": round(used["fronts_cores"] * per_request_us, 1),
                    "machine_busy": used["machine_busy"],
                    "errors": result["errors"],
                }
            )
            print(rows[-1], flush=True)
    finally:
        srv.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fronts", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--alone-only", action="store_true", help="only the engine core alone (no server)")
    parser.add_argument(
        "--request",
        choices=["classify", "kserve", "grpc", "kserve-grpc"],
        default="classify",
        help="one PNG to /classify, one UINT8 tensor to KServe's REST /infer (binary-data extension), "
        "one PNG to gRPC ClassifyBatch, or one UINT8 tensor to KServe gRPC ModelInfer (raw_input_contents)",
    )
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    alone = core_alone(args.batches)
    print(table(alone, list(alone[0])))
    rows: list[dict] = []
    if not args.alone_only:
        if args.request not in GRPC_CASES and not shutil.which("wrk"):
            raise SystemExit("wrk is not installed: apt-get install wrk (make bench-peers does)")
        with tempfile.TemporaryDirectory() as tmp:
            rows = measure(args.fronts, args.concurrency, args.seconds, Path(tmp), args.request)
        print(table(rows, list(rows[0])))
    if not args.no_save:
        print("results:", save("engine_core", {"alone": alone, "rows": rows}))


if __name__ == "__main__":
    main()
