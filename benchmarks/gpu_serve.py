"""GPU proof for serving: `make gpu-serve` / `python -m benchmarks.gpu_serve`.

Runs under a GPU machine's own Python (torch, numpy, grpcio...; the serving stack from the
wheels `make gpu-wheels` downloads, on PYTHONPATH). Within `--budget-s`, each step writing its
results before the next starts, into `--out` (results.json, results.md, server.log: every
server's log, one after another):

1. environment and ceilings: GPU, driver, versions; dense bf16 matmul TFLOP/s; host<->device GB/s;
2. the engine alone: the service's torch engine (fp16, channels_last, one CUDA graph per bucket,
   uint8 NHWC in, logits out, host<->device copies included) at each batch size, with one lane
   and with two (two batches in flight), GPU utilization while it runs, and FLOP/s as a fraction of
   the matmul ceiling;
3. the service at the first front count of `--workers` (16 by default): `quicknet serve --backend
   torch` (buckets up to 1024), driven on the same machine by `hey` (REST, when there) and Python
   gRPC clients in several processes over 4 connections a front process: one image a request
   over REST and gRPC, 64 over KServe gRPC; served img/s, p50/p99, mean batch, GPU utilization,
   efficiency = served / engine-alone at the server's mean batch; where the CPU went (the engine
   process's loop and threads, the fronts, the machine: `benchmarks/cpu.py`) and which part is
   saturated; the server's own account from its histograms;
4. the peers a user would run instead, on the same machine with the same model and load
   generator, one image per request: plain FastAPI + the same torch engine, no batching
   (`benchmarks/peer_servers/torch_fastapi.py`), and LitServe with its batching
   (`litserve_torch.py`); PyTriton is not carried (53 MiB, CUDA 12 libraries);
5. the fused engine (`benchmarks/gpu_engine.py`, issue 27) in a child process under
   `--engine-limit-s`: built for this GPU from the model file the torch engine serves (gated on
   the 10k test split with `--data`), timed at each batch size (the eager engine's rows are step
   2's), the roofline rows, per-kernel profiles, and the engine file itself, published into the
   store beside the weights;
6. with the time left: the other front counts' cases; at the best one the same server with
   `--backend auto` (the fused engine where it was built for this GPU) at 64 and 1 images per
   request, one image a request at 80% of the best closed-loop rate (REST at a rate from `hey
   -q`, gRPC open loop), for the p99 a steady load gets, and the other sizes and protocols; then
   torch.compile (max-autotune) and AOTInductor, each in a child process with a time limit
   (neither finished in 50-60 s on the first run).

Steps 3 and 4 stop in time to leave step 5 `FUSED_MIN_S`, step 3 to leave step 4 its share:
the first run, in sweep order, reached 2 of its 5 front counts and spent a third of its budget
on the compiled variants. A server starts only with time for its start and a case, and a failed
start or case is a row with its error, not the end of the run. `steps` in the results says
when each step started and how long it took.

The model is `--model`'s latest version in `model_store/` as published (the default: `quicknet`):
the fused engine built from its `model.onnx` comes back attachable to that version (gated when
`--data` is given). `--from-train DIR` takes the train run's best arm instead when the train run of
the same draw left it there (`quicknet gpu-train --handoff DIR`; the machine, still warm, kept the
git-ignored folder): the engine then names that checkpoint's SHA-256 and attaches to the version
published from it back on the CPU, so a new default ships with its engine from the same draw; on a
fresh machine the folder is not there and the published model is served, as the results say.
`--checkpoint` serves a run folder's trained weights (its engine for measuring only), and a
`--model` the store does not publish is served untrained (speed only). `--dry-run`
runs every step on the CPU in about two minutes (the published quicknet-xs, tiny loads, the torch
engine on the CPU, the fused engine in Triton's interpreter) and is part of the tests.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import cell

REPO = Path(__file__).resolve().parents[1]
HEY_CANDIDATES = (REPO / ".gpu" / "bin" / "hey", Path("/usr/bin/hey"))
# Every front-process count gets the headline cases; the fastest then gets the rest.
HEADLINE_CASES = ((1, "rest"), (1, "grpc"), (64, "kserve-grpc"))
MORE_CASES = ((8, "rest"), (8, "grpc"), (64, "rest"), (64, "grpc"), (1, "kserve-grpc"), (8, "kserve-grpc"))
# The server choosing its own engine (the fused one, built for this GPU), against the torch rows.
FUSED_CASES = ((64, "kserve-grpc"), (1, "grpc"))
# The same model behind what a user would run instead, one image per request: (name, its server,
# its body: raw pixels, or LitServe's JSON, as it reads only JSON or form bodies). PyTriton is not
# carried to the GPU machine (its wheel is 53 MiB and wants CUDA 12 libraries).
GPU_PEERS = (
    ("fastapi + torch, no batching", "benchmarks.peer_servers.torch_fastapi", "raw"),
    ("litserve + torch, its batching", "benchmarks.peer_servers.litserve_torch", "json"),
)
PEER_CONCURRENCY = 256  # as the service's one-image cases
# p99 is asked at this share of the best closed-loop rate (the issue: p99 <= 20 ms at 80%): closed
# loop at c = 256 measures capacity, not the latency a service at a steady load gives
RATE_FRACTION = 0.8


def _rates_at(service: list[dict], workers: int, fraction: float) -> tuple:
    """(1, protocol, rate) cases: one image a request at `fraction` of each protocol's best rate."""
    cases = []
    for protocol in ("rest", "grpc"):
        rows = [
            r
            for r in service
            if r.get("workers") == workers and r.get("protocol") == protocol and r.get("images_per_request") == 1
        ]
        if rows:
            cases.append((1, protocol, round(fraction * max(r["requests_s"] for r in rows), 1)))
    return tuple(cases)


