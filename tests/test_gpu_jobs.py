"""The GPU jobs' dry runs: the same code paths on the CPU, so a GPU lease never runs a line first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from quicknet.fold import fold
from quicknet.train import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _results_folder_fits_the_device_limits(out: Path) -> list[Path]:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, [str(p.relative_to(out)) for p in files]
    assert all(p.stat().st_size <= 16 << 20 for p in files)
    assert all(len(p.relative_to(out).parts) <= 3 for p in files), "no deeper than two folders"
    return files


def test_gpu_train_dry_run_leaves_results_and_a_run_folder_the_build_continues(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "quicknet_cli", "gpu-train", "--dry-run", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _results_folder_fits_the_device_limits(out)
    doc = json.loads((out / "results.json").read_text())
    assert [e["epoch"] for e in doc["epochs"]] == [1, 2]
    assert {"gpu", "torch", "cuda_runtime", "driver", "python"} <= set(doc["environment"]) | {"driver"}
    assert doc["matmul"]["tflops"] > 0
    final = doc["final"]
    assert set(final["time_to"]) == {"94.0%", "95.0%", "95.7%", "96.5%"}
    assert 0 <= final["top1"] <= 1 and final["top1_tta"] is not None and final["epochs"] == 2
    assert "| epoch |" in (out / "results.md").read_text()
    build = json.loads((out / "run" / "build.json").read_text())
    assert build["stages"]["train"]["epochs_run"] == 2 and build["stages"]["train"]["torch"]
    model, ckpt = load_checkpoint(out / "run" / "checkpoint.pt")
    assert ckpt["arch"]["name"] == "quicknet" and fold(model) is not None
    assert (out / "run" / ckpt["files"]["optimizer"]).is_file(), "the optimizer state travels back, to resume"
