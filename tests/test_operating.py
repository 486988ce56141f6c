"""Operating a running server (issue 25, "Operating it"): the `quicknet models|stats|load|unload|health`
commands over REST and gRPC with keys, the access log's client, model, version, image count and
reasons, `serve --help`'s defaults, `build --help`, `quicknet info` without torch, `quicknet probe`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import httpx
import pytest

import quicknet.cli as quicknet_cli
from quicknet.testing import FAST_MODEL, FAST_VERSION, REPO, STORE, free_port, publish_shipped, start_server

USER = "user-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
SECOND = "second"
CAT = (REPO / "examples" / "cat.png").read_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Explicit model control, API keys and an admin key set; `second` in the store (with its own
    config.json) but not loaded."""
    import shutil

    tmp = tmp_path_factory.mktemp("operating")
    root = tmp / "store"
    shutil.copytree(STORE, root)
    publish_shipped(root, SECOND)
    (root / SECOND / "config.json").write_text(json.dumps({"max_batch_size": 8, "max_queue_delay_ms": 1.5}))
    (tmp / "keys").write_text(USER + "\n")
    (tmp / "admin-keys").write_text(ADMIN + "\n")
    srv = start_server(
        tmp,
        store=root,
        model_control_mode="explicit",
        api_keys_file=tmp / "keys",
        admin_api_keys_file=tmp / "admin-keys",
        warmup=False,
        precision="fp32",
    )
    yield srv
    assert srv.stop() == 0, srv.log()


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`quicknet ARGV` in this process (the client extra only): (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = quicknet_cli.main(list(argv))
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _urls(server) -> dict[str, str]:
    return {"rest": server.url, "grpc": f"grpc://{server.grpc_target}"}


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_models_lists_versions_state_engine_and_the_config_in_force(server, capsys, protocol):
    url = _urls(server)[protocol]
    code, out, err = cli(capsys, "models", "--url", url, "--api-key", USER)
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.split()[:4] == ["MODEL", "VERSION", "STATE", "ENGINE"]
    row = next(line for line in lines if line.startswith(FAST_MODEL))
    assert re.search(rf"\b{FAST_VERSION}\s+READY\s+onnxruntime\b", row), row
    assert re.search(rf"^{SECOND}\s+1\s+UNAVAILABLE\b", "\n".join(lines), re.M), out

    code, out, err = cli(capsys, "models", "--url", url, "--api-key", USER, "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    xs = rows[FAST_MODEL]
    assert xs["state"] == "READY" and xs["config"]["max_batch_size"] == 16  # its shipped config.json
    assert xs["config"]["dynamic_batching"]["max_queue_delay_microseconds"] in (0, "0")
    if protocol == "rest":  # /v1/models: the default mark, precision and published accuracy
        assert xs["default"] is True and "fp32" in xs["engine"]
        assert 0.5 < xs["accuracy"] < 1 and xs["accuracy_of"] == "onnx"


def test_load_needs_an_admin_key_and_the_store_config_is_in_force(server, capsys):
    rest, grpc_url = server.url, f"grpc://{server.grpc_target}"
    for url in (rest, grpc_url):
        code, _, err = cli(capsys, "load", SECOND, "--url", url, "--api-key", USER)
        assert code == 2, err
        assert "admin-api-keys-file" in err and err.count("\n") == 1, err
    code, out, err = cli(capsys, "load", SECOND, "--url", rest, "--api-key", ADMIN)
    assert (code, out) == (0, f"loaded {SECOND}: v1 READY\n"), err
    try:
        code, out, err = cli(capsys, "models", "--url", grpc_url, "--api-key", USER, "--json")
        second = {r["name"]: r for r in json.loads(out)}[SECOND]
        assert second["state"] == "READY"
        # the store's config.json for `second`, over the flags (max batch 64, delay 0)
        assert second["config"]["max_batch_size"] == 8
        assert int(second["config"]["dynamic_batching"]["max_queue_delay_microseconds"]) == 1500
        code, out, _ = cli(capsys, "models", "--url", rest, "--api-key", USER)
        row = next(line for line in out.splitlines() if line.startswith(SECOND))
        assert re.search(r"READY\s+onnxruntime.*?\s8\s+1\.5\s", row), row
    finally:
        code, out, err = cli(capsys, "unload", SECOND, "--url", grpc_url, "--api-key", ADMIN)
    assert code == 0 and re.fullmatch(rf"unloaded {SECOND}: v1 (UNLOADING|UNAVAILABLE)\n", out), err
    deadline = time.monotonic() + 30  # retired once its last request is answered: the module's next test sees it so
    while time.monotonic() < deadline:
        _, out, _ = cli(capsys, "models", "--url", grpc_url, "--api-key", USER, "--json")
        if {r["name"]: r for r in json.loads(out)}[SECOND]["state"] == "UNAVAILABLE":
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"{SECOND} still not UNAVAILABLE 30 s after its unload")


def test_a_path_for_a_model_name_gets_the_servers_own_refusal_on_both_protocols(server, capsys):
    """`../x` cannot reach a REST route as one path segment (the URL resolves it, or the server
    decodes its `%2F`): the client refuses it as the server does over gRPC, in the same words."""
    answers = []
    for url in (server.url, f"grpc://{server.grpc_target}"):
        code, out, err = cli(capsys, "load", "../x", "--url", url, "--api-key", ADMIN)
        assert (code, out) == (2, "") and err.count("\n") == 1, err
        answers.append(err.split(" is not a model name: ", 1))
    rest, grpc = answers
    assert rest[0] == "error: '../x'" and grpc[0].endswith("'../x'") and rest[1] == grpc[1], answers


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_stats_show_images_batches_and_the_mean_batch(server, capsys, protocol):
    files = [("images", (f"cat{i}.png", CAT, "image/png")) for i in range(3)]
    headers = {"Authorization": f"Bearer {USER}"}
    assert httpx.post(f"{server.url}/classify", files=files, headers=headers, timeout=30).status_code == 200
    code, out, err = cli(capsys, "stats", "--url", _urls(server)[protocol], "--api-key", USER, "--json")
    assert code == 0, err
    (row,) = [r for r in json.loads(out) if r["name"] == FAST_MODEL]
    assert row["images"] >= 3 and row["requests"] >= 1 and row["batches"] >= 1
    assert row["mean_batch"] == pytest.approx(row["images"] / row["batches"])
    code, out, err = cli(capsys, "stats", "--url", _urls(server)[protocol], "--api-key", USER)
    assert code == 0 and "MEAN BATCH" in out.splitlines()[0], err


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_health_and_errors_are_one_line(server, capsys, protocol):
    url = _urls(server)[protocol]
    assert cli(capsys, "health", "--url", url, "--api-key", USER)[:2] == (0, "ready\n")
    assert json.loads(cli(capsys, "health", "--url", url, "--json")[1]) == {"live": True, "ready": True}
    code, _, err = cli(capsys, "models", "--url", url)  # keys are in force; none sent
    assert code == 2 and "--api-key" in err and err.count("\n") == 1, err
    closed = f"{url.split('://')[0]}://127.0.0.1:{free_port()}"
    code, out, err = cli(capsys, "health", "--url", closed)
    assert (code, out) == (2, "") and err.startswith("error: ") and "cannot reach" in err and err.count("\n") == 1, err


def test_the_access_log_names_client_model_version_images_and_why(server):
    headers = {"Authorization": f"Bearer {USER}", "x-request-id": "op-ok"}
    files = [("images", (f"cat{i}.png", CAT, "image/png")) for i in range(2)]
    assert httpx.post(f"{server.url}/classify", files=files, headers=headers, timeout=30).status_code == 200
    bad = {**headers, "content-type": "image/png", "x-request-id": "op-bad"}
    assert httpx.post(f"{server.url}/classify", content=b"not a png", headers=bad, timeout=30).status_code == 415
    assert httpx.get(f"{server.url}/v1/models", headers={"x-request-id": "op-nokey"}).status_code == 401

    import grpc

    from quicknet.api._generated import classifier_pb2 as pb
    from quicknet.api._generated import classifier_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        metadata = (("authorization", f"Bearer {USER}"), ("x-request-id", "op-grpc"))
        stub.ClassifyBatch(pb.ClassifyBatchRequest(images=[pb.Image(encoded=CAT)] * 3), metadata=metadata)
        with pytest.raises(grpc.RpcError):
            stub.Classify(
                pb.ClassifyRequest(image=pb.Image(encoded=b"junk")),
                metadata=(("authorization", f"Bearer {USER}"), ("x-request-id", "op-grpc-bad")),
            )

    def line(request_id: str) -> str:
        for _ in range(50):
            found = [x for x in server.log().splitlines() if "quicknet.access" in x and f"request_id={request_id}" in x]
            if found:
                return found[0]
            import time

            time.sleep(0.1)
        raise AssertionError(f"no access-log line for {request_id}:\n{server.log()[-3000:]}")

    ok = line("op-ok")
    SERVED = f"model={FAST_MODEL} version={FAST_VERSION}"
    assert re.search(rf"POST /classify 200 \S+ms client=127\.0\.0\.1:\d+ {SERVED} images=2 ", ok)
    assert "reason=" not in ok
    refused = line("op-bad")
    assert re.search(rf"POST /classify 415 \S+ms client=127\.0\.0\.1:\d+ {SERVED} reason=", refused)
    assert "not a recognised image" in refused.split("reason=")[1], refused
    assert "GET /v1/models 401 " in line("op-nokey") and 'reason="missing or invalid API key"' in line("op-nokey")
    rpc = line("op-grpc")
    assert re.search(rf"ClassifyBatch OK \S+ms client=127\.0\.0\.1:\d+ {SERVED} images=3 ", rpc)
    rpc_bad = line("op-grpc-bad")
    assert "Classify INVALID_ARGUMENT" in rpc_bad and "not a recognised image" in rpc_bad.split("reason=")[1]


def test_json_access_lines_carry_the_same_fields(monkeypatch):
    import logging
    import time

    from quicknet.serve.logs import JsonFormatter, TextFormatter

    extra = {"client": "10.0.0.1:5", "model": "m", "version": "3", "images": 2, "reason": "bad\nline"}
    record = logging.LogRecord("quicknet.access", logging.INFO, __file__, 1, "POST /classify 400", (), None)
    record.__dict__.update(extra)
    record.created = 1764936000.25  # 2025-12-05 12:00:00.250 UTC
    monkeypatch.setenv("TZ", "America/New_York")  # a host not on UTC: the line's time must not follow it
    time.tzset()
    try:
        doc = json.loads(JsonFormatter().format(record))
    finally:
        monkeypatch.undo()
        time.tzset()  # the rest of this worker's tests keep the host's zone
    assert {k: doc[k] for k in extra} == extra
    assert doc["ts"] == "2025-12-05T12:00:00.250Z", "UTC to the millisecond, zone written, whatever TZ the host has"
    text = logging.LogRecord("quicknet.access", logging.INFO, __file__, 1, 'x reason="%s"', ("a\nforged",), None)
    assert "\n" not in TextFormatter().format(text), "a reason cannot forge a line (escaped as before)"


def quicknet(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quicknet", *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env
    )


def test_serve_help_shows_every_default():
    from quicknet.serve.config import Settings

    out = quicknet("serve", "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for needle in ("REST port [default: 8000;", "largest batch the engine runs [default: 64;", "[default: on; env"):
        assert needle in text, needle
    flags = re.findall(r"^  (--[a-z0-9-]+)", out.stdout, re.M)
    assert len(flags) >= len(Settings.model_fields)
    blocks = re.split(r"\n  (?=--)", out.stdout.split("options:")[1])
    for block in blocks[1:]:
        assert "default" in block, f"no default shown: {block.split()[0]}"


def test_build_help_explains_resume_tensorrt_and_publish():
    text = " ".join(quicknet("build", "--help").stdout.split())
    for flag in ("--resume", "--tensorrt, --no-tensorrt", "--publish, --no-publish"):
        after = text.split(f" {flag} ", 1)[1].split(" --")[0]
        assert len(after) > 20, (flag, after)


def test_info_needs_no_torch_and_its_table_is_torchs(tmp_path):
    import os

    stubs = tmp_path / "stubs"
    (stubs / "torch").mkdir(parents=True)
    (stubs / "torch" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
    )
    out = quicknet("info", env={**os.environ, "PYTHONPATH": str(stubs)})
    assert out.returncode == 0, out.stderr
    assert "quicknet-xs" in out.stdout and "3.480 M params" in out.stdout

    pytest.importorskip("torch")
    from quicknet.build.model import VARIANTS, build_model, count_macs, count_params
    from quicknet.build.sizes import SIZES

    assert {n: (count_params(build_model(n)), count_macs(c)) for n, c in VARIANTS.items()} == SIZES, (
        "regenerate the table: python -m quicknet.build.sizes"
    )
    rows = re.findall(
        r"^\| `(quicknet[\w-]*)` \| [\d.]+ \| ([\d.]+) M \| ([\d.]+) G \|$", (REPO / "README.md").read_text(), re.M
    )
    readme = {name: (params, macs) for name, params, macs in rows}
    assert readme == {n: (f"{p / 1e6:.3f}", f"{m / 1e9:.3f}") for n, (p, m) in SIZES.items()}, (
        "the README's variant table"
    )


def test_probe_says_why_and_takes_a_url(server):
    ok = quicknet("probe", "--url", server.url, "--ready")
    assert (ok.returncode, ok.stderr) == (0, "")
    port = free_port()
    refused = quicknet("probe", "--url", f"127.0.0.1:{port}")
    assert refused.returncode == 1
    assert refused.stderr == f"probe http://127.0.0.1:{port}/healthz: cannot reach it: Connection refused\n"
    missing = quicknet("probe", "--url", f"{server.url}/nowhere")
    assert missing.returncode == 1 and "answered 40" in missing.stderr, missing.stderr
    grpc_port = quicknet("probe", "--url", f"127.0.0.1:{server.grpc_port}")  # HTTP/2 frames, then a close
    assert grpc_port.returncode == 1 and grpc_port.stderr.count("\n") == 1, grpc_port.stderr
    assert "did not answer in HTTP/1.1" in grpc_port.stderr and "REST port" in grpc_port.stderr, grpc_port.stderr