GRPC_CHANNELS_PER_FRONT = 4

# The serve run's plan, from the first run's server log (2026-12-04, one H200, 16 fronts): a server
# took ~19 s to start (a CUDA graph per bucket and lane) and ~6 s to drain and stop, and each case
# ~6 s besides its measuring (the clients' processes, the metrics before and after). A server is
# started only with time for that and a case, a peer only with time for its start and its case.
SERVER_START_S = 25.0
CASE_OVERHEAD_S = 6.0
PEER_S = 30.0
# The fused engine step's share of the budget (issue 27): build ~30-45 s (an estimate: it has never
# run on a GPU), gate on 10k images, time it at 4 batch sizes and 2 lanes, profile; the steps
# before it stop in time to leave it this.
FUSED_MIN_S = 100.0


def copy_published(root: Path, model: str, source: Path = REPO / "model_store") -> str:
    """A model store holding `model`'s latest version from `source` as it was published (its folder,
    byte for byte, and the model's batch policy): the torch engine serves its `model.onnx`, and the
    fused engine built from that file can be attached to that version afterwards
    (`quicknet.build.gpu_engine.attach`). Returns "<model> v<version>"."""
    from quicknet import store

    mv = store.get_version(source, model)
    shutil.copytree(mv.path, root / model / str(mv.version))
    if (mv.path.parent / "config.json").is_file():
        shutil.copy2(mv.path.parent / "config.json", root / model / "config.json")
    store.set_default(root, model)
    return f"{model} v{mv.version}"


def make_folded_store(root: Path, checkpoint: Path | None, model: str) -> str:
    """A model store holding a run folder's trained weights (or, without one, `model` untrained: for
    speed only) as the torch engine's folded weights, naming the checkpoint they were folded from
    (`exported_from`, as a published version does). Returns the model's name."""
    import torch

    from quicknet import store
    from quicknet.build import data
    from quicknet.build.export import export_folded_weights
    from quicknet.build.fold import fold
    from quicknet.build.model import build_model
    from quicknet.build.train import load_checkpoint

    torch.manual_seed(0)
    net = load_checkpoint(checkpoint)[0] if checkpoint else build_model(model).eval()
    work = root / ".work"
    work.mkdir(parents=True, exist_ok=True)
    weights = export_folded_weights(fold(net), work / "model.folded.pt")
    note = "trained" if checkpoint else "untrained: for speed only"
    meta = {"labels": list(data.LABELS), "artifacts": {"torch": weights.name}, "accuracy": {}, "note": note}
    if checkpoint:
        meta["exported_from"] = {"file": checkpoint.name, "sha256": store.sha256_file(checkpoint)}
    store.publish(root, net.cfg.name, [weights], meta)
    store.set_default(root, net.cfg.name)
    return net.cfg.name


