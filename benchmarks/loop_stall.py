"""Does one hostile request stall everyone else? A second client asks `/healthz` every 5 ms while
one request of each kind below is sent; we report that client's worst and median latency during
it, and how long the hostile request took to be answered (issue 22, item 7; and item 6's head).

    python -m benchmarks.loop_stall [--repeat 3]

Requests: 8 MiB of `--X` with `boundary=X` on /classify (multipart), a 12 MB KServe JSON UINT8
tensor, a gRPC ModelInfer whose `uint_contents` holds 12 M entries, and a 32 MiB request header.
The numbers depend on the machine; the point is the before/after comparison on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

MODEL = "quicknet-xs"


def _multipart(url: str):
    body = b"--X" * ((8 << 20) // 3)
    headers = {"Content-Type": "multipart/form-data; boundary=X"}
    return lambda: httpx.post(f"{url}/classify", content=body, headers=headers, timeout=60).status_code


def _kserve_json(url: str):
    body = (
        b'{"inputs":[{"name":"images","datatype":"UINT8","shape":[1000,32,32,3],"data":[' + b"0," * (6 << 20) + b"0]}]}"
    )
    headers = {"Content-Type": "application/json"}
    return lambda: httpx.post(f"{url}/v2/models/{MODEL}/infer", content=body, headers=headers, timeout=60).status_code


def _grpc_uint(target: str):
    """Built before the clock starts: protobuf holds this process's GIL while it builds 12 M entries."""
    import grpc

    from quicknet.api._generated import grpc_predict_v2_pb2 as kpb

    request = kpb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 3])
    tensor.contents.uint_contents.extend(np.zeros(12_000_000, dtype=np.uint32))
    raw = request.SerializeToString()
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
    call = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer", request_serializer=bytes, response_deserializer=bytes
    )

    def send() -> str:
        try:
            call(raw, timeout=60)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    return send


def _big_header(url: str):
    host, port = url.removeprefix("http://").split(":")

    async def run():
        reader, writer = await asyncio.open_connection(host, int(port))
        answer = asyncio.ensure_future(reader.read(64))
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            for _ in range(128):
                writer.write(b"a" * (256 << 10))
                await writer.drain()
            writer.write(b"\r\n\r\n")
            await writer.drain()
        except OSError:
            pass
        data = await asyncio.wait_for(answer, 60)
        writer.close()
        return int(data.split(b" ")[1]) if data else "closed"

    return lambda: asyncio.run(run())


def _probe(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            t = time.perf_counter()
            client.get(f"{url}/healthz")
            out.append((time.perf_counter() - t) * 1000)
            time.sleep(0.005)


def measure(server, repeat: int) -> list[dict]:
    cases = {
        "multipart `--X` x 8 MiB": lambda: _multipart(server.url),
        "KServe JSON tensor, 12 MB": lambda: _kserve_json(server.url),
        "gRPC uint_contents, 12 M entries": lambda: _grpc_uint(server.grpc_target),
        "32 MiB request header": lambda: _big_header(server.url),
    }
    rows = []
    for name, prepare in cases.items():
        send = prepare()  # the request is built before the clock starts
        for _ in range(repeat):
            latencies: list[float] = []
            stop = threading.Event()
            prober = threading.Thread(target=_probe, args=(server.url, stop, latencies))
            prober.start()
            time.sleep(0.2)
            before = len(latencies)
            t = time.perf_counter()
            answer = send()
            took = (time.perf_counter() - t) * 1000
            stop.set()
            prober.join()  # the probe that waited out a stall ends after the request's answer
            during = latencies[before:] or [float("nan")]
            rows.append(
                {
                    "request": name,
                    "answer": answer,
                    "request_ms": round(took),
                    "healthz_max_ms": round(max(during), 1),
                    "healthz_p50_ms": round(statistics.median(during), 1),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    from quicknet.testing import start_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp), warmup=False, precision="fp32", access_log="false")
        try:
            rows = measure(server, args.repeat)
        finally:
            server.stop()
    print("| request | answer | request ms (median) | /healthz worst ms: median of runs / max | /healthz p50 ms |")
    print("| --- | --- | --- | --- | --- |")
    for name in dict.fromkeys(r["request"] for r in rows):
        mine = [r for r in rows if r["request"] == name]
        worst = [r["healthz_max_ms"] for r in mine]
        print(
            f"| {name} | {mine[0]['answer']} | {statistics.median(r['request_ms'] for r in mine):.0f} | "
            f"{statistics.median(worst):.0f} / {max(worst):.0f} | "
            f"{statistics.median(r['healthz_p50_ms'] for r in mine):.1f} |"
        )


if __name__ == "__main__":
    main()
