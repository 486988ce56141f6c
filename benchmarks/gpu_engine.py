"""GPU step for the fused engine (issue 27): build it for this GPU, measure it against the eager
engine, profile both, and keep the engine file. Run by `benchmarks.gpu_serve` in a child process
under a hard time limit (a compile that runs long costs its limit, not the lease), or alone:

    python -m benchmarks.gpu_engine --store STORE --out OUT [--data data-test/cifar10_test_jpeg.npz]

Within `--limit-s`, writing `engine.json` (rows so far) after every step:

1. build: `quicknet.build.gpu_engine.build` on the store's default model (compile every candidate tile
   configuration in parallel, time them per layer, check against the folded model in fp32, and
   with `--data` score it on the 10k test split), written as `model.fused.<gpu>.sm<cc>.zip`;
2. publish it into the store beside the weights, so the service and this step load it the way a
   server does (`choose()` must pick `fused` here; the backend is the service's);
3. img/s at each batch (host copies and CUDA graphs included, as served) for the eager torch
   engine and the fused one, one lane and two;
4. torch.profiler on one batch of each (without CUDA graphs, so each kernel is seen): kernels per
   batch and the top kernels by time;
5. the roofline rows: bytes per image by estimate (activations read and written, fp16; weights
   stay in L2), FLOPs per image, achieved GB/s and TFLOP/s, against the measured ceilings.

`--dry-run` does every step on the CPU with Triton's interpreter at batch 1 and 2.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ENGINE_JSON = "engine.json"


def estimate_bytes(layers: list[dict], fused: bool) -> int:
    """Activation bytes read and written per image (fp16, 1-byte pixels in). Eager: every op reads
    its input and writes its output (normalize as 3 elementwise ops, conv, bias+PReLU as one op, each
    pool, each shortcut's add); fused: each kernel reads its input once (twice with a shortcut) and
    writes its (pooled) output once."""
    total = 0
    for layer in layers:
        if layer["kind"] == "stem":
            pixels, out = layer["h"] * layer["w"], layer["cout"] * layer["h"] * layer["w"] * 2
            if fused:
                total += pixels * 3 + out
            else:
                total += pixels * 3 * (1 + 2 + 2 * 2 + 2 * 2) + out + 2 * out  # cast, mul, add (+ permute), conv, PReLU
        elif layer["kind"] == "separable":
            hw = layer["h"] * layer["w"]
            x, y = layer["cin"] * hw * 2, layer["cout"] * hw * 2
            pooled = y // 4 if layer["pool"] else layer["cout"] * 4 if layer["mean"] else y
            shortcut = layer.get("residual", False)  # quicknet-res's `x + block(x)`
            if fused:  # the shortcut reads the input again in the epilogue (mostly cache hits; counted)
                total += x + pooled + (x if shortcut else 0)
            else:  # the shortcut is one more op: two reads, one write
                total += 2 * x + x + y + 2 * y + (y + y // 4 if layer["pool"] else 0) + (y if layer["mean"] else 0)
                total += 3 * y if shortcut else 0
    return total


def _profile(fn, x, top: int = 8) -> dict:
    """Kernels per call and the top kernels by GPU time, from one profiled call after a warm one."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = x.is_cuda
    with torch.inference_mode():
        fn(x)
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            fn(x)
            if cuda:
                torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:
        kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        time_of = lambda e: e.self_device_time_total  # noqa: E731
    else:
        kernels = [e for e in events if e.key.startswith(("aten::", "stem_kernel", "separable_kernel"))]
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    kernels.sort(key=time_of, reverse=True)
    total = sum(time_of(e) for e in kernels)
    return {
        "kernels_per_call": sum(e.count for e in kernels),
        "device_us_per_call": round(total, 1),
        "top": [
            {
                "kernel": e.key[:90],
                "calls": e.count,
                "us": round(time_of(e), 1),
                "share": round(time_of(e) / max(total, 1e-9), 3),
            }
            for e in kernels[:top]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a model store whose default model is the one to build for")
    parser.add_argument("--out", required=True, help="folder for engine.json and the engine file")
    parser.add_argument("--data", help="CIFAR-10 copy: gate the engine on its 10k test split")
    parser.add_argument("--limit-s", type=float, default=150.0, help="this whole step")
    parser.add_argument("--build-limit-s", type=float, default=75.0, help="the build (compile, tune, check)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256, 1024])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--ceiling-tflops", type=float, default=0.0)
    parser.add_argument("--ceiling-gb-s", type=float, default=0.0)
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=["torch", "fused"],
        default=["torch", "fused"],
        help="the engines to time (gpu_serve times the eager one itself, and asks for the fused one alone)",
    )
    parser.add_argument("--dry-run", action="store_true", help="the CPU and Triton's interpreter, batch 1 and 2")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels are decorated at import
        args.batches, args.seconds = [1, 2], 0.05
    run(args)


def run(args) -> None:
    import torch

    from benchmarks.gpu_serve import _drive
    from quicknet import store
    from quicknet.build import gpu_engine
    from quicknet.fsutil import write_text_atomic
    from quicknet.fused import engine as fused_engine
    from quicknet.serve.backends import choose
    from quicknet.serve.backends.fused import FusedBackend
    from quicknet.serve.backends.pytorch import TorchBackend, build_folded, load_spec
    from quicknet.serve.config import Settings

    t0 = time.monotonic()
    deadline = t0 + args.limit_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict = {"step": "fused engine", "limit_s": args.limit_s}

    def save(**fields) -> None:
        doc.update(fields, seconds=round(time.monotonic() - t0, 1))
        write_text_atomic(out / ENGINE_JSON, json.dumps(doc, indent=2, default=str) + "\n")

    root = Path(args.store)
    name = store.default_model(root)
    mv = store.get_version(root, name)
    source = gpu_engine.engine_source(mv)
    spec = load_spec(str(mv.file(source["file"])))
    test_split = None
    if args.data:  # first: its JPEG decoders are forked processes, and a fork after CUDA starts is unsafe
        from quicknet.build import data

        test = data.load(Path(args.data), test_only=True).test  # the whole copy, or its test split alone
        keep = 8 if args.dry_run else len(test.labels)  # Triton's interpreter: the gate's path, not its score
        test_split = (test.images[:keep], test.labels[:keep])
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    reference = build_folded(spec).to(device).eval()  # fp32: what the gate compares with
    save(source=source)

    # 1. build
    dry = {"tune_batches": {"small": 1, "large": 2}, "check_images": 2} if args.dry_run else {}
    if args.dry_run and test_split is None:  # the gate's code path on a few labelled images
        rng = np.random.default_rng(1)
        test_split = (rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 2))
    limit = min(args.build_limit_s, deadline - time.monotonic() - 30)
    path, built = gpu_engine.build(
        spec, out, source=source, reference=reference, test_split=test_split, time_limit_s=limit, **dry
    )
    kept = ("compile_seconds", "stages", "check", "gate", "configs", "built_for", "kernels", "kernels_dropped")
    save(build={k: built[k] for k in kept if k in built})
    save(artifact={"file": path.name, "bytes": path.stat().st_size, "sha256": store.sha256_file(path)})

    # 2. publish beside the weights; the service's own choice must be the fused engine here
    files = [mv.file(f) for f in mv.metadata["files"]] + [path]
    meta = {k: v for k, v in mv.metadata.items() if k not in ("name", "version", "files")}
    meta["artifacts"] = {**mv.metadata["artifacts"], gpu_engine.KIND: path.name}
    engine_mv = store.publish(root, name, files, meta)
    settings = Settings(backend="auto", max_batch_size=max(args.batches), instances=1, threads=2)
    save(service_choice=choose(engine_mv, settings))

    # 3. img/s, eager vs fused, as served
    layers = built["layers"]
    flops = estimate_flops(layers)
    bytes_per_image = {"torch": estimate_bytes(layers, fused=False), "fused": estimate_bytes(layers, fused=True)}
    rows: list[dict] = []
    ceiling_gb_s = args.ceiling_gb_s or device_copy_gb_s() or 0.0
    ceilings = {"tflops": args.ceiling_tflops, "gb_s": ceiling_gb_s}
    save(ceilings=ceilings, bytes_per_image=bytes_per_image, flops_per_image=flops)
    for engine, cls in (("torch", TorchBackend), ("fused", FusedBackend)):
        if engine not in args.engines:
            continue
        for lanes in (1,) if args.dry_run else (1, 2):
            if time.monotonic() > deadline - 10:
                break
            backend = cls.load(engine_mv, settings.model_copy(update={"instances": lanes}))
            backend.warmup()
            for batch in args.batches:
                img_s, ms = _drive(backend.infer, batch, args.seconds, threads=lanes)
                row = {
                    "engine": engine,
                    "lanes": lanes,
                    "batch": batch,
                    "img_s": round(img_s, 1),
                    "ms_per_batch": round(ms, 3),
                }
                row |= roofline(img_s, flops, bytes_per_image[engine], args.ceiling_tflops, ceiling_gb_s)
                rows.append(row)
                print(json.dumps(row), flush=True)
                save(rows=rows)
            del backend

    # 4. per-kernel profile at the largest batch
    batch = max(args.batches)
    x = torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8, device=device)
    eager = TorchBackend.load(engine_mv, settings)
    plan = fused_engine.read_artifact(path, None)
    fused_net = fused_engine.FusedNet(plan["layers"], fused_engine.weights_for(plan, spec), plan["configs"], device)
    profiles = {"batch": batch, "torch": _profile(eager._forward, x), "fused": _profile(fused_net, x)}
    save(profile=profiles)
    print(f"gpu-engine step done in {time.monotonic() - t0:.0f} s", flush=True)