def handed_off(folder: Path) -> tuple[Path | None, dict | str]:
    """(the checkpoint, its `handoff.json`) that `quicknet gpu-train --handoff` left in `folder`, or
    (None, why not): not there (a fresh machine), or not whole (its SHA-256 is not the one named)."""
    from quicknet import store
    from quicknet.build.gpu_train import HANDOFF_JSON

    marker, checkpoint = folder / HANDOFF_JSON, folder / "checkpoint.pt"
    if not marker.is_file():
        return None, f"no hand-off in {folder} (a fresh machine, or the train run left none)"
    try:
        doc = json.loads(marker.read_text())
        whole = checkpoint.is_file() and store.sha256_file(checkpoint) == doc["checkpoint_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{marker} is unreadable ({type(e).__name__})"
    if not whole:
        return None, f"{checkpoint} is not the checkpoint {marker.name} names"
    return checkpoint, doc


def choose_weights(root: Path, args) -> dict:
    """Fill the store `root` (empty, or not there yet) with what the run serves (`args.model` follows
    it); returns the results' fields that say which: `--checkpoint`'s weights, or the train run's
    hand-off when `--from-train` finds it (a failure to load it is a line in `handoff`, and the run
    goes on with the published model); else `--model` as published, or untrained where the store
    has none."""
    from quicknet import store

    fields: dict = {}
    if args.from_train:
        checkpoint, about = handed_off(Path(args.from_train))
        fields["handoff"] = about
        if checkpoint:
            try:
                args.model = make_folded_store(root, checkpoint, args.model)
                return fields | {"weights": f"trained: {about['arm']} from this draw's train run", "model": args.model}
            except Exception as e:
                fields["handoff"] = {**about, "error": f"{type(e).__name__}: {e}"}
                shutil.rmtree(root, ignore_errors=True)  # what the attempt left
                root.mkdir(parents=True)
    if args.checkpoint:
        args.model = make_folded_store(root, Path(args.checkpoint), args.model)
        return fields | {"weights": f"trained: {args.checkpoint}", "model": args.model}
    if store.list_versions(REPO / "model_store", args.model):
        return fields | {"weights": f"published: {copy_published(root, args.model)}"}
    make_folded_store(root, None, args.model)  # a width the store does not publish: its speed
    return fields | {"weights": "untrained (speed only)"}


def forward_flops(model: str) -> float:
    from quicknet.build.model import count_macs, get_config

    return 2.0 * count_macs(get_config(model))


# --- step 2: the engine alone ------------------------------------------------------------------


def _drive(infer, batch: int, seconds: float, threads: int) -> tuple[float, float]:
    """img/s and mean ms per batch with `threads` callers back to back (host copies included)."""
    x = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    for _ in range(3):
        infer(x)
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            infer(x)
            counts[i] += 1

    start = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    calls = sum(counts)
    return calls * batch / elapsed, 1000 * elapsed * threads / max(calls, 1)


def engine_alone(root: Path, batches: list[int], seconds: float, ceiling_tflops: float, flops: float) -> list[dict]:
    from quicknet import store
    from quicknet.build import gpu_probe
    from quicknet.serve.backends.pytorch import TorchBackend
    from quicknet.serve.config import Settings

    mv = store.get_version(root, store.default_model(root))
    rows = []
    for lanes in (1, 2):
        settings = Settings(backend="torch", max_batch_size=max(batches), instances=lanes, threads=2)
        backend = TorchBackend.load(mv, settings)
        backend.warmup()
        for batch in batches:
            with gpu_probe.UtilizationSampler() as util:
                img_s, ms = _drive(backend.infer, batch, seconds, threads=lanes)
            rows.append(
                {
                    "engine": "torch cuda-graphs" if backend.device == "cuda" else "torch cpu",
                    "lanes": lanes,
                    "batch": batch,
                    "img_s": round(img_s, 1),
                    "ms_per_batch": round(ms, 3),
                    "gpu_util": util.mean,
                    "tflops": round(img_s * flops / 1e12, 3),
                    "fraction_of_ceiling": round(img_s * flops / 1e12 / max(ceiling_tflops, 1e-9), 4),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        del backend
    return rows


def compiled_variant(root: Path, variant: str, batches: list[int], seconds: float, flops: float) -> list[dict]:
    """torch.compile (max-autotune) or AOTInductor on the same folded model; run in a child process."""
    import torch

    from quicknet import store
    from quicknet.serve.backends.pytorch import load_module

    mv = store.get_version(root, store.default_model(root))
    module, _ = load_module(str(mv.file(mv.weights_file)))
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    module = module.to(device, memory_format=torch.channels_last)
    if cuda:
        module = module.half()
        torch.backends.cudnn.benchmark = True  # as the engine sets it: like for like
    started = time.perf_counter()
    if variant == "compile":
        run = torch.compile(module, mode="max-autotune" if cuda else "default", dynamic=False)
    else:
        example = torch.zeros((max(batches), 32, 32, 3), dtype=torch.uint8, device=device)
        batch_dim = torch.export.Dim("batch", min=1, max=max(batches))
        program = torch.export.export(module, (example,), dynamic_shapes={"images": {0: batch_dim}})
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(root / "model.aoti.pt2"))
        run = torch._inductor.aoti_load_package(package)
    rows = []
    for batch in batches:
        host = torch.zeros((batch, 32, 32, 3), dtype=torch.uint8)
        if cuda:
            host = host.pin_memory()

        def infer(x: np.ndarray, host=host):
            host.numpy()[:] = x
            with torch.inference_mode():
                out = run(host.to(device, non_blocking=True))
            return out.float().cpu().numpy()

        t0 = time.perf_counter()
        infer(host.numpy())  # compiles this shape (static shapes for compile)
        compile_s = time.perf_counter() - t0
        img_s, ms = _drive(infer, batch, seconds, threads=1)
        rows.append(
            {
                "engine": f"torch {variant}",
                "lanes": 1,
                "batch": batch,
                "img_s": round(img_s, 1),
                "ms_per_batch": round(ms, 3),
                "tflops": round(img_s * flops / 1e12, 3),
                "first_call_s": round(compile_s, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return [{**r, "setup_s": round(time.perf_counter() - started, 1)} for r in rows]


def run_variant_in_child(root: Path, variant: str, batches: list[int], seconds: float, limit_s: float) -> dict:
    out = root / f"{variant}.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_serve", "--variant", variant, "--store", str(root), "--out-json"]
    cmd += [str(out), "--seconds", str(seconds), "--batches", *map(str, batches)]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"did not finish within {limit_s:.0f} s"}
    if done.returncode != 0 or not out.is_file():
        return {"variant": variant, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return {"variant": variant, "rows": json.loads(out.read_text())}


def fused_engine_in_child(root: Path, out: Path, args, ceiling_tflops: float, limit_s: float) -> dict:
    """`benchmarks.gpu_engine` under a hard limit; its `engine.json` (what it measured so far) either way."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_engine", "--store", str(root), "--out", str(out)]
    cmd += ["--limit-s", str(max(limit_s - 10, 10)), "--ceiling-tflops", str(ceiling_tflops)]
    cmd += ["--engines", "fused"]  # the eager engine's rows are the engine-alone step's
    cmd += ["--dry-run"] if args.dry_run else []
    cmd += ["--data", args.data] if args.data else []
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit_s)
        error = None if done.returncode == 0 else ((done.stderr or done.stdout).strip().splitlines() or ["?"])[-1]
    except subprocess.TimeoutExpired:
        error = f"did not finish within {limit_s:.0f} s"
    from benchmarks.gpu_engine import ENGINE_JSON

    doc = json.loads((out / ENGINE_JSON).read_text()) if (out / ENGINE_JSON).is_file() else {}
    return doc | ({"error": error} if error else {})


# --- step 3: the service -----------------------------------------------------------------------


def _hey() -> str | None:
    found = next((str(p) for p in HEY_CANDIDATES if p.is_file()), None)
    return found or shutil.which("hey")


def service_sweep(
    root: Path,
    out: Path,
    workers: list[int],
    cases,
    seconds: float,
    clients: int,
    engine_rows: list[dict],
    deadline: float,
    on_row: Callable[[dict], None],
    backend: str = "torch",
) -> None:
    """`quicknet serve` at each front count in `workers`, each of `cases` against it, each row to
    `on_row` as it is made. A server is started only with time before `deadline` for its start and
    a case, a case only with time for it; a skipped front count, a server that fails to start and
    a case that fails are rows too, saying so."""
    from quicknet import store
    from quicknet.testing import start_server

    model = store.default_model(root)
    hey = _hey()
    max_batch = max(r["batch"] for r in engine_rows)
    case_s = seconds + CASE_OVERHEAD_S

    for w in workers:
        if deadline - time.monotonic() < SERVER_START_S + case_s:  # a start with no case after it is waste
            on_row({"workers": w, "backend": backend, "skipped": "time budget spent"})
            continue
        logs = Path(tempfile.mkdtemp(prefix="gpu-serve-"))
        try:
            srv = start_server(
                logs,
                store=root,
                backend=backend,
                max_batch_size=max_batch,
                instances=2,
                workers=w,
                max_queue_images=65536,
                max_images_per_request=1024,
                access_log=False,  # a log line per request would measure the logging
                ready_timeout=max(deadline - time.monotonic() - case_s, 10),
            )
        except Exception as e:  # recorded; the other front counts and steps still run
            on_row({"workers": w, "backend": backend, "error": f"server start: {type(e).__name__}: {e}"})
            continue
        try:
            for case in cases:
                n_images, protocol, rate = (*case, 0.0)[:3]  # rate > 0: requests/s at a fixed rate
                if deadline - time.monotonic() < case_s:
                    break
                try:
                    on_row(_case(srv, w, backend, n_images, protocol, rate, seconds, clients, model, hey, engine_rows))
                except Exception as e:  # one case's failure (a client, hey) is its row; the next case runs
                    failed = {"workers": w, "backend": backend, "protocol": protocol, "images_per_request": n_images}
                    on_row(failed | {"error": f"{type(e).__name__}: {e}"})
        finally:
            srv.stop()
            with (out / "server.log").open("a") as log:  # every server's log, one after another
                log.write(f"===== quicknet serve --workers {w} --backend {backend} =====\n")
                log.write(Path(srv.log_path).read_text(errors="replace"))


def _collector(results, key: str) -> tuple[list[dict], Callable[[dict], None]]:
    """(rows, report): `report(row)` prints a result row as it is made (the run's log) and keeps it
    in `results[key]` (results.json), without its per-request latencies."""
    rows: list[dict] = []

    def report(row: dict) -> None:
        row = {k: v for k, v in row.items() if k != "latencies_ms"}
        print(json.dumps(row), flush=True)
        rows.append(row)
        results.update(**{key: rows})

    return rows, report


def _case(srv, w, backend, n_images, protocol, rate, seconds, clients, model, hey, engine_rows) -> dict:
    """One load case against a running server: the clients' view, the server's, the CPU's."""
    import httpx

    from benchmarks import cpu
    from benchmarks.loadgen import _delta_mean_batch, run_hey, run_pool
    from quicknet.build import gpu_probe

    concurrency = 256 if n_images == 1 else 128 if n_images == 8 else 64
    before = httpx.get(f"{srv.url}/metrics").text
    with gpu_probe.UtilizationSampler() as util:
        cpu_before = cpu.snapshot(srv.proc.pid)
        if protocol == "rest" and hey:
            row = run_hey(srv.url, n_images, concurrency, seconds, hey=hey, rate=rate)
        else:
            target = srv.url if protocol == "rest" else srv.grpc_target
            # 4 gRPC connections a front at least: a front process is reached by connection
            channels = GRPC_CHANNELS_PER_FRONT * w
            row = run_pool(protocol, target, n_images, concurrency, seconds, model, clients, channels, rate)
        row |= cpu.cores(cpu_before, cpu.snapshot(srv.proc.pid))
    after = httpx.get(f"{srv.url}/metrics").text
    row |= {"workers": w, "mean_batch": round(_delta_mean_batch(before, after), 1), "gpu_util": util.mean}
    row["backend"] = backend
    row["efficiency"] = _efficiency(row, engine_rows)
    row |= _server_side(before, after, row)
    row["limit"] = cpu.limit(row)
    if row["limit"].startswith("none at 90%") and (row.get("in_server_share") or 1) < 0.5:
        share = row["in_server_share"]
        row["limit"] = f"the clients: the server held {share:.0%} of the requests in flight (Little's law)"
    return row


def peer_sweep(root: Path, seconds: float, clients: int, deadline: float, on_row: Callable[[dict], None]) -> None:
    """Each of `GPU_PEERS` on this machine, serving the store's model with one image per request,
    driven by the same load generator as the service's one-image REST case; its log's tail on error.
    A peer starts only with `PEER_S` left before `deadline`; each row is reported as it is made."""
    import httpx

    from benchmarks import cpu
    from benchmarks.loadgen import run_hey, run_pool
    from quicknet import store
    from quicknet.build import gpu_probe
    from quicknet.testing import free_port

    hey = _hey()
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    bodies = {  # LitServe's: benchmarks.peer_servers.litserve_torch.json_body (that module needs litserve)
        "raw": (pixels.tobytes(), "application/octet-stream"),
        "json": (b'{"pixels": "%s"}' % base64.b64encode(pixels.tobytes()), "application/json"),
    }
    for name, module, kind in GPU_PEERS:
        if deadline - time.monotonic() < PEER_S:
            on_row({"server": name, "skipped": "time budget spent"})
            continue
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, str(root), str(port)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                started_by = min(deadline, time.monotonic() + 90)  # a peer that never answers costs 90 s at most
                while proc.poll() is None and time.monotonic() < started_by:
                    try:
                        if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.2)
                else:
                    raise RuntimeError("the peer did not start" if proc.poll() is None else "the peer exited")
                with gpu_probe.UtilizationSampler() as util:
                    before = cpu.snapshot(proc.pid)
                    if hey:
                        body, content_type = bodies[kind]
                        row = run_hey(url, 1, PEER_CONCURRENCY, seconds, hey=hey, body=body, content_type=content_type)
                    elif kind == "raw":
                        row = run_pool("rest", url, 1, PEER_CONCURRENCY, seconds, store.default_model(root), clients)
                    else:
                        raise RuntimeError("needs hey (its JSON body)")
                    used = cpu.cores(before, cpu.snapshot(proc.pid))
                row = {"server": name, **row, "machine_busy": used["machine_busy"], "gpu_util": util.mean}
            except Exception as e:  # recorded with the peer's own words; the run goes on
                log.seek(0)
                tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
                row = {"server": name, "error": f"{type(e).__name__}: {e}", "log": tail}
            finally:
                with contextlib.suppress(ProcessLookupError):  # a peer that exited took its group with it
                    os.killpg(proc.pid, 9)
                proc.wait()
        on_row(row)


def _server_side(before: str, after: str, row: dict) -> dict:
    """The server's own account of a case, from its histograms over the case: mean queue wait and
    engine time a batch, mean time a request spent inside the server, and by Little's law the
    requests inside it on average (served req/s x that time) as a share of the clients' concurrency.
    A small share means the requests in flight spent their time in the clients or between: the
    load generator, not the server, set the rate."""
    from quicknet.testing import metric

    def mean_ms(name: str) -> float | None:
        n = metric(after, f"{name}_count") - metric(before, f"{name}_count")
        return round(1e3 * (metric(after, f"{name}_sum") - metric(before, f"{name}_sum")) / n, 3) if n else None

    request_ms = mean_ms("quicknet_request_duration_seconds")
    inside = row["requests_s"] * request_ms / 1e3 if request_ms is not None else None
    requests = metric(after, "quicknet_request_duration_seconds_count") - metric(
        before, "quicknet_request_duration_seconds_count"
    )
    core_s = metric(after, "quicknet_engine_core_cpu_seconds_total") - metric(
        before, "quicknet_engine_core_cpu_seconds_total"
    )
    return {
        # the engine core's runners outside the engine call, a request (front processes only)
        "engine_core_us": round(1e6 * core_s / requests, 2) if requests and core_s else None,
        "server_queue_ms": mean_ms("quicknet_queue_wait_seconds"),
        "server_infer_ms": mean_ms("quicknet_inference_duration_seconds"),
        "server_request_ms": request_ms,
        # closed loop only: at a fixed rate the clients hold no fixed number of requests
        "in_server_share": round(inside / row["concurrency"], 3)
        if inside is not None and row.get("concurrency") and not row.get("rate_rps")
        else None,
    }


def _efficiency(row: dict, engine_rows: list[dict]) -> float | None:
    """served ÷ engine-alone img/s at the server's mean batch (interpolated; two lanes, as served)."""
    one = sorted((r["batch"], r["img_s"]) for r in engine_rows if r["lanes"] == 2)
    if not one or not row.get("mean_batch"):
        return None
    xs, ys = zip(*one, strict=True)
    engine = float(np.interp(np.log(row["mean_batch"]), np.log(xs), ys))
    return round(row["served_img_s"] / engine, 3)


# --- results -----------------------------------------------------------------------------------


def _table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c)) for c in columns) + " |")
    return lines


