"""What gRPC itself costs a server a unary call in Python: the floor under any gRPC front of ours.

    python -m benchmarks.grpc_floor [--servers aio sync16 sync4] [--concurrency 1 4 16 64] [--seconds 6]

A server process with one method that echoes its request's bytes (a generic handler, no protobuf,
nothing of ours) and a client process sending 3,100-byte requests (about a 32x32 PNG) over 4
channels, closed loop at each concurrency, as `benchmarks.loadgen` drives our fronts. The server
process's CPU over the window (/proc, every thread) divided by the calls answered: microseconds a
call; and the client's own (what one of `benchmarks.loadgen`'s gRPC client processes spends).
`aio` is grpc.aio on uvloop, as our fronts run; `syncN` is grpc's thread-pool server with N
threads, which holds at most N calls at once (a call that waits for a batch holds a thread), so
it could not carry a batching front: it is here to show what the asyncio layer costs.

Compare a row with `python -m benchmarks.engine_core --request kserve-grpc` (a front's CPU a
request, raw pixels to KServe's ModelInfer) at about the same calls a second a process: the cost a
call falls as the rate rises (more completions for each wake-up), so only rows at the same rate
compare. Prints a table and writes benchmarks/results/grpc_floor.json.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

METHOD = "/floor.Echo/Call"
PAYLOAD = b"x" * 3100
CHANNELS = 4
START_TIMEOUT_S = 30  # a process's start (grpc's import) on a loaded machine, with room to spare


def _echo_handler(grpc, echo):
    def same(b: bytes) -> bytes:
        return b

    handler = grpc.unary_unary_rpc_method_handler(echo, request_deserializer=same, response_serializer=same)
    return grpc.method_handlers_generic_handler("floor.Echo", {"Call": handler})


def serve(kind: str) -> None:
    """The server process: listens on a port the system picks, prints `ready <port>`, then serves
    until killed (no port to pick beforehand and lose to another process in between)."""
    import grpc

    if kind == "aio":
        import uvloop

        async def echo(request: bytes, context) -> bytes:
            return request

        async def main() -> None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((_echo_handler(grpc, echo),))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            print(f"ready {port}", flush=True)
            await server.wait_for_termination()

        uvloop.run(main())
        return
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=int(kind.removeprefix("sync"))))
    server.add_generic_rpc_handlers((_echo_handler(grpc, lambda request, context: request),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"ready {port}", flush=True)
    server.wait_for_termination()


async def drive(port: int, concurrency: int, seconds: float) -> tuple[int, float]:
    """Calls answered in `seconds`, `concurrency` at once over CHANNELS channels (connections), and
    the CPU seconds this client spent meanwhile (grpc.aio, as benchmarks.loadgen's clients)."""
    import resource

    import grpc

    options = [("grpc.use_local_subchannel_pool", 1)]  # else the channels share one connection
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(CHANNELS)]
    calls = [c.unary_unary(METHOD) for c in channels]
    done = 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    end = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal done
        call = calls[i % CHANNELS]
        while time.perf_counter() < end:
            await call(PAYLOAD)
            done += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    after = resource.getrusage(resource.RUSAGE_SELF)
    for channel in channels:
        await channel.close()
    return done, (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)


def measure(kind: str, concurrency: int, seconds: float) -> dict:
    import selectors

    from benchmarks.cpu import cpu_seconds

    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.grpc_floor", "--serve", kind], stdout=subprocess.PIPE, text=True
    )
    try:
        with selectors.DefaultSelector() as sel:  # a server that never says ready must not hang the run
            sel.register(server.stdout, selectors.EVENT_READ)
            line = server.stdout.readline() if sel.select(timeout=START_TIMEOUT_S) else ""
        word, _, port = line.strip().partition(" ")
        if word != "ready" or not port.isdigit():
            raise RuntimeError(f"the {kind} echo server did not start within {START_TIMEOUT_S} s")
        client = [sys.executable, "-m", "benchmarks.grpc_floor", "--drive", port, "--concurrency", str(concurrency)]
        limit = seconds + START_TIMEOUT_S
        subprocess.run([*client, "--seconds", "1"], check=True, capture_output=True, timeout=limit)  # warm
        before = cpu_seconds(f"/proc/{server.pid}/stat")
        out = subprocess.run([*client, "--seconds", str(seconds)], check=True, capture_output=True, timeout=limit)
        used = cpu_seconds(f"/proc/{server.pid}/stat") - before
    finally:
        server.kill()
        server.wait()
    calls, client_s = int(out.stdout.split()[0]), float(out.stdout.split()[1])
    return {
        "server": kind,
        "concurrency": concurrency,
        "calls_s": round(calls / seconds),
        "server_us_per_call": round(used / max(calls, 1) * 1e6),
        "client_us_per_call": round(client_s / max(calls, 1) * 1e6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", nargs="+", default=["aio", "sync16", "sync4"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the server process
    parser.add_argument("--drive", type=int, help=argparse.SUPPRESS)  # the client process: its port
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)
    if args.drive:
        print(*asyncio.run(drive(args.drive, args.concurrency[0], args.seconds)))
        return
    bad = [s for s in args.servers if s != "aio" and not (s.startswith("sync") and s[4:].isdigit() and int(s[4:]))]
    if bad:
        raise SystemExit(f"--servers: aio or syncN (N threads), got {' '.join(bad)}")
    from benchmarks.common import save, table

    rows = []
    for kind in args.servers:
        for c in args.concurrency:
            rows.append(measure(kind, c, args.seconds))
            print(rows[-1], flush=True)
    print(table(rows, list(rows[0])))
    if not args.no_save:
        print("results:", save("grpc_floor", {"rows": rows}))


if __name__ == "__main__":
    main()
