"""The reliability report: the service on its worst minute, measured against a real `quicknet serve`.

    python -m benchmarks.reliability                      # every scenario (~8 minutes)
    python -m benchmarks.reliability --quick              # every scenario, short (~1 minute)
    python -m benchmarks.reliability --scenarios overload slow_clients --burst-seconds 20

Scenarios (load comes from this process; the server is a subprocess on the same machine):
- overload: find the concurrency that saturates the engine (C), then 10 x C closed-loop clients
  for `--burst-seconds` over all four fronts (REST /classify, our gRPC, KServe REST and gRPC),
  each request with a 1 s deadline, against a queue sized to 2 x C images so it must overflow.
  Goals: 0 5xx; refusals are 429 / RESOURCE_EXHAUSTED with Retry-After, p99 < 5 ms; accepted
  requests answered within their deadline; peak RSS < 1.5 x idle; full throughput within 1 s after.
- slow_clients: C normal clients alone, then again while 1,000 idle keep-alive connections,
  50 slowloris heads and 50 byte-a-second uploads hang. Goal: >= 90% of the throughput.
- faults: every 20th engine batch fails under load (only those requests get 500, none lost), then
  one batch hangs past the watchdog (liveness goes false, and true again when it returns).
- sigterm: SIGTERM under 2 x C clients: every request the server accepted is answered, exit 0.
- fuzz: `benchmarks.fuzz` over every parser (`--fuzz-seconds` per target).

Prints one table and writes benchmarks/results/reliability.json. Ratios, not absolute times,
are what carry to other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np

from benchmarks.common import save, table
from benchmarks.cpu import tree
from quicknet.testing import REPO, start_server

FRONTS = ("rest", "grpc", "kserve-rest", "kserve-grpc")
PIXELS = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8).tobytes()
GRPC_TO_HTTP = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@dataclass
class Outcome:
    front: str
    status: int  # HTTP status, or the gRPC code's HTTP twin; 0: no answer (connection lost)
    seconds: float
    retry_after: bool = False
    connected: bool = True  # False: refused before the request was sent (server gone)
    error: str = ""  # why there was no answer


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    windows: list[int] = field(default_factory=list)

    def count(self, *statuses: int) -> int:
        return sum(1 for o in self.outcomes if o.status in statuses)

    @property
    def server_errors(self) -> int:
        return sum(1 for o in self.outcomes if o.status >= 500)  # 503 and 504 count: a caller sees them fail

    @property
    def lost(self) -> int:
        return sum(1 for o in self.outcomes if o.status == 0 and o.connected)


class Clients:
    """One client per front, sharing connections like a fleet of callers behind a pool."""

    def __init__(self, srv, model: str):
        from quicknet.api._generated import classifier_pb2 as cpb
        from quicknet.api._generated import classifier_pb2_grpc as cpb_grpc
        from quicknet.api._generated import grpc_predict_v2_pb2 as kpb
        from quicknet.api._generated import grpc_predict_v2_pb2_grpc as kpb_grpc

        self.url, self.model = srv.url, model
        self.http = httpx.AsyncClient(
            timeout=30,
            # idle connections expire before the server's 5 s idle timeout closes them (see the README)
            limits=httpx.Limits(max_connections=2000, max_keepalive_connections=2000, keepalive_expiry=4.0),
        )
        self.channel = grpc.aio.insecure_channel(srv.grpc_target)
        self.classifier = cpb_grpc.ClassifierStub(self.channel)
        self.kserve = kpb_grpc.GRPCInferenceServiceStub(self.channel)
        self.classify_request = cpb.ClassifyRequest(image=cpb.Image(pixels=PIXELS), top_k=1)
        infer = kpb.ModelInferRequest(model_name=model, raw_input_contents=[PIXELS])
        infer.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 3])
        self.infer_request = infer
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "UINT8",
                        "shape": [1, 32, 32, 3],
                        "parameters": {"binary_data_size": 3072},
                    }
                ]
            }
        ).encode()
        self.kserve_body, self.kserve_header_length = header + PIXELS, str(len(header))

    async def close(self) -> None:
        await self.http.aclose()
        await self.channel.close()

    async def call(self, front: str, deadline_ms: float = 1000) -> Outcome:
        start = time.perf_counter()
        try:
            if front in ("rest", "kserve-rest"):
                return await self._rest(front, deadline_ms, start)
            return await self._grpc(front, deadline_ms, start)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            return Outcome(front, 0, time.perf_counter() - start, connected=False)
        except httpx.TransportError as e:
            return Outcome(front, 0, time.perf_counter() - start, error=f"{type(e).__name__}: {e}")

    async def _rest(self, front: str, deadline_ms: float, start: float) -> Outcome:
        headers = {"X-Request-Timeout-Ms": str(deadline_ms)}
        if front == "rest":
            headers["Content-Type"] = "application/octet-stream"
            r = await self.http.post(f"{self.url}/classify", content=PIXELS, headers=headers)
        else:
            headers["Inference-Header-Content-Length"] = self.kserve_header_length
            r = await self.http.post(
                f"{self.url}/v2/models/{self.model}/infer", content=self.kserve_body, headers=headers
            )
        return Outcome(front, r.status_code, time.perf_counter() - start, "retry-after" in r.headers)

    async def _grpc(self, front: str, deadline_ms: float, start: float) -> Outcome:
        timeout = deadline_ms / 1000
        try:
            if front == "grpc":
                await self.classifier.Classify(self.classify_request, timeout=timeout)
            else:
                await self.kserve.ModelInfer(self.infer_request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            trailing = dict(e.trailing_metadata() or ())
            # only a connection never made is "not connected"; a reset mid-call is a lost request
            if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (e.details() or "").lower():
                return Outcome(front, 0, time.perf_counter() - start, connected=False)
            return Outcome(front, GRPC_TO_HTTP.get(code, 500), time.perf_counter() - start, "retry-after" in trailing)
        return Outcome(front, 200, time.perf_counter() - start)


async def closed_loop(
    clients: Clients, concurrency: int, seconds: float, deadline_ms: float = 1000, *, windows: bool = False
) -> Tally:
    """`concurrency` callers, each sending its next request as soon as the last is answered, the
    fronts in turn; with `windows`, also the 200s answered in each 100 ms from the start."""
    tally = Tally()
    start = time.monotonic()
    stop = start + seconds

    async def caller(i: int) -> None:
        n = i
        while time.monotonic() < stop:
            outcome = await clients.call(FRONTS[n % len(FRONTS)], deadline_ms)
            tally.outcomes.append(outcome)
            if windows and outcome.status == 200:
                slot = int((time.monotonic() - start) / 0.1)
                tally.windows.extend([0] * (slot + 1 - len(tally.windows)))
                tally.windows[slot] += 1
            if not outcome.connected:  # the server is gone (the SIGTERM scenario): this caller is done
                return
            n += 1

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return tally


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (front and engine processes)."""
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


