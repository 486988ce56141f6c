"""TLS, mutual TLS and API keys on the real server, with every client a user would pick: curl,
httpx, grpcio, Triton's clients (HTTP and gRPC), and our own CLI and container probe. The test
makes its own CA and certificates (trustme).

This module imports tritonclient, so it must not import our generated KServe stubs (see
tests/test_kserve.py)."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from quicknet.api._generated import classifier_pb2 as pb
from quicknet.api._generated import classifier_pb2_grpc as pb_grpc
from quicknet.testing import REPO, metric, start_server

KEY = "tls-test-key-0123456789"
CAT = (REPO / "examples" / "cat.png").read_bytes()
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, a client certificate, as PEM files."""
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client.example")
    files = {
        "ca": ca.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
    }
    paths = {}
    for name, blob in files.items():
        paths[name] = root / f"{name}.pem"
        blob.write_to_path(str(paths[name]))
    (root / "keys").write_text(f"# the test's key, hashed\n{_hashed(KEY)}\n")
    paths["keys"] = root / "keys"
    return paths


def _hashed(key: str) -> str:
    from quicknet.serve.auth import hashed_line

    return hashed_line(key)


def _context(pki, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if client_cert:
        context.load_cert_chain(pki["client_cert"], pki["client_key"])
    return context


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    """TLS and API keys (health endpoints open)."""
    srv = start_server(
        tmp_path_factory.mktemp("tls"),
        tls=_context(pki),
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        api_keys_file=pki["keys"],
    )
    yield srv
    assert srv.stop() == 0, srv.log()
    assert KEY not in srv.log(), "the key is never logged"


@pytest.fixture(scope="module")
def mtls_server(pki, tmp_path_factory):
    """Mutual TLS: clients need a certificate the CA signed."""
    srv = start_server(
        tmp_path_factory.mktemp("mtls"),
        tls=_context(pki, client_cert=True),
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_client_ca=pki["ca"],
    )
    yield srv
    assert srv.stop() == 0, srv.log()


def _grpc_channel(srv, pki, client_cert: bool = False) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki["client_key"].read_bytes() if client_cert else None,
        certificate_chain=pki["client_cert"].read_bytes() if client_cert else None,
    )
    return grpc.secure_channel(srv.grpc_target, creds)


def test_httpx_over_tls_with_a_key(tls_server, pki):
    with httpx.Client(base_url=tls_server.url, verify=_context(pki)) as client:
        refused = client.post("/classify", content=CAT, headers={"Content-Type": "image/png"})
        assert refused.status_code == 401
        ok = client.post("/classify", content=CAT, headers={"Content-Type": "image/png", **AUTH})
        assert ok.status_code == 200, ok.text
        assert ok.json()["predictions"][0]["label"] == "cat"
        assert client.get("/readyz").status_code == 200, "health answers without a key"
        text = client.get("/metrics").text
    assert metric(text, "quicknet_rejections_total", reason="unauthenticated", protocol="rest") >= 1


