"""The long fuzzing run: coverage-guided (atheris, libFuzzer) over every parser a client reaches.

    python -m benchmarks.fuzz --seconds 300            # each target 300 s, one after another
    python -m benchmarks.fuzz --seconds 5 --targets image --no-save   # a smoke run

Each target of `benchmarks/fuzzing.py` runs in its own process (libFuzzer owns the process and ends
it), seeded with that target's valid inputs; the service's modules and python-multipart are
instrumented, so inputs that reach new code are kept and mutated further. An input the service
mishandles (a 5xx, an INTERNAL, an exception where a 4xx belongs) is not a crash here: it is
counted, printed and saved to `tests/fuzz_corpus/<target>/`, which tests/test_fuzz.py replays on
every CI run — commit it with the fix. Prints one table (inputs tried, findings) and saves
`benchmarks/results/fuzz.json`.

Cost: the targets run in process over a stand-in engine; ~1-10k inputs/s per target on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("image", "classify", "kserve_rest", "grpc")
REPO = Path(__file__).resolve().parents[1]
# what gets coverage feedback: our parsers and the libraries that parse for them
INSTRUMENT = ["quicknet.serve", "python_multipart", "starlette.formparsers", "PIL.PngImagePlugin", "PIL.GifImagePlugin"]


# words libFuzzer splices into inputs: the protocol's own vocabulary reaches deeper than bit flips
WORDS = {
    "classify": [
        "image/png",
        "application/json",
        "multipart/form-data; boundary=",
        "application/octet-stream",
        '"image"',
        '"images"',
        '"top_k"',
        "Content-Disposition: form-data; name=",
        "filename=",
        "top_k=",
    ],
    "kserve_rest": [
        '"inputs"',
        '"outputs"',
        '"name"',
        '"images"',
        '"logits"',
        '"datatype"',
        '"UINT8"',
        '"BYTES"',
        '"shape"',
        '"data"',
        '"parameters"',
        '"binary_data_size"',
        '"classification"',
        '"binary_data"',
        '"binary_data_output"',
        "[1,32,32,3]",
        "NaN",
        "Infinity",
        "1e400",
    ],
}


def _dictionary(target: str, folder: Path) -> list[str]:
    words = WORDS.get(target)
    if not words:
        return []
    path = folder / "words.dict"
    path.write_text("".join(json.dumps(w) + "\n" for w in words))
    return [f"-dict={path}"]


def child(target: str, seconds: float, stats_path: Path, save: bool) -> None:
    """One target under libFuzzer, until `seconds` pass; stats land in `stats_path` as it goes."""
    import logging

    import atheris

    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    logging.getLogger("quicknet").setLevel(logging.CRITICAL + 1)  # 500s are counted here, not logged
    with atheris.instrument_imports(include=INSTRUMENT):
        from benchmarks.fuzzing import SEEDS, Finding, Harness, save_finding

        harness = Harness()  # it imports the fronts: inside, so they are instrumented too
    logging.getLogger("quicknet").setLevel(logging.ERROR)  # the harness's handler reads the tracebacks
    logging.getLogger("quicknet").propagate = False
    run = harness.targets[target]
    stats = {"target": target, "inputs": 0, "findings": 0, "messages": [], "saved": []}
    last_write = [0.0]

    def write(force: bool = False) -> None:
        now = time.monotonic()
        if force or now - last_write[0] > 1.0:
            last_write[0] = now
            tmp = stats_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(stats))
            tmp.replace(stats_path)

    def one_input(data: bytes) -> None:
        stats["inputs"] += 1
        try:
            run(data)
        except Finding as e:
            stats["findings"] += 1
            message = f"{e} <- {e.__cause__!r}"[:300]
            if message not in stats["messages"]:
                stats["messages"].append(message)
                print(f"FINDING {target}: {message}", file=sys.stderr, flush=True)
            if save:
                stats["saved"].append(str(save_finding(target, data).relative_to(REPO)))
            write(force=True)
        write()

    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
    for i, seed in enumerate(SEEDS[target]()):
        (corpus / f"seed-{i}").write_bytes(seed)
    write(force=True)
    atheris.Setup(
        [
            sys.argv[0],
            str(corpus),
            f"-max_total_time={int(seconds)}",
            "-timeout=30",
            "-rss_limit_mb=8192",
            "-print_final_stats=1",
        ],
        one_input,
    )
    atheris.Fuzz()  # exits the process when the time is up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300, help="per target (default 300)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {', '.join(TARGETS)}")
    parser.add_argument("--no-save", action="store_true", help="do not add findings to tests/fuzz_corpus")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.seconds, Path(args.stats), not args.no_save)
        return

    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    from benchmarks.common import save, table

    rows = []
    with tempfile.TemporaryDirectory() as work:
        for target in targets:
            stats_path = Path(work) / f"{target}.json"
            cmd = [sys.executable, "-m", "benchmarks.fuzz", "--child", target, "--seconds", str(args.seconds)]
            cmd += ["--stats", str(stats_path)] + (["--no-save"] if args.no_save else [])
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            start = time.monotonic()
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            elapsed = time.monotonic() - start
            stats = json.loads(stats_path.read_text()) if stats_path.exists() else {"inputs": 0, "findings": 0}
            # libFuzzer ends a finished run with 0; anything else is a crash of the process itself
            crashed = proc.returncode != 0
            if crashed:
                print(proc.stderr[-3000:], file=sys.stderr)
            rows.append(
                {
                    "target": target,
                    "seconds": round(elapsed, 1),
                    "inputs": stats["inputs"],
                    "inputs/s": round(stats["inputs"] / max(elapsed, 1e-9)),
                    "findings (5xx, INTERNAL, exceptions)": stats["findings"],
                    "process crashes": int(crashed),
                    "messages": stats.get("messages", []),
                }
            )
    columns = ["target", "seconds", "inputs", "inputs/s", "findings (5xx, INTERNAL, exceptions)", "process crashes"]
    total = {
        "target": "all",
        "seconds": round(sum(r["seconds"] for r in rows), 1),
        "inputs": sum(r["inputs"] for r in rows),
        "findings (5xx, INTERNAL, exceptions)": sum(r["findings (5xx, INTERNAL, exceptions)"] for r in rows),
        "process crashes": sum(r["process crashes"] for r in rows),
    }
    print(table([*rows, total], columns))
    for row in rows:
        for message in row["messages"]:
            print(f"  {row['target']}: {message}")
    if not args.no_save:
        print("results:", save("fuzz", {"seconds_per_target": args.seconds, "rows": rows, "total": total}))
    sys.exit(1 if total["findings (5xx, INTERNAL, exceptions)"] or total["process crashes"] else 0)


if __name__ == "__main__":
    main()