def estimate_flops(layers: list[dict]) -> float:
    """2 x multiply-adds per image of the folded graph (the fused engine's depthwise recomputation
    per column tile, a few percent, is not counted: this is the model's work, the same for both)."""
    macs = 0
    for layer in layers:
        if layer["kind"] == "stem":
            macs += 27 * layer["cout"] * layer["h"] * layer["w"]
        elif layer["kind"] == "separable":
            macs += (9 * layer["cin"] + layer["cin"] * layer["cout"]) * layer["h"] * layer["w"]
        else:
            macs += layer["in"] * layer["out"]
    return 2.0 * macs


def device_copy_gb_s(seconds: float = 0.5) -> float | None:
    """Device-to-device copy GB/s (bytes read + written): the memory ceiling the GB/s column is read against."""
    import torch

    if not torch.cuda.is_available():
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        dst.copy_(src)
        count += 1
    torch.cuda.synchronize()
    return round(2 * src.numel() * count / (time.perf_counter() - start) / 1e9, 1)


def roofline(img_s: float, flops: float, bytes_per_image: int, ceiling_tflops: float, ceiling_gb_s: float) -> dict:
    tflops, gb_s = img_s * flops / 1e12, img_s * bytes_per_image / 1e9
    row = {"tflops": round(tflops, 2), "gb_s": round(gb_s, 1)}
    if ceiling_tflops:
        row["fraction_of_matmul"] = round(tflops / ceiling_tflops, 3)
    if ceiling_gb_s:
        row["fraction_of_bandwidth"] = round(gb_s / ceiling_gb_s, 3)
    return row


if __name__ == "__main__":
    main()