def test_plain_http_to_the_tls_port_gets_no_answer(tls_server):
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_server.http_port}/healthz", timeout=5)


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server):
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_server.url}/healthz")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_over_tls_with_a_key(tls_server, pki):
    def curl(*args: str) -> str:
        cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(pki["ca"]), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout

    target = f"{tls_server.url}/classify"
    image = f"@{REPO / 'examples' / 'cat.png'}"
    png = "Content-Type: image/png"
    assert curl("-H", png, "--data-binary", image, target) == "401"
    assert curl("-H", png, "-H", f"Authorization: Bearer {KEY}", "--data-binary", image, target) == "200"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_readmes_tls_curl_runs_as_written(tls_server, pki, tmp_path):
    """The README's HTTPS line, verbatim but for the port: its `ca.crt` and `$KEY` are the test's."""
    from tests.test_readme import readme_curls

    commands = [c for c in readme_curls() if "https://" in c]
    assert commands, "the README shows curl over TLS"
    shutil.copy(pki["ca"], tmp_path / "ca.crt")
    (tmp_path / "examples").symlink_to(REPO / "examples")
    for command in commands:
        runnable = command.replace("localhost:8000", f"127.0.0.1:{tls_server.http_port}")
        env = {**os.environ, "KEY": KEY}
        done = subprocess.run(
            ["bash", "-c", runnable], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["predictions"][0]["label"] == "cat", done.stdout


def test_grpc_over_tls_with_a_key(tls_server, pki):
    with _grpc_channel(tls_server, pki) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        request = pb.ClassifyRequest(image=pb.Image(encoded=CAT))
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(request)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ClassifyStream(iter([request])))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, "streaming methods too"
        with pytest.raises(grpc.RpcError) as err:
            wrong = [("authorization", "Bearer not-the-key-000000"), ("x-request-id", "no-key-1")]
            stub.Classify(request, metadata=wrong)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert dict(err.value.trailing_metadata())["x-request-id"] == "no-key-1", "a refusal keeps its request id"
        assert "gRPC /quicknet.v1.Classifier/Classify UNAUTHENTICATED" in tls_server.log(), "and its log line"
        reply = stub.Classify(request, metadata=[("authorization", f"Bearer {KEY}")])
        assert reply.predictions[0].label == "cat"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING, "health answers without a key"


