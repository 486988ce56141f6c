from __future__ import annotations

import subprocess
import sys

from tests.serving import REPO


def quicknet(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quicknet_cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )


def test_info_prints_params_and_macs():
    out = quicknet("info")
    assert out.returncode == 0
    assert "quicknet " in out.stdout and "3.480 M params" in out.stdout and "quicknet-xs" in out.stdout


def test_missing_data_is_one_line_exit_2(tmp_path):
    out = quicknet("eval", "--data", str(tmp_path / "none.npz"), "--run-dir", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.startswith("error: dataset not found") and out.stderr.count("\n") == 1


def test_stage_without_input_is_one_line(tmp_path):
    out = quicknet("export", "--run-dir", str(tmp_path))
    assert out.returncode == 2
    assert "run `quicknet train`" in out.stderr and "Traceback" not in out.stderr


def test_unknown_store_model(tmp_path):
    out = quicknet("eval", "--store-model", "nope", "--store", str(tmp_path))
    assert out.returncode == 2 and "model 'nope' not found" in out.stderr


def test_classify_against_no_server_is_clear(tmp_path):
    img = tmp_path / "x.png"
    img.write_bytes(b"x")
    out = quicknet("classify", str(img), "--url", "http://127.0.0.1:9")
    assert out.returncode == 2 and out.stderr.startswith("error: cannot reach")


def test_busy_port_is_one_line():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = quicknet("serve", "--http-host", "127.0.0.1", "--http-port", str(port), "--grpc-port", "0")
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port} for REST" in out.stderr and "Traceback" not in out.stderr


def test_unknown_variant_is_one_line(tmp_path):
    out = quicknet("train", "--model", "resnet", "--run-dir", str(tmp_path))
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: unknown model 'resnet'; choose one of quicknet, quicknet-s, quicknet-xs"
    )


def test_eval_of_the_shipped_model_without_torch_artifacts(tmp_path):
    out = quicknet("eval", "--store-model", "quicknet-xs", "--limit", "500")
    assert out.returncode == 0, out.stderr
    import json

    result = json.loads(out.stdout)
    assert set(result["artifacts"]) == {"onnx", "onnx-optimized", "onnx-int8"}
    for scores in result["artifacts"].values():
        assert abs(scores["top1"] - scores["published_top1"]) < 0.05
