"""API keys: the key file, the check, and the REST app's open and closed routes (in process).
Over real sockets, with TLS and every client, see tests/test_tls.py."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from quicknet.errors import QuickNetError
from quicknet.serve import auth, web
from quicknet.serve.classifier import rest as classifier_rest
from quicknet.serve.config import Settings
from quicknet.serve.kserve import rest as kserve_rest
from quicknet.serve.runtime import Runtime
from quicknet.serve.transport.app import create_app
from quicknet.testing import REPO

KEY = "test-key-0123456789abcdef"
OTHER = "other-key-0123456789abcdef"


def _keys_file(tmp_path, text: str):
    path = tmp_path / "keys"
    path.write_text(text)
    return path


def _client(tmp_path, text: str = KEY + "\n", **settings) -> TestClient:
    runtime = Runtime(Settings(api_keys_file=_keys_file(tmp_path, text), **settings))
    return TestClient(create_app(runtime, [classifier_rest, kserve_rest, web]))  # web: /docs, /redoc, /


def _refused(reason: str = "unauthenticated", protocol: str = "rest") -> float:
    """Summed over the model labels: a test earlier in the run may leave its served model in the
    context this thread's requests inherit, and which model a refusal names is not the point here."""
    return sum(
        sample.value
        for family in REGISTRY.collect()
        if family.name == "quicknet_rejections"
        for sample in family.samples
        if sample.name == "quicknet_rejections_total"
        and sample.labels["protocol"] == protocol
        and sample.labels["reason"] == reason
    )


def test_key_file_lines_plain_hashed_comments():
    hashed = auth.hashed_line(OTHER)
    assert hashed.startswith("sha256:") and OTHER not in hashed
    digests = auth.parse(f"# a comment\n\n{KEY}\n  {hashed}  \n", "keys")
    assert digests == [auth.digest(KEY), auth.digest(OTHER)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no API key"),
        ("# only a comment\n", "holds no API key"),
        ("short\n", "keys:1: a key needs at least 16 characters"),
        (f"{KEY}\nsha256:abc\n", "keys:2: a hashed key is 'sha256:' and 64"),
        ("a key with spaces inside\n", "no spaces"),
    ],
)
def test_a_malformed_key_file_is_one_line_without_the_keys(text, message):
    with pytest.raises(QuickNetError, match=message) as err:
        auth.parse(text, "keys")
    assert "\n" not in str(err.value)
    assert KEY not in str(err.value)


@pytest.mark.parametrize(
    ("header", "allowed"),
    [
        (f"Bearer {KEY}", True),
        (f"bearer {KEY}", True),
        (f"  Bearer   {KEY}  ", True),
        (f"Bearer {OTHER}", True),  # the hashed one
        (f"Bearer {KEY}x", False),
        (f"Basic {KEY}", False),
        (KEY, False),
        ("Bearer ", False),
        ("", False),
        (None, False),
    ],
)
def test_allows_only_a_bearer_key_from_the_file(tmp_path, header, allowed):
    keys = auth.ApiKeys(_keys_file(tmp_path, f"{KEY}\n{auth.hashed_line(OTHER)}\n"))
    assert keys.allows(header) is allowed


def test_every_stored_key_is_compared_every_time(tmp_path, monkeypatch):
    """No early exit: the time a check takes does not tell which key (or how many) matched."""
    keys = auth.ApiKeys(_keys_file(tmp_path, "".join(f"key-number-{i:02d}-abcdefgh\n" for i in range(5))))
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for header in ("Bearer key-number-00-abcdefgh", "Bearer nope-nope-nope-nope", None):
        calls.clear()
        keys.allows(header)
        assert len(calls) == 5