def _triton_inputs(module):
    pixels = np.zeros((1, 32, 32, 3), np.uint8)
    tensor = module.InferInput("images", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    return [tensor]


def test_tritonclient_http_over_tls_with_a_key(tls_server, pki):
    import gevent.ssl

    client = thttp.InferenceServerClient(
        f"127.0.0.1:{tls_server.http_port}",
        ssl=True,
        ssl_options={"ca_certs": str(pki["ca"])},
        ssl_context_factory=gevent.ssl.create_default_context,
    )
    try:
        assert client.is_server_live(), "KServe health answers without a key"
        with pytest.raises(InferenceServerException, match="API key"):
            client.infer("quicknet-xs", _triton_inputs(thttp))
        result = client.infer(
            "quicknet-xs", _triton_inputs(thttp), headers=dict(AUTH)
        )  # tritonclient adds its own headers to the dict it is given
        assert result.as_numpy("logits").shape == (1, 10)
    finally:
        client.close()


def test_tritonclient_grpc_over_tls_with_a_key(tls_server, pki):
    client = tgrpc.InferenceServerClient(tls_server.grpc_target, ssl=True, root_certificates=str(pki["ca"]))
    try:
        assert client.is_server_live() and client.is_server_ready(), "KServe health answers without a key"
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED|API key"):
            client.infer("quicknet-xs", _triton_inputs(tgrpc))
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED|API key"):
            client.get_model_metadata("quicknet-xs")
        result = client.infer("quicknet-xs", _triton_inputs(tgrpc), headers={"authorization": f"Bearer {KEY}"})
        assert result.as_numpy("logits").shape == (1, 10)
    finally:
        client.close()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QUICKNET_")}
    return subprocess.run(
        [sys.executable, "-m", "quicknet", *args],
        cwd=REPO,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_cli_client_over_tls_with_a_key(tls_server, pki):
    cat = str(REPO / "examples" / "cat.png")
    for target in (["--url", tls_server.url], ["--grpc", tls_server.grpc_target]):
        ok = _cli("classify", *target, "--cacert", str(pki["ca"]), cat, env={"QUICKNET_API_KEY": KEY})
        assert ok.returncode == 0 and ": cat " in ok.stdout, ok.stderr
        refused = _cli("classify", *target, "--cacert", str(pki["ca"]), cat)
        assert refused.returncode == 2 and ("401" in refused.stderr or "UNAUTHENTICATED" in refused.stderr)
        assert refused.stderr.endswith("(pass --api-key or set QUICKNET_API_KEY)\n"), refused.stderr


def test_the_python_client_over_tls_with_a_key(tls_server, mtls_server, pki, monkeypatch):
    from quicknet.client import Client, QuickNetClientError

    monkeypatch.delenv("QUICKNET_API_KEY", raising=False)
    cat = REPO / "examples" / "cat.png"
    for url in (tls_server.url, f"grpc://{tls_server.grpc_target}"):
        with Client(url, cacert=pki["ca"]) as client, pytest.raises(QuickNetClientError) as err:
            client.classify(cat)
        assert err.value.status == 401 and not err.value.retryable
        with Client(url, cacert=pki["ca"], api_key=KEY) as client:
            assert client.classify(cat).label == "cat"
    with Client(tls_server.url, api_key=KEY) as client, pytest.raises(QuickNetClientError) as err:
        client.classify(cat)  # the system's roots do not know the test's CA: one error, not retried
    assert err.value.status is None and not err.value.retryable and "CERTIFICATE_VERIFY_FAILED" in err.value.message
    for url in (mtls_server.url, f"grpc://{mtls_server.grpc_target}"):
        with Client(url, cacert=pki["ca"], cert=pki["client_cert"], key=pki["client_key"]) as client:
            assert client.classify(cat).label == "cat"
    # what a user gets wrong first says what to do: plain HTTP to the TLS port, no client certificate
    wrong = [
        (f"http://127.0.0.1:{tls_server.http_port}", {}, "https://"),
        (mtls_server.url, {"cacert": pki["ca"]}, "--cert and --key"),
    ]
    wrong += [
        (f"grpc://{tls_server.grpc_target}", {}, "grpcs://"),
        (f"grpc://{mtls_server.grpc_target}", {}, "grpcs://"),
    ]
    wrong += [(f"grpcs://{mtls_server.grpc_target}", {"cacert": pki["ca"]}, "--cert and --key")]
    for url, options, hint in wrong:
        with Client(url, api_key=KEY, timeout=5, **options) as client, pytest.raises(QuickNetClientError) as err:
            client.classify(cat)
        assert hint in err.value.message and "\n" not in err.value.message, (url, err.value.message)


def _probe_env(srv, pki, **extra: str) -> dict[str, str]:
    return {
        "QUICKNET_HTTP_PORT": str(srv.http_port),
        "QUICKNET_TLS_CERT": str(pki["server_cert"]),
        "QUICKNET_TLS_KEY": str(pki["server_key"]),
        **extra,
    }


def test_the_container_probe_speaks_tls(tls_server, mtls_server, pki):
    assert _cli("probe", "--ready", env=_probe_env(tls_server, pki)).returncode == 0
    env = _probe_env(mtls_server, pki, QUICKNET_TLS_CLIENT_CA=str(pki["ca"]))
    assert _cli("probe", "--ready", env=env).returncode == 0, "under mutual TLS it shows the server's certificate"
    assert _cli("probe", env={"QUICKNET_HTTP_PORT": str(tls_server.http_port)}).returncode == 1, "plain HTTP fails"


def test_mutual_tls_needs_a_client_certificate(mtls_server, pki):
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{mtls_server.url}/healthz", verify=_context(pki), timeout=5)
    ok = httpx.post(
        f"{mtls_server.url}/classify",
        content=CAT,
        headers={"Content-Type": "image/png"},
        verify=_context(pki, client_cert=True),
    )
    assert ok.status_code == 200, "no API keys on this server: the certificate is the credential"

    request = pb.ClassifyRequest(image=pb.Image(encoded=CAT))
    with _grpc_channel(mtls_server, pki) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.ClassifierStub(channel).Classify(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with _grpc_channel(mtls_server, pki, client_cert=True) as channel:
        assert pb_grpc.ClassifierStub(channel).Classify(request, timeout=10).predictions[0].label == "cat"
