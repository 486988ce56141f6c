"""ONNX Runtime images/s per batch size for each variant, FP32 vs INT8, and training images/s.

    python -m benchmarks.engine [--threads 2] [--seconds 2] [--batches 1 8 64] [--no-train]

FP32 twice: the published `model.onnx` as it is, and the graph the service serves from it (its
PReLUs rewritten at load for ONNX Runtime's blocked kernels, quicknet/ort_graph.py).

The published model where the store has one (trained weights are not speed-neutral: see
benchmarks.common.serving_store), else untrained weights with INT8 calibrated on 256 training images.
Prints a table and writes benchmarks/results/engine.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import images_per_second, save, serving_store, table

VARIANTS = ["quicknet", "quicknet-s", "quicknet-xs"]


def ort_session(path: Path, threads: int):
    """The service's own session on `path` (its ONNX Runtime settings) on the CPU."""
    import onnxruntime as ort

    from quicknet.serve.backends.onnxruntime import open_session

    return open_session(ort, str(path), threads)


def served_fp32_session(path: Path, threads: int):
    """The FP32 session the service serves from `path`: its PReLUs rewritten at load."""
    import onnxruntime as ort

    from quicknet.serve.backends.onnxruntime import open_fp32

    return open_fp32(ort, str(path), threads)[0]


def train_images_per_second(name: str, threads: int, steps: int = 3, batch: int = 128) -> float:
    import torch

    from quicknet.build.model import build_model

    torch.set_num_threads(threads)
    model = build_model(name).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--no-train", action="store_true")
    args = parser.parse_args()

    from quicknet import store
    from quicknet.build import data

    calibration = data.load().train.sample(256, seed=1).images
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = serving_store(Path(tmp), args.variants, calibration)
        for name in args.variants:
            mv = store.get_version(root, name)
            published = ort_session(mv.file("model.onnx"), args.threads)
            fp32 = served_fp32_session(mv.file("model.onnx"), args.threads)
            int8 = ort_session(mv.file("model.int8.onnx"), args.threads)
            for b in args.batches:
                p = images_per_second(lambda x, s=published: s.run(None, {"images": x}), b, args.seconds)
                f = images_per_second(lambda x, s=fp32: s.run(None, {"images": x}), b, args.seconds)
                q = images_per_second(lambda x, s=int8: s.run(None, {"images": x}), b, args.seconds)
                rows.append(
                    {"model": name, "batch": b, "fp32_published_img_s": p, "fp32_img_s": f}
                    | {"rewrite_speedup": f / p, "int8_img_s": q, "int8_speedup": q / f}
                )
    train_rows = []
    if not args.no_train:
        for name in args.variants:
            train_rows.append({"model": name, "train_img_s": train_images_per_second(name, args.threads)})
    print(f"ONNX Runtime on CPU, {args.threads} threads")
    print("fp32: the graph the service serves (model.onnx rewritten at load: quicknet/ort_graph.py)")
    print(
        table(
            rows,
            ["model", "batch", "fp32_published_img_s", "fp32_img_s", "rewrite_speedup", "int8_img_s", "int8_speedup"],
        )
    )
    if train_rows:
        print("\nPyTorch training (eager, batch 128, fwd+bwd+SGD step)")
        print(table(train_rows, ["model", "train_img_s"]))
    path = save("engine", {"threads": args.threads, "onnxruntime": rows, "training": train_rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