async def sample_rss(pid: int, out: list[int], stop: asyncio.Event, every_s: float = 0.1) -> None:
    while not stop.is_set():
        out.append(rss_bytes(pid))
        await asyncio.sleep(every_s)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def throughput(tally: Tally, seconds: float) -> float:
    return tally.count(200) / seconds


async def saturating_concurrency(clients: Clients, seconds: float) -> tuple[int, float]:
    """The smallest concurrency within 90% of the best throughput seen (the engine is saturated)."""
    rates = {}
    for c in (1, 2, 4, 8, 16, 32):
        rates[c] = throughput(await closed_loop(clients, c, seconds), seconds)
    best = max(rates.values())
    c = min(c for c, r in rates.items() if r >= 0.9 * best)
    return c, rates[c]


def _server(tmp: Path, **settings):
    return start_server(tmp, **settings)


# --- scenarios -----------------------------------------------------------------------------------


LE = (
    "0.0005",
    "0.001",
    "0.0025",
    "0.005",
    "0.01",
    "0.025",
    "0.05",
    "0.1",
    "0.25",
    "0.5",
    "1.0",
    "2.5",
    "5.0",
    "10.0",
    "+Inf",
)


def server_durations(before: str, after: str, codes: tuple[str, ...]) -> dict[str, float]:
    """The server's own request-duration histogram between two scrapes, for these status codes:
    cumulative count per bucket bound (what the server spent, without the load generator's queueing)."""
    from quicknet.testing import metric

    name = "quicknet_request_duration_seconds_bucket"
    return {
        le: sum(metric(after, name, code=c, le=le) - metric(before, name, code=c, le=le) for c in codes) for le in LE
    }