def _fused_markdown(fused: dict, eager: list[dict]) -> list[str]:
    lines = ["", "## The fused engine (issue 27)", ""]
    build = fused.get("build", {})
    if build:
        lines.append(
            f"- built in {build.get('compile_seconds')} s ({build.get('stages')}); check: {build.get('check')}"
        )
        lines.append(f"- gate: {build.get('gate')}")
    if "artifact" in fused:
        a = fused["artifact"]
        lines.append(
            f"- artifact: `{a['file']}`, {a['bytes'] / 2**20:.1f} MiB; "
            f"the service chose `{fused.get('service_choice')}`"
        )
    if "ceilings" in fused:
        lines.append(f"- ceilings: {fused['ceilings']}; bytes per image (estimate) {fused.get('bytes_per_image')}")
    if fused.get("rows"):
        said = "Roofline (img/s as served, host copies and CUDA graphs included; eager rows: the engine-alone step):"
        lines += ["", said, ""]
        cols = ["engine", "lanes", "batch", "img_s", "ms_per_batch", "tflops", "fraction_of_matmul", "gb_s"]
        lines += _table([*(r for r in eager if "gb_s" in r), *fused["rows"]], [*cols, "fraction_of_bandwidth"])
    profile = fused.get("profile") or {}
    for engine in ("torch", "fused"):
        if engine in profile:
            prof = profile[engine]
            lines += ["", f"Profile, {engine}, batch {profile['batch']}: {prof['kernels_per_call']} kernels a batch,"]
            lines[-1] += f" {prof['device_us_per_call']} us of kernel time; the top ones:"
            lines += ["", *_table(prof["top"], ["kernel", "calls", "us", "share"])]
    if "error" in fused:
        lines += ["", f"fused engine step: **{fused['error']}**"]
    return lines