def test_keys_rotate_without_a_restart_and_a_broken_edit_keeps_the_old_ones(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(auth, "RECHECK_S", 0.0)
    path = _keys_file(tmp_path, KEY + "\n")
    keys = auth.ApiKeys(path)
    assert keys.allows(f"Bearer {KEY}")
    path.write_text(OTHER + "\n")
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
    assert keys.allows(f"Bearer {OTHER}") and not keys.allows(f"Bearer {KEY}")
    path.write_text("too-short\n")
    os.utime(path, ns=(time.time_ns() + 2 * 10**9,) * 2)
    with caplog.at_level(logging.ERROR, "quicknet.auth"):
        assert keys.allows(f"Bearer {OTHER}"), "a broken file does not lock everyone out"
    assert "previous keys stay" in caplog.text


# What health, readiness and metrics answer in an app with no model loaded (not ready: 503, and
# KServe's server-ready 400, as Triton answers): exact, so a 500 or a refusal cannot pass for "open".
OPEN_WITHOUT_MODELS = {
    "/healthz": 200,
    "/readyz": 503,
    "/metrics": 200,
    "/v2/health/live": 200,
    "/v2/health/ready": 400,
}
DOCS = {"/docs": 200, "/redoc": 200, "/": 200, "/openapi.json": 200}


def test_rest_routes_need_a_key_and_health_stays_open(tmp_path):
    before, before_kserve = _refused(), _refused(protocol="kserve-rest")
    with _client(tmp_path) as client:
        refused = client.get("/v1/models")
        assert refused.status_code == 401
        assert refused.json() == {"error": "missing or invalid API key (send Authorization: Bearer <key>)"}
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {OTHER}"}).status_code == 401
        assert client.post("/classify", content=b"x" * 3072).status_code == 401, "refused before the body is read"
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert client.post("/v2/models/quicknet-xs/infer", json={}).status_code == 401
        assert client.get("/v2/models/quicknet-xs/ready").status_code == 401, "model state is not health"
        for path, status in {**OPEN_WITHOUT_MODELS, **DOCS}.items():
            assert client.get(path).status_code == status, path  # answered, not refused: no model is loaded here
    assert _refused() - before == 3
    assert _refused(protocol="kserve-rest") - before_kserve == 2, "refusals are counted under their front"


def test_closed_health_endpoints_need_a_key_too(tmp_path):
    with _client(tmp_path, open_health_endpoints=False) as client:
        for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
            assert client.get(path).status_code == 401, path
            keyed = client.get(path, headers={"Authorization": f"Bearer {KEY}"})
            assert keyed.status_code == OPEN_WITHOUT_MODELS[path] and "API key" not in keyed.text, path


def test_closed_health_endpoints_need_a_key_on_grpc_too(tmp_path):
    """`--no-open-health-endpoints` on the real server: gRPC health and KServe's ServerLive /
    ServerReady answer UNAUTHENTICATED without a key, and SERVING / true with one."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from quicknet.api._generated import grpc_predict_v2_pb2 as kpb
    from quicknet.api._generated import grpc_predict_v2_pb2_grpc as kpb_grpc
    from quicknet.testing import start_server

    keys = _keys_file(tmp_path, KEY + "\n")
    srv = start_server(
        tmp_path, api_keys_file=keys, open_health_endpoints=False, warmup=False, precision="fp32", wait_ready=False
    )
    try:
        with grpc.insecure_channel(srv.grpc_target) as ch:
            health, kserve = health_pb2_grpc.HealthStub(ch), kpb_grpc.GRPCInferenceServiceStub(ch)
            grpc.channel_ready_future(ch).result(timeout=60)
            deadline = time.monotonic() + 60
            while "ready:" not in srv.log():  # /readyz needs a key too: wait for the log line
                assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log()
                time.sleep(0.1)
            calls = {
                "health": lambda md: health.Check(health_pb2.HealthCheckRequest(service=""), metadata=md, timeout=10),
                "live": lambda md: kserve.ServerLive(kpb.ServerLiveRequest(), metadata=md, timeout=10),
                "ready": lambda md: kserve.ServerReady(kpb.ServerReadyRequest(), metadata=md, timeout=10),
            }
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as refused:
                    call(())
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            keyed = [("authorization", f"Bearer {KEY}")]
            assert calls["health"](keyed).status == health_pb2.HealthCheckResponse.SERVING
            assert calls["live"](keyed).live and calls["ready"](keyed).ready
    finally:
        assert srv.stop() == 0, srv.log()


def test_the_api_docs_offer_bearer_auth(tmp_path):
    with _client(tmp_path) as client:
        schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["apiKey"] == {"type": "http", "scheme": "bearer"}
    assert schema["security"] == [{"apiKey": []}]


def test_keys_are_never_logged(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG), _client(tmp_path) as client:
        client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        client.get("/v1/models", headers={"Authorization": f"Bearer {OTHER}"})
    assert caplog.records, "the access log ran"
    assert KEY not in caplog.text and OTHER not in caplog.text


def _serve(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUICKNET_")}
    return subprocess.run(
        [sys.executable, "-m", "quicknet", "serve", *args], cwd=REPO, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda p: ["--api-keys-file", str(p / "missing")], "cannot read the API keys file"),
        (lambda p: ["--api-keys-file", str(_keys_file(p, "short\n"))], "needs at least 16 characters"),
        (lambda p: ["--tls-cert", str(_keys_file(p, "x"))], "--tls-cert and --tls-key go together"),
        (lambda p: ["--tls-client-ca", str(_keys_file(p, "x"))], "needs --tls-cert and --tls-key"),
        (lambda p: ["--tls-cert", str(p / "nope"), "--tls-key", str(p / "nope")], "is not a readable file"),
    ],
)
def test_bad_access_settings_stop_serve_in_one_line(tmp_path, make_args, message):
    result = _serve(*make_args(tmp_path))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_api_key_command_makes_a_key_and_its_hashed_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUICKNET_")}
    made = subprocess.run(
        [sys.executable, "-m", "quicknet", "api-key"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.split("key:")[1].split()[0]
    line = made.stdout.split("line:")[1].split()[0]
    assert key not in line
    keys = auth.ApiKeys(_keys_file(tmp_path, line + "\n"))
    assert keys.allows(f"Bearer {key}") and not keys.allows(f"Bearer {key[:-1]}")
    again = subprocess.run(
        [sys.executable, "-m", "quicknet", "api-key", "--hash"],
        input=key + "\n",
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert again.stdout.strip() == line