def bucket_quantile(cumulative: dict[str, float], q: float) -> str:
    """The smallest bucket bound that holds a fraction `q` of the observations ("<= 5 ms")."""
    total = cumulative["+Inf"]
    if not total:
        return "-"
    bound = next(le for le in LE if cumulative[le] >= q * total)
    return "> 10 s" if bound == "+Inf" else f"<= {float(bound) * 1000:g} ms"


async def overload(tmp: Path, args) -> dict:
    probe = _server(tmp)
    try:
        clients = Clients(probe, "quicknet-xs")
        await closed_loop(clients, 4, 1.0)  # warm connections and caches
        c, _ = await saturating_concurrency(clients, args.step_seconds)
        await clients.close()
    finally:
        probe.stop()
    queue = 2 * c
    srv = _server(tmp, max_queue_images=queue)
    try:
        # the C regular callers keep their own connections throughout; the burst is 9 x C more callers
        # with connections of their own (one client's pool of 10 x C connections measures the client)
        regular, extra = Clients(srv, "quicknet-xs"), Clients(srv, "quicknet-xs")
        await closed_loop(regular, c, 1.0)
        await closed_loop(extra, 9 * c, 1.0)
        base_rate = throughput(await closed_loop(regular, c, args.step_seconds), args.step_seconds)
        idle = rss_bytes(srv.proc.pid)
        samples: list[int] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(srv.proc.pid, samples, stop))
        before = httpx.get(f"{srv.url}/metrics").text
        parts = await asyncio.gather(
            closed_loop(regular, c, args.burst_seconds), closed_loop(extra, 9 * c, args.burst_seconds)
        )
        after = httpx.get(f"{srv.url}/metrics").text
        burst = Tally(parts[0].outcomes + parts[1].outcomes)
        # recovery: the regular callers alone, completions counted in 100 ms windows from the burst's end
        after_burst = await closed_loop(regular, c, args.step_seconds, windows=True)
        stop.set()
        await sampler
        await regular.close()
        await extra.close()
        log = srv.log()
    finally:
        code = srv.stop()
    per_window = base_rate * 0.1
    windows = after_burst.windows
    recovered_s = next(((i + 1) * 0.1 for i, w in enumerate(windows) if w >= 0.9 * per_window), None)
    refusals = [o for o in burst.outcomes if o.status == 429]
    accepted = [o for o in burst.outcomes if o.status == 200]
    refused_server = server_durations(before, after, ("429", "RESOURCE_EXHAUSTED"))
    accepted_server = server_durations(before, after, ("200", "OK"))
    return {
        "scenario": "overload",
        "load": f"10 x {c} callers, {args.burst_seconds:g}s, 4 fronts, queue {queue} images",
        "faults": "-",
        "inputs": len(burst.outcomes),
        "5xx": burst.server_errors,
        "lost": burst.lost,
        "peak_rss_mb": round(max(samples) / 2**20, 1),
        "detail": {
            "saturating_concurrency": c,
            "base_rate_per_s": round(base_rate),
            "answered_200": len(accepted),
            "refused_429": len(refusals),
            "refused_with_retry_after": sum(o.retry_after for o in refusals),
            "refusal_p99_server": bucket_quantile(refused_server, 0.99),
            "refusal_p99_client_ms": round(percentile([o.seconds * 1000 for o in refusals], 99), 1),
            "accepted_within_1s_server": f"{accepted_server['1.0']:.0f} of {accepted_server['+Inf']:.0f}",
            "accepted_p99_client_ms": round(percentile([o.seconds * 1000 for o in accepted], 99), 1),
            "deadline_504": burst.count(504),
            "other_statuses": sorted({o.status for o in burst.outcomes} - {200, 429, 504}),
            "lost_errors": sorted({f"{o.front}: {o.error}" for o in burst.outcomes if o.status == 0 and o.connected}),
            "idle_rss_mb": round(idle / 2**20, 1),
            "peak_over_idle": round(max(samples) / idle, 2),
            "full_throughput_after_s": recovered_s,
            "exit_code": code,
            "tracebacks_in_log": log.count("Traceback"),
        },
    }