def render_markdown(doc: dict) -> str:
    env = doc.get("environment", {})
    lines = [f"# gpu-serve results ({doc.get('started', '')})", ""]
    lines.append(f"- machine: {env.get('gpu') or env.get('cpu')}, driver {env.get('driver')}, {env.get('cpus')} CPUs")
    lines.append(f"- torch {env.get('torch')}, CUDA {env.get('cuda_runtime')}, Python {env.get('python')}")
    lines.append(f"- command: `{doc.get('command', '')}`; model: {doc.get('model')} ({doc.get('weights')})")
    handoff = doc.get("handoff")
    if isinstance(handoff, dict):
        lines.append(
            f"- the train run's hand-off: {handoff['arm']}, checkpoint SHA-256 {handoff['checkpoint_sha256'][:12]}"
            + (f"; not served: {handoff['error']}" if "error" in handoff else "")
        )
    elif handoff:
        lines.append(f"- the train run's hand-off: none taken ({handoff})")
    if "matmul" in doc:
        lines.append(f"- dense {doc['matmul']['dtype']} matmul ceiling: {doc['matmul']['tflops']} TFLOP/s")
    if doc.get("steps"):
        said = ", ".join(f"{s['step']} at {s['started_s']:g} s ({s.get('seconds', '?')} s)" for s in doc["steps"])
        lines.append(f"- steps: {said}; budget {doc.get('budget_s')} s")
    if "copy" in doc:
        lines.append("- copies: " + ", ".join(f"{k} {v}" for k, v in doc["copy"].items()))
    if doc.get("engine"):
        lines += ["", "## Engine alone", ""]
        lines += _table(
            doc["engine"],
            ["engine", "lanes", "batch", "img_s", "ms_per_batch", "gpu_util", "tflops", "fraction_of_ceiling"],
        )
    if doc.get("fused"):
        lines += _fused_markdown(doc["fused"], doc.get("engine", []))
    for variant in doc.get("variants", []):
        lines += ["", f"### {variant['variant']}", ""]
        if "error" in variant:
            lines.append(f"not measured: {variant['error']}")
        else:
            lines += _table(variant["rows"], ["engine", "batch", "img_s", "ms_per_batch", "tflops", "first_call_s"])
    if doc.get("service"):
        lines += ["", "## The service", ""]
        cols = ["workers", "backend", "protocol", "client", "images_per_request", "concurrency", "rate_rps"]
        cols += ["requests_s", "served_img_s"]
        lines += _table(doc["service"], [*cols, "p50_ms", "p99_ms", "rejected", "mean_batch", "gpu_util", "efficiency"])
        at_rate = [r for r in doc["service"] if r.get("rate_rps")]
        if at_rate:
            fraction = doc.get("rate_fraction", RATE_FRACTION)
            said = "; ".join(
                f"{r['protocol']} {r['requests_s']:.0f} req/s asked {r['rate_rps']:.0f}: p99 {r['p99_ms']:.1f} ms"
                for r in at_rate
            )
            lines += ["", f"At {fraction:.0%} of the best closed-loop rate, one image a request: {said}."]
        lines += ["", "The server's own account (its histograms over each case; Little's law for the share):", ""]
        server = ["server_queue_ms", "server_infer_ms", "server_request_ms", "in_server_share"]
        lines += _table(doc["service"], ["workers", "protocol", "images_per_request", "concurrency", *server])
        lines += [
            "",
            "Where the CPU went in each case (cores busy; `benchmarks/cpu.py`) and which part is saturated:",
            "",
        ]
        cpu_cols = ["engine_loop_cores", "engine_threads_cores", "engine_core_us", "fronts_cores"]
        cpu_cols.append("front_loop_max_cores")
        case = ["workers", "protocol", "images_per_request", "served_img_s"]
        lines += _table(doc["service"], [*case, *cpu_cols, "machine_busy", "gpu_util", "limit"])
    if doc.get("peers"):
        lines += ["", "## Peers on this machine: one image per request, the same load generator", ""]
        measured = [p for p in doc["peers"] if "requests_s" in p]
        cols = ["server", "client", "concurrency", "requests_s", "p50_ms", "p99_ms", "machine_busy", "gpu_util"]
        lines += _table(measured, cols) if measured else []
        lines += [f"- {p['server']}: {p.get('error') or p.get('skipped')}" for p in doc["peers"] if p not in measured]
        service = doc.get("service", [])
        ours = [r["requests_s"] for r in service if r.get("images_per_request") == 1 and "requests_s" in r]
        if ours and measured:
            ratio = max(ours) / max(p["requests_s"] for p in measured)
            lines += ["", f"Ours, best single-image case: {max(ours):.0f} req/s, {ratio:.2f}x the best peer."]
    if "error" in doc:
        lines += ["", f"**error:** {doc['error']}"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-results/serve")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for the whole job")
    parser.add_argument("--model", default="quicknet")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", help="trained weights to serve (a run folder's checkpoint.pt)")
    weights.add_argument(
        "--from-train",
        metavar="DIR",
        help="serve and build the fused engine from the best arm `quicknet gpu-train --handoff DIR` left here, "
        "when it is there (a warm machine); else the published model",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    parser.add_argument("--seconds", type=float, default=2.0, help="per engine measurement")
    parser.add_argument("--service-seconds", type=float, default=4.0, help="per service case")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[16, 4, 1, 8, 2],
        help="front processes to sweep, the first one first (its cases and the peers come before the fused engine)",
    )
    parser.add_argument("--clients", type=int, default=6, help="client processes for the Python load generator")
    parser.add_argument("--variant-limit-s", type=float, default=60.0, help="time limit per compiled variant")
    parser.add_argument("--engine-limit-s", type=float, default=130.0, help="time limit for the fused engine step")
    parser.add_argument(
        "--data",
        help="CIFAR-10 copy, or its test split alone (data-test/cifar10_test_jpeg.npz, as `make gpu-data` writes "
        "it): gate the fused engine on the 10k test split",
    )
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU, tiny")
    parser.add_argument("--variant", choices=["compile", "aoti"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out-json", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.variant:  # a child process measuring one compiled variant
        rows = compiled_variant(
            Path(args.store), args.variant, args.batches, args.seconds, forward_flops(_model_of(args.store))
        )
        Path(args.out_json).write_text(json.dumps(rows))
        return
    args.headline, args.more = HEADLINE_CASES, MORE_CASES
    if args.dry_run:
        args.model, args.batches, args.seconds, args.service_seconds = "quicknet-xs", [1, 8], 0.3, 0.7
        args.workers, args.clients, args.variant_limit_s, args.engine_limit_s = [2, 1], 2, 90.0, 150.0
        args.headline, args.more = ((1, "rest"), (1, "grpc")), ((8, "kserve-grpc"),)
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    run(args)


def _model_of(store_path: str) -> str:
    from quicknet import store

    return store.default_model(Path(store_path))


def run(args) -> None:
    from quicknet.build import gpu_probe

    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = gpu_probe.ResultsFile(out, "gpu-serve", render_markdown)
    results.update(command=gpu_probe.command_line(), budget_s=args.budget_s, dry_run=args.dry_run, model=args.model)
    try:
        results.update(environment=gpu_probe.environment())
        results.update(matmul=gpu_probe.matmul_tflops(0.2 if args.dry_run else 2.0), copy=gpu_probe.copy_bandwidth())
        root = Path(tempfile.mkdtemp(prefix="gpu-serve-store-"))
        results.update(**choose_weights(root, args))
        if args.from_train:
            from quicknet.build import compile_cache

            # what the train run's arms compiled, for the next draw's warm start (the 8 files there are taken)
            results.update(compile_cache=compile_cache.bundle(Path(args.from_train) / compile_cache.FOLDER, out))
        steps: list[dict] = []

        @contextlib.contextmanager
        def step(name: str):
            """Each step's start and length in the results: where the budget went, in order."""
            row = {"step": name, "started_s": round(time.monotonic() - t0, 1)}
            steps.append(row)
            results.update(steps=steps)
            try:
                yield
            finally:
                row["seconds"] = round(time.monotonic() - t0 - row["started_s"], 1)
                results.update(steps=steps)

        flops = forward_flops(args.model)
        with step("engine alone"):
            engine = engine_alone(root, args.batches, args.seconds, results.doc["matmul"]["tflops"], flops)
        results.update(engine=engine)
        service, on_row = _collector(results, "service")
        _, on_peer = _collector(results, "peers")

        # In order of what the run is for, each step stopping in time to leave the next its share
        # (the first run, in sweep order, reached 2 of its 5 front counts): the
        # first front count's headline cases (16 by default: how far the engine core now goes),
        # the peers beside it (the ratio), the fused engine (the artifact that comes back); then,
        # with the time left, the other front counts, the fused engine served, the cases at a
        # steady rate and the rest, torch.compile and AOTInductor.
        end = deadline - 15
        fused_share = 0.0 if args.dry_run else FUSED_MIN_S
        peers_share = 0.0 if args.dry_run else PEER_S * len(GPU_PEERS)
        first, others = args.workers[:1], args.workers[1:]
        sweep = (args.service_seconds, args.clients, engine)
        with step(f"service, {first[0]} front processes"):
            service_sweep(root, out, first, args.headline, *sweep, end - fused_share - peers_share, on_row=on_row)
        with step("peers"):
            peer_sweep(root, args.service_seconds, args.clients, end - fused_share, on_row=on_peer)
        limit = min(args.engine_limit_s, end - time.monotonic())
        with step("fused engine"):
            if limit >= 40:
                fused = fused_engine_in_child(root, out, args, results.doc["matmul"]["tflops"], limit)
            else:
                fused = {"error": f"time budget spent ({limit:.0f} s left)"}
        if fused.get("bytes_per_image"):  # the eager engine's roofline from its own rows above
            from benchmarks.gpu_engine import roofline

            ceiling_gb_s = fused.get("ceilings", {}).get("gb_s") or 0.0
            # the fused rows' own counts, so that both engines' rows rest on the same estimate
            per_image = (fused.get("flops_per_image", flops), fused["bytes_per_image"]["torch"])
            for row in engine:
                row |= roofline(row["img_s"], *per_image, results.doc["matmul"]["tflops"], ceiling_gb_s)
            results.update(engine=engine)
        results.update(fused=fused)
        with step("service, the other front counts"):
            service_sweep(root, out, others, args.headline, *sweep, end, on_row=on_row)
        single = [r for r in service if r.get("images_per_request") == 1 and "served_img_s" in r]
        best = max(single, key=lambda r: r["served_img_s"])["workers"] if single else args.workers[0]
        results.update(best_workers=best)
        if "artifact" in fused and not args.dry_run:  # the server choosing its engine: fused where it fits
            with step("service, the fused engine"):
                service_sweep(root, out, [best], FUSED_CASES, *sweep, end, on_row=on_row, backend="auto")
        elif args.dry_run:  # on a CPU auto picks ONNX Runtime, and the interpreter is too slow to serve
            results.update(fused_service_error="not in a dry run: on a CPU auto serves with ONNX Runtime")
        if single:  # single images at 80% of the best closed-loop rate (a goal), then the other cases
            at = _rates_at(service, best, RATE_FRACTION)
            results.update(rate_fraction=RATE_FRACTION)
            with step("service, a steady rate and the other cases"):
                service_sweep(root, out, [best], (*at, *args.more), *sweep, end, on_row=on_row)
        variants = []
        for variant in ("compile", "aoti"):
            limit = min(args.variant_limit_s, deadline - time.monotonic() - 5)
            if limit < 20:
                variants.append({"variant": variant, "error": "time budget spent"})
                continue
            batches = args.batches[-2:] if not args.dry_run else args.batches[-1:]
            with step(f"torch {variant}"):
                variants.append(run_variant_in_child(root, variant, batches, args.seconds, limit))
            results.update(variants=variants)
        results.update(variants=variants, service=service, job_seconds=round(time.monotonic() - t0, 1))
    except Exception as e:
        results.update(error=f"{type(e).__name__}: {e}")
        raise
    print(f"results in {out} after {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
