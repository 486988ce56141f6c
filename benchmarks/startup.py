"""Cold start and memory: `quicknet serve` from process start to ready, and its resident memory then.

    python -m benchmarks.startup [--runs 5] [--workers 1 2]

Runs in the full dev environment, where torch is installed: the CPU service must neither import
it nor pay for it. Resident memory is the sum over the server's processes (with `--workers` > 1:
the supervisor, the engine and every front). Writes benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import save, table
from benchmarks.cpu import tree
from quicknet.testing import REPO, free_port


def _rss_mb(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def one_start(workers: int) -> dict:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUICKNET_")}
    env |= {
        "QUICKNET_HTTP_HOST": "127.0.0.1",
        "QUICKNET_HTTP_PORT": str(port),
        "QUICKNET_GRPC_HOST": "127.0.0.1",
        "QUICKNET_GRPC_PORT": str(free_port()),
        "QUICKNET_WORKERS": str(workers),
    }
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "quicknet", "serve"], cwd=REPO, env=env, stdout=log, stderr=log)
        try:
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.perf_counter() - start > 120:
                    raise RuntimeError("server did not become ready")
                time.sleep(0.01)
            ready_s = time.perf_counter() - start
            rss = _rss_mb(proc.pid)
            torch_loaded = any(
                "torch" in Path(f"/proc/{p}/maps").read_text() for p in tree(proc.pid) if Path(f"/proc/{p}").exists()
            )
        finally:
            proc.terminate()
            proc.wait(60)
    return {"workers": workers, "ready_s": ready_s, "rss_mb": rss, "torch_mapped": torch_loaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    rows = []
    for workers in args.workers:
        runs = [one_start(workers) for _ in range(args.runs)]
        rows.append(
            {
                "workers": workers,
                "ready_s_median": float(np.median([r["ready_s"] for r in runs])),
                "ready_s_max": max(r["ready_s"] for r in runs),
                "rss_mb_median": float(np.median([r["rss_mb"] for r in runs])),
                "torch_mapped": any(r["torch_mapped"] for r in runs),
            }
        )
    print(table(rows, ["workers", "ready_s_median", "ready_s_max", "rss_mb_median", "torch_mapped"]))
    print(f"\nwrote {save('startup', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
