"""Two models busy at once in one process: free to share the cores, or taking turns.

    python -m benchmarks.shared_cores [--seconds 6] [--batches 64 1] [--threads 2] [--rounds 2]

The server's engines for the two published models (`model_store/`: the precision each serves,
`--threads` intra-op threads each), each driven by its own thread calling `infer` back to back:
first each model alone (with the gate, then without it: what it costs one model), then both at
once with the process's core gate (`quicknet/serve/backends/cores.py`) and with a gate as wide
as their threads together (what ran before it: 4 threads on 2 cores), alternating for
`--rounds`. `together` is the two rates' fractions of their rates alone, summed: 1.0 means
sharing lost nothing. The p99 is of one `infer` call. Prints one table and writes
benchmarks/results/shared_cores.json.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import save, table
from quicknet import store
from quicknet.serve.backends import cores, load_backend
from quicknet.serve.backends.cores import CoreGate
from quicknet.serve.config import Settings, usable_cores

REPO = Path(__file__).resolve().parents[1]
MODELS = ("quicknet", "quicknet-xs")


def drive(engines: dict, batch: int, seconds: float) -> dict[str, tuple[float, float]]:
    """Each engine's img/s and p99 ms per call, all driven at once for `seconds`."""
    x = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    out: dict[str, tuple[float, float]] = {}
    start = threading.Barrier(len(engines))

    def work(name: str) -> None:
        engine, calls = engines[name], []
        start.wait()
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            t = time.perf_counter()
            engine.infer(x)
            calls.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - began  # the last call runs past `seconds`: count its time too
        out[name] = (len(calls) * batch / elapsed, float(np.percentile(calls, 99)) * 1e3)

    threads = [threading.Thread(target=work, args=(name,)) for name in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    settings = Settings(backend="onnxruntime", threads=args.threads, max_batch_size=max(args.batches))
    root = REPO / "model_store"
    engines = {name: load_backend(store.get_version(root, name), settings) for name in MODELS}
    for engine in engines.values():
        engine.warmup()
    cores_here = usable_cores()
    gates = {"turns": cores.gate(), "free": CoreGate(args.threads * len(engines))}  # the process's, and none
    rows = []
    for batch in args.batches:
        alone = {name: drive({name: engine}, batch, args.seconds)[name] for name, engine in engines.items()}
        for name, (img_s, p99) in alone.items():
            rows.append({"batch": batch, "how": "alone", "model": name, "img_s": img_s, "p99_ms": p99})
        for name, engine in engines.items():  # what the gate costs one model alone: none of it
            engine.gate = None
            img_s, p99 = drive({name: engine}, batch, args.seconds)[name]
            engine.gate = cores.gate()
            rows.append({"batch": batch, "how": "alone, no gate", "model": name, "img_s": img_s, "p99_ms": p99})
        for _ in range(args.rounds):
            for how, gate in gates.items():
                for engine in engines.values():
                    engine.gate = gate
                both = drive(engines, batch, args.seconds)
                together = sum(both[name][0] / alone[name][0] for name in engines)
                for name, (img_s, p99) in both.items():
                    row = {"batch": batch, "how": how, "model": name, "img_s": img_s, "p99_ms": p99}
                    rows.append(row | {"together": together})
                print(table(rows[-2:], ["batch", "how", "model", "img_s", "p99_ms", "together"]), flush=True)
        for engine in engines.values():
            engine.gate = cores.gate()
    print()
    print(f"{cores_here} cores, {args.threads} threads a model, {args.seconds:g} s a case")
    print(table(rows, ["batch", "how", "model", "img_s", "p99_ms", "together"]))
    precisions = {name: engine.describe()["precision"] for name, engine in engines.items()}
    payload = {"args": vars(args), "cores": cores_here, "precision": precisions, "rows": rows}
    print(f"wrote {save('shared_cores', payload)}")


if __name__ == "__main__":
    main()
