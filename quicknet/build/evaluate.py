"""Top-1, per-class accuracy and a confusion matrix for every artifact of a build."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quicknet.build.data import LABELS, Split
from quicknet.build.ortrun import INPUT_NAME, onnx_logits
from quicknet.errors import BuildError
from quicknet.fsutil import atomic_write


@dataclass(frozen=True)
class Report:
    artifact: str
    images: int
    top1: float
    per_class: dict[str, float]
    confusion: list[list[int]]

    def summary(self) -> dict:
        return {"images": self.images, "top1": round(self.top1, 5), "per_class": self.per_class}


def score(artifact: str, logits: np.ndarray, labels: np.ndarray) -> Report:
    pred = logits.argmax(1)
    confusion = np.zeros((len(LABELS), len(LABELS)), dtype=np.int64)
    np.add.at(confusion, (labels.astype(np.int64), pred), 1)
    per_class = {LABELS[c]: round(float(confusion[c, c] / max(confusion[c].sum(), 1)), 4) for c in range(len(LABELS))}
    return Report(artifact, len(labels), float((pred == labels).mean()), per_class, confusion.tolist())


def evaluate_checkpoint(checkpoint: Path, split: Split) -> tuple[Report, Report]:
    """The checkpoint scored plain and with flip TTA in two passes over the split, not three: the
    TTA average reuses the plain pass's logits (a 10k-image pass is ~10 s of a 2-core build)."""
    from quicknet.build.export import reference_logits
    from quicknet.build.train import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    plain = reference_logits(model, split.images)
    flipped = reference_logits(model, np.ascontiguousarray(split.images[:, :, ::-1]))
    return score("checkpoint", plain, split.labels), score("checkpoint+flip-tta", (plain + flipped) / 2, split.labels)


def tensorrt_logits(plan: Path, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run a TensorRT plan with torch-owned CUDA buffers (the build extra has torch)."""
    import torch

    from quicknet.build.compile import import_tensorrt

    trt = import_tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    context = engine.create_execution_context()
    output_name = next(
        engine.get_tensor_name(i)
        for i in range(engine.num_io_tensors)
        if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT
    )
    max_batch = engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0]
    stream = torch.cuda.Stream()
    out = []
    for i in range(0, len(images), min(batch_size, max_batch)):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + min(batch_size, max_batch)])).cuda()
        y = torch.empty((len(x), 10), dtype=torch.float32, device="cuda")
        context.set_input_shape(INPUT_NAME, tuple(x.shape))
        context.set_tensor_address(INPUT_NAME, x.data_ptr())
        context.set_tensor_address(output_name, y.data_ptr())
        stream.wait_stream(torch.cuda.current_stream())
        if not context.execute_async_v3(stream.cuda_stream):
            raise BuildError("TensorRT could not run the plan on this batch (execute_async_v3 returned False)")
        stream.synchronize()
        out.append(y.cpu().numpy())
    return np.concatenate(out)


def evaluate_artifact(kind: str, path: Path, split: Split, *, threads: int = 2) -> Report:
    """A serving engine's file (ONNX, INT8 ONNX, a TensorRT plan) on `split`; the checkpoint is
    `evaluate_checkpoint`'s."""
    if kind == "tensorrt":
        logits = tensorrt_logits(path, split.images)
    else:
        logits = onnx_logits(path, split.images, threads=threads)
    return score(kind, logits, split.labels)


def plot_confusion(report: Report, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(report.confusion)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(LABELS)), LABELS, rotation=45, ha="right")
    ax.set_yticks(range(len(LABELS)), LABELS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(LABELS)):
        for j in range(len(LABELS)):
            ax.text(
                j,
                i,
                cm[i, j],
                ha="center",
                va="center",
                fontsize=7,
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    ax.set_title(f"{title}\ntop-1 {report.top1:.2%} on {report.images} images")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