async def _hold_idle(srv, n: int) -> list:
    """`n` keep-alive connections that made one request and now sit idle."""
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.http_port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        conns.append((reader, writer))
    for reader, _ in conns:
        await reader.readuntil(b"\r\n\r\n")
    return conns


async def _slowloris(srv, stop: asyncio.Event, body: bool) -> int:
    """Trickle a request head (or a body) a byte a second; reconnect when cut off. Returns cut-offs."""
    cut = 0
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.http_port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        writer.write(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 3072\r\n\r\n"
            if body
            else b"GET /healthz HTTP/1.1\r\n"
        )
        closed = asyncio.ensure_future(reader.read())
        while not stop.is_set() and not closed.done():
            writer.write(b"\0" if body else b"X")
            await asyncio.wait([closed], timeout=1.0)
        if closed.done():
            cut += 1
        else:
            closed.cancel()
        writer.close()
    return cut


async def slow_clients(tmp: Path, args) -> dict:
    # idle connections must outlive the measurement to be measured: a 60 s idle limit here
    srv = _server(tmp, http_idle_timeout_s=60)
    try:
        clients = Clients(srv, "quicknet-xs")
        await closed_loop(clients, 4, 1.0)
        c = args.concurrency or 4
        alone = throughput(await closed_loop(clients, c, args.step_seconds), args.step_seconds)
        idle = await _hold_idle(srv, args.idle_connections)
        stop = asyncio.Event()
        trickles = [asyncio.create_task(_slowloris(srv, stop, body=i % 2 == 1)) for i in range(2 * args.slowloris)]
        await asyncio.sleep(1.0)
        during = await closed_loop(clients, c, args.step_seconds)
        rate = throughput(during, args.step_seconds)
        peak = rss_bytes(srv.proc.pid)
        stop.set()
        cut = sum(await asyncio.gather(*trickles))
        for _, writer in idle:
            writer.close()
        await clients.close()
    finally:
        code = srv.stop()
    return {
        "scenario": "slow_clients",
        "load": f"{c} callers beside {args.idle_connections} idle, {args.slowloris} slowloris, "
        f"{args.slowloris} 1 B/s uploads",
        "faults": "-",
        "inputs": len(during.outcomes),
        "5xx": during.server_errors,
        "lost": during.lost,
        "peak_rss_mb": round(peak / 2**20, 1),
        "detail": {
            "rate_alone_per_s": round(alone),
            "rate_beside_slow_clients_per_s": round(rate),
            "ratio": round(rate / alone, 3),
            "slow_clients_cut_off": cut,
            "exit_code": code,
        },
    }


async def faults(tmp: Path, args) -> dict:
    srv = _server(tmp, fault_injection="fail-every=20")
    try:
        clients = Clients(srv, "quicknet-xs")
        tally = await closed_loop(clients, args.concurrency or 4, args.step_seconds)
        text = httpx.get(f"{srv.url}/metrics").text
        await clients.close()
    finally:
        code = srv.stop()
    from quicknet.testing import metric

    failed_batches = metric(text, "quicknet_rejections_total", reason="engine_error")
    hang = _server(tmp, fault_injection="hang-every=3,hang-seconds=3", watchdog_s=1)
    try:
        with httpx.Client(base_url=hang.url, timeout=30) as client:
            for _ in range(2):
                client.post("/classify", content=PIXELS, headers={"Content-Type": "application/octet-stream"})
            start = time.monotonic()
            pending = asyncio.create_task(
                asyncio.to_thread(
                    client.post, "/classify", content=PIXELS, headers={"Content-Type": "application/octet-stream"}
                )
            )
            not_live_s = live_again_s = None
            while time.monotonic() - start < 10:
                status = httpx.get(f"{hang.url}/healthz").status_code
                if status == 503 and not_live_s is None:
                    not_live_s = round(time.monotonic() - start, 2)
                if status == 200 and not_live_s is not None:
                    live_again_s = round(time.monotonic() - start, 2)
                    break
                await asyncio.sleep(0.05)
            hung = await pending
    finally:
        hang_code = hang.stop()
    return {
        "scenario": "faults",
        "load": f"{args.concurrency or 4} callers, {args.step_seconds:g}s; then one hung batch",
        "faults": f"every 20th batch fails ({int(failed_batches)} requests); a 3 s hang, watchdog 1 s",
        "inputs": len(tally.outcomes),
        "5xx": tally.server_errors,
        "lost": tally.lost,
        "peak_rss_mb": None,
        "detail": {
            "answered_500": tally.count(500),
            "engine_error_rejections": failed_batches,
            "only_injected_faults_failed": tally.count(500) == failed_batches,
            "not_live_after_s": not_live_s,
            "live_again_after_s": live_again_s,
            "hung_request_status": hung.status_code,
            "exit_codes": [code, hang_code],
        },
    }


