"""This service side by side with the servers a user would pick instead, in one run, one at a time.

    make bench-peers                       # the peers' own venv (PyTriton needs numpy<2), wrk
    python -m benchmarks.peers [--models quicknet-xs quicknet] [--concurrency 1 16 64] [--seconds 10]
    python -m benchmarks.peers --servers ours --fronts 1 2 4 8 16   # this service over front processes

Every server serves the same ONNX file (the published model where the store has one, with the
batch policy it ships with; else an untrained export) with the same ONNX Runtime settings (the
service's: 2 intra-op threads that spin while a run lasts and stop when it returns), and
answers one 32x32 PNG per request (PyTriton: the same pixels as a KServe v2 UINT8 tensor, as
its clients send them), driven by the same closed-loop load generator, `wrk`, on this machine.
The raw engine and the raw pipeline (decode + engine + top-5 in one Python loop, no server) are
in the same table: the ceiling; once on the published file, once on the FP32 graph this service's
engine derives from it at load (its PReLUs rewritten for ONNX Runtime's blocked kernels), which
is what `ours` runs. Writes benchmarks/results/peers.json and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import images_per_second, save, serving_store, table

REPO = Path(__file__).resolve().parents[1]
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"
SERVERS = ["fastapi", "litserve", "pytriton", "ours", "ours-int8", "ours-2-fronts"]
# --servers only: two engine instances of one thread each; plain FastAPI serving the FP32 graph this
# service's engine serves (model.onnx rewritten at load, quicknet/ort_graph.py), which
# separates what the engine's rewrite gains from what serving costs
EXTRA_SERVERS = ["ours-2x1", "fastapi-rewritten"]
RAW = "raw engine, batch 1 / batch 8"
RAW_SERVED = "raw engine, served FP32 graph"
FRONTS = re.compile(r"ours-(\d+)-fronts")  # `--fronts N` adds this service with N front processes


def encode_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_for(server: str, png: bytes, pixels: np.ndarray) -> tuple[str, dict, bytes]:
    """(path, headers, body) of one single-image request in the server's own API."""
    if server == "litserve":
        boundary = "quicknetbench"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + png
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return "/classify", {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body
    if server == "pytriton":
        tensor = {"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": pixels.reshape(-1).tolist()}
        body = json.dumps({"inputs": [tensor]}).encode()
        return "/v2/models/quicknet/infer", {"Content-Type": "application/json"}, body
    return "/classify", {"Content-Type": "image/png"}, png


def start(server: str, model_file: Path, store: Path, model: str, threads: int, workdir: Path):
    """Start one server; returns (process, base URL, health path)."""
    port = _free_port()
    env = {**os.environ, "PEER_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    log = (workdir / f"{server}-{model}.log").open("w")
    if server.startswith("ours"):
        env = {k: v for k, v in env.items() if not k.startswith("QUICKNET_")}
        env |= {
            "QUICKNET_MODEL_STORE": str(store),
            "QUICKNET_MODEL": model,
            "QUICKNET_MODELS": json.dumps([model]),
            "QUICKNET_HTTP_HOST": "127.0.0.1",
            "QUICKNET_HTTP_PORT": str(port),
            "QUICKNET_GRPC_HOST": "127.0.0.1",
            "QUICKNET_GRPC_PORT": str(_free_port()),
            "QUICKNET_THREADS": str(threads),
            "QUICKNET_ACCESS_LOG": "false",
            "QUICKNET_PRECISION": "int8" if server == "ours-int8" else "fp32",
            "QUICKNET_WORKERS": fronts[1] if (fronts := FRONTS.fullmatch(server)) else "1",
        }
        if server == "ours-2x1":
            env |= {"QUICKNET_THREADS": "1", "QUICKNET_INSTANCES": "2"}
        cmd, health = [sys.executable, "-m", "quicknet", "serve"], "/readyz"
    elif server == "pytriton":
        lib = Path(sys.base_prefix) / "lib"  # the Python backend stub needs libpython3.11.so
        env["LD_LIBRARY_PATH"] = f"{lib}:{env.get('LD_LIBRARY_PATH', '')}"
        cmd = [
            str(PEERS_PYTHON),
            "-m",
            "benchmarks.peer_servers.pytriton_app",
            str(model_file),
            str(port),
            str(_free_port()),
        ]
        health = "/v2/models/quicknet/ready"  # the server is ready before its model is bound
    else:
        module = {"fastapi": "fastapi_plain", "fastapi-rewritten": "fastapi_plain", "litserve": "litserve_app"}[server]
        if server == "fastapi-rewritten":
            model_file = served_fp32_file(model_file, workdir)
        cmd, health = (
            [str(PEERS_PYTHON), "-m", f"benchmarks.peer_servers.{module}", str(model_file), str(port)],
            "/health",
        )
    # its own process group: LitServe and PyTriton start workers that outlive a signal to the parent
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", health


def wait_ready(proc, url: str, health: str, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + health, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s")


def stop(proc) -> None:
    """The server and every process it started (a leftover worker would load the next measurement)."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(url: str, path: str, headers: dict, body: bytes, concurrency: int, seconds: float, workdir: Path) -> dict:
    body_file = workdir / "body.bin"
    body_file.write_bytes(body)
    script = workdir / "request.lua"
    header_lines = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
    read_body = f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*a")\nf:close()\n'
    script.write_text(f'wrk.method = "POST"\n{header_lines}{read_body}')
    threads = min(concurrency, 2)
    cmd = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(concurrency),
        "-d",
        f"{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(script),
    ]
    done = subprocess.run([*cmd, url + path], capture_output=True, text=True, timeout=seconds + 60)
    out = done.stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not found:
        raise RuntimeError(f"wrk failed: {(done.stderr or out).strip()[-500:]}")
    rps = float(found[1])
    lat = dict(re.findall(r"^\s+(50|90|99)%\s+([\d.]+\w+)", out, re.MULTILINE))

    def ms(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
        return float(value) * _UNITS[unit]

    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "req_s": rps,
        "p50_ms": ms(lat["50"]),
        "p90_ms": ms(lat["90"]),
        "p99_ms": ms(lat["99"]),
        "errors": int(errors[1]) if errors else 0,
        "socket_errors": socket_errors[1] if socket_errors else None,
    }


def served_fp32_file(onnx: Path, workdir: Path) -> Path:
    """That graph as a file, for a peer to serve (`fastapi-rewritten`)."""
    from quicknet.ort_graph import rewrite_file

    path = workdir / f"{onnx.parent.parent.name}-rewritten.onnx"
    if not rewrite_file(onnx, path):
        raise RuntimeError(f"{onnx} has no PReLU to rewrite: fastapi-rewritten would serve it as published")
    return path


def raw_pipeline_p50_ms(session, png: bytes, calls: int = 2000) -> float:
    """Decode + engine + top-5 on one image, in a loop, no server: the latency floor at c=1. The
    decode is the service's own (libspng for this PNG), so the gap to a served request is serving."""
    from quicknet.serve.images import Limits, decode_image

    limits = Limits(max_image_bytes=1 << 20, max_image_pixels=1 << 22, max_images=1)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        x = decode_image(png, limits)[None]
        logits = session.run(None, {"images": x})[0][0]
        z = np.exp(logits - logits.max())
        np.argsort(-(z / z.sum()))[:5]
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["quicknet-xs", "quicknet"])
    parser.add_argument("--servers", nargs="+", default=SERVERS, choices=SERVERS + EXTRA_SERVERS)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fronts", type=int, nargs="+", default=[], help="also this service with N front processes")
    parser.add_argument("--name", default="peers")
    args = parser.parse_args()
    if any(n < 1 for n in args.fronts):
        parser.error("--fronts takes front-process counts of 1 or more")
    args.servers += [f"ours-{n}-fronts" for n in args.fronts if f"ours-{n}-fronts" not in args.servers]
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk (make bench-peers does)")
    if any(not s.startswith("ours") for s in args.servers) and not PEERS_PYTHON.is_file():
        raise SystemExit("the peers' venv is missing: run `make bench-peers`")

    import httpx

    from benchmarks.engine import ort_session, served_fp32_session
    from quicknet.build import data

    dataset = data.load()
    pixels = dataset.test.images[0]
    png = encode_png(pixels)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calibration = dataset.train.sample(256, seed=1).images
        store = serving_store(work / "store", args.models, calibration)
        for model in args.models:
            onnx = store / model / "1" / "model.onnx"
            sessions = {RAW: ort_session(onnx, args.threads), RAW_SERVED: served_fp32_session(onnx, args.threads)}
            for name, sess in sessions.items():
                rows.append(
                    {
                        "server": name,
                        "model": model,
                        "best_req_s": images_per_second(lambda x, s=sess: s.run(None, {"images": x}), 1, 3.0),
                        "batch8_img_s": images_per_second(lambda x, s=sess: s.run(None, {"images": x}), 8, 3.0),
                        "p50_c1_ms": raw_pipeline_p50_ms(sess, png),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            del sessions
            for server in args.servers:
                proc, url, health = start(server, onnx, store, model, args.threads, work)
                row = {"server": server, "model": model}
                try:
                    wait_ready(proc, url, health)
                    path, headers, body = request_for(server, png, pixels)
                    check = httpx.post(url + path, content=body, headers=headers, timeout=30)
                    if check.status_code != 200:
                        raise RuntimeError(f"{server} answered {check.status_code}: {check.text[:200]}")
                    run_wrk(url, path, headers, body, 4, 2, work)  # warm-up
                    for c in args.concurrency:
                        result = run_wrk(url, path, headers, body, c, args.seconds, work)
                        row[f"c{c}"] = result
                        print(json.dumps({"server": server, "model": model, "c": c, **result}), flush=True)
                except RuntimeError as e:
                    row["error"] = str(e)
                finally:
                    stop(proc)
                cases = [row[f"c{c}"] for c in args.concurrency if f"c{c}" in row]
                row["best_req_s"] = max((r["req_s"] for r in cases if not r["errors"]), default=0.0)
                row["p50_c1_ms"] = row.get("c1", {}).get("p50_ms")
                rows.append(row)
    summary = _ratios(rows, args.models)
    _print(rows, args.concurrency, summary)
    print(f"\nwrote {save(args.name, {'args': vars(args), 'rows': rows, 'ratios': summary})}")


def _ratios(rows: list[dict], models: list[str]) -> dict:
    out = {}
    for model in models:
        mine = {r["server"]: r for r in rows if r["model"] == model}
        peers = [r for s, r in mine.items() if s in ("fastapi", "litserve", "pytriton")]
        best = max(peers, key=lambda r: r["best_req_s"], default=None)
        raw = mine.get(RAW_SERVED) or mine.get(RAW, {})
        plain = mine.get("fastapi", {})
        out[model] = {
            "best_peer": best["server"] if best else None,
            "ours_fp32_vs_best_peer": _div(mine.get("ours", {}).get("best_req_s"), best and best["best_req_s"]),
            "ours_int8_vs_best_peer": _div(mine.get("ours-int8", {}).get("best_req_s"), best and best["best_req_s"]),
            "ours_p50_c1_minus_raw_pipeline_ms": _sub(mine.get("ours", {}).get("p50_c1_ms"), raw.get("p50_c1_ms")),
            # the floor the default model is held to: FP32 at least plain FastAPI's rate at every concurrency
            "ours_fp32_vs_fastapi_per_c": {
                key: _div(mine.get("ours", {}).get(key, {}).get("req_s"), plain[key]["req_s"])
                for key in sorted(plain)
                if key.startswith("c") and key[1:].isdigit()
            },
        }
        # front processes: served requests/s as a fraction of the engine alone (the graph it serves) at its better batch
        engine = max(raw.get("best_req_s") or 0.0, raw.get("batch8_img_s") or 0.0)
        fronts = {1: mine.get("ours")} | {int(m[1]): r for s, r in mine.items() if (m := FRONTS.fullmatch(s))}
        out[model]["fronts_vs_engine_alone"] = {
            n: _div(r["best_req_s"], engine) for n, r in sorted(fronts.items()) if r is not None
        }
    return out


def _div(a, b):
    return round(a / b, 3) if a and b else None


def _sub(a, b):
    return round(a - b, 3) if a is not None and b is not None else None


def _print(rows: list[dict], concurrency: list[int], summary: dict) -> None:
    flat = []
    for r in rows:
        line = {"server": r["server"], "model": r["model"], "best req/s": r["best_req_s"], "p50 c=1 ms": r["p50_c1_ms"]}
        for c in concurrency:
            if f"c{c}" in r:
                line[f"c={c} req/s"] = r[f"c{c}"]["req_s"]
        if "batch8_img_s" in r:
            line["c=16 req/s"] = f"batch 8: {r['batch8_img_s']:.0f} img/s"
        flat.append(line)
    columns = ["server", "model", *(f"c={c} req/s" for c in concurrency), "best req/s", "p50 c=1 ms"]
    print(table(flat, columns))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
