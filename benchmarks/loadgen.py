"""Load generator: closed loop (fixed concurrency) or open loop (fixed arrival rate); our REST
(`/classify`, raw pixels), our gRPC (`ClassifyBatch`) or KServe gRPC (`ModelInfer`, raw_input_contents).

    python -m benchmarks.loadgen [--model quicknet] [--protocol rest grpc] [--images 1 8 64]
                                 [--concurrency 8] [--rate 0] [--seconds 10] [--url URL --grpc HOST:PORT]

Without --url it starts `quicknet serve` on this machine over a store of the untrained model
(speed does not depend on the weights), runs each case, stops the server, then measures the
engine alone (ONNX Runtime, same threads) at the batch sizes the server formed. Efficiency =
served images/s ÷ engine-only images/s at the server's mean batch size, same machine, one run.
Prints a table and writes benchmarks/results/loadgen.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import images_per_second, make_untrained_store, save, table


async def _rest_call(client, url: str, body: bytes) -> int:
    r = await client.post(f"{url}/classify", content=body, headers={"Content-Type": "application/octet-stream"})
    return r.status_code


async def _grpc_status(call) -> int:
    """Await a gRPC call; its outcome as the HTTP-like code the tables count (200, 429, 504, 500)."""
    import grpc

    try:
        await call
        return 200
    except grpc.aio.AioRpcError as e:
        return {grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.DEADLINE_EXCEEDED: 504}.get(e.code(), 500)


def _grpc_call(stub, pb, blobs: list[bytes], field: str = "pixels"):
    return _grpc_status(
        stub.ClassifyBatch(pb.ClassifyBatchRequest(images=[pb.Image(**{field: b}) for b in blobs], top_k=1))
    )


def _kserve_call(stub, pb, pixels: np.ndarray, model: str):
    request = pb.ModelInferRequest(model_name=model, raw_input_contents=[pixels.tobytes()])
    request.inputs.add(name="images", datatype="UINT8", shape=list(pixels.shape))
    return _grpc_status(stub.ModelInfer(request))


async def run_case(
    protocol: str,
    target: str,
    n_images: int,
    concurrency: int,
    rate: float,
    seconds: float,
    model: str,
    keep_latencies: bool = False,
    channels: int = 1,
) -> dict:
    """Closed loop when rate == 0 (each of `concurrency` workers sends back to back), else open loop.
    gRPC calls take turns over `channels` channels, each its own connection (a front process is
    reached by connection: with several fronts, one channel would load one front)."""
    import grpc
    import httpx

    from quicknet.api._generated import classifier_pb2 as pb
    from quicknet.api._generated import classifier_pb2_grpc as pb_grpc

    pixels = np.random.default_rng(0).integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
    latencies: list[float] = []
    codes: dict[int, int] = {}
    if protocol == "rest":
        client = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=max(concurrency, 64)))
        body = pixels.tobytes()

        def call():
            return _rest_call(client, target, body)
    else:
        # a local subchannel pool each: channels to one target would otherwise share a connection
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
        opened = [grpc.aio.insecure_channel(target, options=options) for _ in range(max(1, channels))]
        turn = itertools.cycle(range(len(opened)))
    if protocol in ("grpc", "grpc-png"):
        stubs = [pb_grpc.ClassifierStub(c) for c in opened]
        if protocol == "grpc-png":  # what the Python client sends for a file: the image as encoded
            from benchmarks.peers import encode_png

            per_image, field = [encode_png(p) for p in pixels], "encoded"
        else:
            per_image, field = [p.tobytes() for p in pixels], "pixels"

        def call():
            return _grpc_call(stubs[next(turn)], pb, per_image, field)
    elif protocol != "rest":
        from quicknet.api._generated import grpc_predict_v2_pb2 as kpb
        from quicknet.api._generated import grpc_predict_v2_pb2_grpc as kpb_grpc

        kstubs = [kpb_grpc.GRPCInferenceServiceStub(c) for c in opened]

        def call():
            return _kserve_call(kstubs[next(turn)], kpb, pixels, model)

    async def one() -> None:
        t0 = time.perf_counter()
        code = await call()
        latencies.append(time.perf_counter() - t0)
        codes[code] = codes.get(code, 0) + 1

    for _ in range(3):  # connections and the first batches
        await one()
    latencies.clear()
    codes.clear()
    start = time.perf_counter()
    end = start + seconds
    if rate <= 0:

        async def worker() -> None:
            while time.perf_counter() < end:
                await one()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        tasks = []
        next_at = start
        while next_at < end:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
            next_at += 1 / rate
        await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    if protocol == "rest":
        await client.aclose()
    else:
        for channel in opened:
            await channel.close()
    ok = codes.get(200, 0)
    lat = np.asarray(latencies) * 1000
    extra = {"latencies_ms": lat.tolist(), "elapsed_s": elapsed} if keep_latencies else {}
    return extra | {
        "protocol": protocol,
        "images_per_request": n_images,
        "mode": "closed" if rate <= 0 else "open",
        "concurrency": concurrency if rate <= 0 else None,
        "rate_rps": rate or None,
        "requests": len(latencies),
        "ok": ok,
        "rejected": len(latencies) - ok,
        "served_img_s": ok * n_images / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def _pool_worker(args: tuple) -> dict:
    return asyncio.run(run_case(*args))


def run_pool(
    protocol: str,
    target: str,
    n_images: int,
    concurrency: int,
    seconds: float,
    model: str,
    processes: int,
    channels: int = 1,
    rate: float = 0.0,
) -> dict:
    """Closed loop from `processes` client processes (one Python client tops out near a few thousand
    requests/s): `concurrency` is split between them; their results are merged. gRPC: `channels`
    channels (connections) in all, split between the processes. `rate` > 0: open loop instead,
    that many requests/s in all, split between the processes."""
    import multiprocessing

    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    per_process = -(-max(1, channels) // processes)
    each = rate / processes if rate > 0 else 0.0
    jobs = [(protocol, target, n_images, share, each, seconds, model, True, per_process) for share in shares]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_pool_worker, jobs)
    lat = np.concatenate([np.asarray(p["latencies_ms"]) for p in parts]) if parts else np.zeros(1)
    ok = sum(p["ok"] for p in parts)
    elapsed = max(p["elapsed_s"] for p in parts)
    return {
        "protocol": protocol,
        "client": f"python x{processes}",
        "grpc_channels": per_process * processes if protocol != "rest" else None,
        "images_per_request": n_images,
        "mode": "closed" if rate <= 0 else "open",
        "concurrency": concurrency if rate <= 0 else None,
        "rate_rps": rate or None,
        "requests": sum(p["requests"] for p in parts),
        "ok": ok,
        "rejected": sum(p["rejected"] for p in parts),
        "served_img_s": ok * n_images / elapsed,
        "requests_s": ok / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="quicknet")
    parser.add_argument(
        "--protocol",
        nargs="+",
        default=["rest", "grpc", "kserve-grpc"],
        choices=["rest", "grpc", "kserve-grpc"],
        help="kserve-grpc: Open Inference Protocol ModelInfer, N images in raw_input_contents",
    )
    parser.add_argument("--images", type=int, nargs="+", default=[1, 8, 64], help="images per request")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s (0: closed loop)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2, help="engine threads (server and engine-only run)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument(
        "--rest-client",
        choices=["hey", "httpx"],
        default="hey" if shutil.which("hey") else "httpx",
        help="closed-loop REST client (default hey when installed: apt-get install hey)",
    )
    parser.add_argument("--name", default="loadgen", help="results file: benchmarks/results/NAME.json")
    parser.add_argument("--url", help="an already running server's REST URL (skips starting one)")
    parser.add_argument("--grpc", help="an already running server's gRPC target")
    args = parser.parse_args()

    import httpx

    from quicknet import store

    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if args.url:
            url, grpc_target, root = args.url, args.grpc, None
        else:
            from quicknet.testing import start_server

            root = make_untrained_store(Path(tmp) / "store", [args.model])
            server = start_server(
                Path(tmp),
                store=root,
                model=args.model,
                threads=args.threads,
                max_batch_size=args.max_batch_size,
                max_queue_images=100_000,
            )
            url, grpc_target = server.url, server.grpc_target
        rows = []
        try:
            for protocol in args.protocol:
                target = url if protocol == "rest" else grpc_target
                for n in args.images:
                    before = httpx.get(f"{url}/metrics").text
                    if protocol == "rest" and args.rate <= 0 and args.rest_client == "hey":
                        row = run_hey(url, n, args.concurrency, args.seconds)
                    else:
                        row = asyncio.run(
                            run_case(protocol, target, n, args.concurrency, args.rate, args.seconds, args.model)
                        )
                        row["client"] = "python"
                    after = httpx.get(f"{url}/metrics").text
                    row["mean_batch"] = _delta_mean_batch(before, after)
                    rows.append(row)
                    print(f"  {protocol} x{n}: {row['served_img_s']:.0f} img/s, p99 {row['p99_ms']:.1f} ms", flush=True)
        finally:
            if server is not None:
                server.stop()
        if root is not None:  # engine alone, server stopped, same machine and threads
            from benchmarks.engine import ort_session

            mv = store.get_version(root, args.model)
            session = ort_session(mv.file("model.onnx"), args.threads)
            cache: dict[int, float] = {}
            for row in rows:
                b = max(1, round(row["mean_batch"]))
                if b not in cache:
                    cache[b] = images_per_second(lambda x: session.run(None, {"images": x}), b, 3.0)
                row["engine_img_s"] = cache[b]
                row["efficiency"] = row["served_img_s"] / cache[b]
    columns = [
        "protocol",
        "client",
        "images_per_request",
        "mode",
        "concurrency",
        "rate_rps",
        "served_img_s",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "rejected",
        "mean_batch",
        "engine_img_s",
        "efficiency",
    ]
    print(f"\n{args.model}, {args.threads} engine threads, {args.seconds:.0f} s per case")
    print(table(rows, columns))
    print(f"\nwrote {save(args.name, {'model': args.model, 'args': vars(args), 'rows': rows})}")


def run_hey(
    url: str,
    n_images: int,
    concurrency: int,
    seconds: float,
    hey: str = "hey",
    body: bytes | None = None,
    content_type: str = "application/octet-stream",
    rate: float = 0.0,
) -> dict:
    """Closed-loop REST load from `hey` (Go): far less client CPU than a Python client, which
    matters when client and server share 2 cores. Per-request times come from its CSV output.
    The body is `n_images` raw images unless `body` (holding `n_images` images) is given.
    `rate` > 0: each of the `concurrency` workers sends at most rate / concurrency requests/s
    (hey's `-q`), a fixed arrival rate while a request takes less than concurrency / rate."""
    import subprocess

    if body is None:
        body = np.random.default_rng(0).integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8).tobytes()
    data = body
    with tempfile.NamedTemporaryFile(suffix=".body") as body:
        body.write(data)
        body.flush()
        cmd = [
            hey,
            "-z",
            f"{seconds}s",
            "-c",
            str(concurrency),
            *(["-q", f"{rate / concurrency:.3f}"] if rate > 0 else []),
            "-o",
            "csv",
            "-m",
            "POST",
            "-T",
            content_type,
            "-D",
            body.name,
            f"{url}/classify",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    row = parse_hey_csv(out, n_images, concurrency)
    return row | ({"mode": "rate-limited", "rate_rps": rate} if rate > 0 else {})


def parse_hey_csv(out: str, n_images: int, concurrency: int) -> dict:
    """One row of the load table from `hey -o csv`'s output: a header, then one line per answered
    request (`response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,
    offset`, seconds). A request that got no answer (a refused or reset connection) has no line:
    hey's CSV leaves transport errors out, so an output without lines is an error here."""
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(out.strip())))
    if not rows or not {"response-time", "status-code", "offset"} <= set(rows[0]):
        raise RuntimeError(f"hey answered no request (its CSV holds no row): {out.strip()[:200]!r}")
    ok = [r for r in rows if r["status-code"] == "200"]
    lat = np.asarray([float(r["response-time"]) for r in rows]) * 1000
    elapsed = max(float(r["offset"]) + float(r["response-time"]) for r in rows)
    return {
        "protocol": "rest",
        "client": "hey",
        "images_per_request": n_images,
        "mode": "closed",
        "concurrency": concurrency,
        "rate_rps": None,
        "requests": len(rows),
        "ok": len(ok),
        "rejected": len(rows) - len(ok),
        "served_img_s": len(ok) * n_images / elapsed,
        "requests_s": len(ok) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def _delta_mean_batch(before: str, after: str) -> float:
    from quicknet.testing import metric

    n = metric(after, "quicknet_batch_size_count") - metric(before, "quicknet_batch_size_count")
    s = metric(after, "quicknet_batch_size_sum") - metric(before, "quicknet_batch_size_sum")
    return s / n if n else 0.0


if __name__ == "__main__":
    main()