async def sigterm(tmp: Path, args) -> dict:
    srv = _server(tmp)
    clients = Clients(srv, "quicknet-xs")
    await closed_loop(clients, 4, 1.0)
    c = 2 * (args.concurrency or 4)
    load = asyncio.create_task(closed_loop(clients, c, 3.0, deadline_ms=10_000))
    await asyncio.sleep(1.5)
    srv.proc.send_signal(signal.SIGTERM)
    tally = await load
    code = await asyncio.to_thread(srv.proc.wait, 60)
    await clients.close()
    answered = sum(1 for o in tally.outcomes if o.status)
    return {
        "scenario": "sigterm",
        "load": f"{c} callers; SIGTERM after 1.5 s",
        "faults": "SIGTERM",
        "inputs": len(tally.outcomes),
        "5xx": tally.server_errors,
        "lost": tally.lost,
        "peak_rss_mb": None,
        "detail": {
            "answered": answered,
            "answered_200": tally.count(200),
            "refused_503_while_draining": tally.count(503),
            "not_connected_after_exit": sum(1 for o in tally.outcomes if not o.connected),
            "lost": sorted({f"{o.front}: {o.error}" for o in tally.outcomes if o.status == 0 and o.connected}),
            "exit_code": code,
        },
    }


def fuzz(tmp: Path, args) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.fuzz", "--seconds", str(args.fuzz_seconds), "--no-save"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    total = next(line for line in result.stdout.splitlines() if line.startswith("all"))
    cells = [c.strip() for c in total.split("|")]
    return {
        "scenario": "fuzz",
        "load": f"4 parsers x {args.fuzz_seconds:g}s, coverage-guided",
        "faults": "hostile inputs",
        "inputs": int(cells[2]),
        "5xx": int(cells[4]),
        "lost": 0,
        "peak_rss_mb": None,
        "detail": {"table": result.stdout.strip(), "exit_code": result.returncode, "process_crashes": int(cells[5])},
    }


SCENARIOS = {"overload": overload, "slow_clients": slow_clients, "faults": faults, "sigterm": sigterm, "fuzz": fuzz}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="short runs of everything (a smoke test, ~1 minute)")
    parser.add_argument("--burst-seconds", type=float, default=60)
    parser.add_argument("--step-seconds", type=float, default=3, help="each calibration and comparison step")
    parser.add_argument("--fuzz-seconds", type=float, default=60, help="per fuzz target")
    parser.add_argument("--concurrency", type=int, default=0, help="normal callers (0: 4)")
    parser.add_argument("--idle-connections", type=int, default=1000)
    parser.add_argument("--slowloris", type=int, default=50, help="slowloris heads, and as many slow uploads")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.burst_seconds, args.step_seconds, args.fuzz_seconds = 3, 1, 2
        args.idle_connections, args.slowloris = 200, 10
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scenarios:
            run = SCENARIOS[name]
            print(f"... {name}", file=sys.stderr, flush=True)
            row = run(Path(tmp), args) if name == "fuzz" else asyncio.run(run(Path(tmp), args))
            rows.append(row)
            print(json.dumps(row["detail"] if name != "fuzz" else {"inputs": row["inputs"]}), file=sys.stderr)
    columns = ["scenario", "load", "faults", "inputs", "5xx", "lost", "peak_rss_mb"]
    print(table(rows, columns))
    for row in rows:
        if row["scenario"] != "fuzz":
            print(f"  {row['scenario']}: " + ", ".join(f"{k} {v}" for k, v in row["detail"].items()))
    if not args.no_save:
        print("results:", save("reliability", {"quick": args.quick, "rows": rows}))


if __name__ == "__main__":
    main()
