"""The build's long loops show progress on a terminal (or when QUICKNET_PROGRESS=1), and stay
quiet in logs and CI."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from quicknet.build import data, progress
from quicknet.build.ortrun import onnx_logits
from quicknet.testing import STORE


def _jpegs(n: int) -> tuple[np.ndarray, np.ndarray]:
    blobs = []
    for i in range(n):
        out = io.BytesIO()
        Image.new("RGB", (32, 32), (i % 256, 0, 0)).save(out, "JPEG")
        blobs.append(out.getvalue())
    offsets = np.cumsum([0, *map(len, blobs)])
    return np.frombuffer(b"".join(blobs), np.uint8), offsets


def test_progress_follows_the_setting_and_the_terminal(monkeypatch):
    monkeypatch.setenv("QUICKNET_PROGRESS", "1")
    assert progress.wanted()
    monkeypatch.setenv("QUICKNET_PROGRESS", "0")
    assert not progress.wanted()
    monkeypatch.delenv("QUICKNET_PROGRESS")
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal: quiet
    assert not progress.wanted()


@pytest.mark.parametrize("jobs", [1, 2])
def test_jpeg_decoding_shows_progress(monkeypatch, capfd, jobs):
    monkeypatch.setenv("QUICKNET_PROGRESS", "1")
    blob, offsets = _jpegs(40)
    images = data._decode_jpegs(blob, offsets, jobs=jobs)
    assert images.shape == (40, 32, 32, 3) and images[7, 0, 0, 0] in range(5, 10)
    err = capfd.readouterr().err
    assert "decoding JPEGs" in err and ("/40 " in err if jobs == 1 else "/2 " in err), err


def test_onnx_evaluation_shows_progress_and_is_quiet_when_asked(monkeypatch, capfd):
    onnx = next((STORE / "quicknet-xs").glob("*/model.onnx"))
    images = np.zeros((1000, 32, 32, 3), np.uint8)
    monkeypatch.setenv("QUICKNET_PROGRESS", "1")
    assert onnx_logits(onnx, images, batch_size=500).shape == (1000, 10)
    assert "model.onnx" in (err := capfd.readouterr().err) and "/2 " in err, err
    monkeypatch.setenv("QUICKNET_PROGRESS", "0")
    onnx_logits(onnx, images)
    assert capfd.readouterr().err == ""
