"""New versions going live under load: how long from publish to the first request the new version
answers, and what a swap costs the latency of the requests in flight.

    python -m benchmarks.lifecycle [--seconds 6] [--concurrency 8]

For each model control mode (`poll`, and `explicit` driven by the repository API) a real server
serves quicknet-xs v1 while `--concurrency` REST clients send one image each, back to back; a
copy is published as v2 (and, in explicit mode, loaded). Reported: publish -> first answer from
v2, the p50/p99 of requests that overlapped the swap against steady state, and failed requests.
Writes benchmarks/results/lifecycle.json.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import save, table
from quicknet import store
from quicknet.testing import publish_shipped, start_server

MODEL = "quicknet-xs"


def run(mode: str, seconds: float, concurrency: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        publish_shipped(root, MODEL)
        store.set_default(root, MODEL)
        srv = start_server(Path(tmp), store=root, model_control_mode=mode, poll_interval_s=0.5, access_log=False)
        answers: list[tuple[float, float, str]] = []  # (sent, seconds, version or "FAILED")
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    t0 = time.monotonic()
                    r = http.post(
                        f"{srv.url}/classify", content=bytes(3072), headers={"Content-Type": "application/octet-stream"}
                    )
                    version = r.json()["version"] if r.status_code == 200 else "FAILED"
                    answers.append((t0, time.monotonic() - t0, version))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
        try:
            for t in threads:
                t.start()
            time.sleep(seconds / 2)
            published = time.monotonic()
            publish_shipped(root, MODEL)
            if mode == "explicit":
                httpx.post(f"{srv.url}/v2/repository/models/{MODEL}/load", json={}, timeout=120)
            deadline = published + 120
            while not any(v == "2" for _, _, v in answers) and time.monotonic() < deadline:
                time.sleep(0.01)
            first = min((t + d for t, d, v in answers if v == "2"), default=None)
            time.sleep(seconds / 2)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
            srv.stop()
    steady = [d for t, d, _ in answers if t < published] or [0.0]
    swap_end = max((t + d for t, d, v in answers if v == "1"), default=published)
    during = [d for t, d, _ in answers if published <= t <= swap_end] or [0.0]
    return {
        "mode": mode,
        "publish_to_first_v2_s": None if first is None else round(first - published, 2),
        "steady_p50_ms": float(np.percentile(steady, 50) * 1e3),
        "steady_p99_ms": float(np.percentile(steady, 99) * 1e3),
        "swap_p50_ms": float(np.percentile(during, 50) * 1e3),
        "swap_p99_ms": float(np.percentile(during, 99) * 1e3),
        "requests": len(answers),
        "failed": sum(1 for *_, v in answers if v == "FAILED"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    rows = [run(mode, args.seconds, args.concurrency) for mode in ("poll", "explicit")]
    columns = ["mode", "publish_to_first_v2_s", "steady_p50_ms", "steady_p99_ms", "swap_p50_ms", "swap_p99_ms"]
    print(table(rows, [*columns, "requests", "failed"]))
    print(f"\nwrote {save('lifecycle', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
