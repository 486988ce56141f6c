"""The deployment run for real in a container engine (podman, or docker): the CPU image, compose
with a real Prometheus, and the Kubernetes cpu overlay under `podman kube play`.

Host networking only (127.0.0.1), each server on ports of its own. The image is built once (`make
image`) and shared by every test here. Where no engine can start a container, every test skips
with one line saying why; CI installs podman (.ci/run), so there they run.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import yaml

from quicknet.api._generated import classifier_pb2 as pb
from quicknet.api._generated import classifier_pb2_grpc as pb_grpc
from quicknet.testing import REPO, free_port, queued_images

ENGINE = shutil.which("podman") or shutil.which("docker")
IMAGE = "quicknet-serving:cpu"
RAW = {"Content-Type": "application/octet-stream"}


def sh(*cmd: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}: {(done.stderr or done.stdout)[-2000:]}")
    return done


BASE = "docker.io/library/python:3.11-slim-bookworm"


def _engine_problem() -> str | None:
    """Why containers cannot run here, or None: the base image can be had (pulled, or made from
    Debian packages) and a container of it starts with host networking."""
    if ENGINE is None:
        return "no container engine (podman or docker) is installed"
    base = subprocess.run(
        [str(REPO / "deploy" / "podman" / "base-images.sh"), "python"], capture_output=True, text=True, timeout=900
    )
    if base.returncode != 0:
        why = (base.stderr or base.stdout).strip().splitlines()[-1:]
        return f"no base image (no registry, and mmdebstrap could not make one): {why}"
    probe = subprocess.run(
        [ENGINE, "run", "--rm", "--network", "host", "--entrypoint", "/bin/true", BASE],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        why = (probe.stderr or probe.stdout).strip().splitlines()[-1:]
        return f"{Path(ENGINE).name} cannot run a container here: {why}"
    return None


@pytest.fixture(scope="module")
def image():
    problem = _engine_problem()
    if problem:
        pytest.skip(problem)
    build = subprocess.run(["make", "image"], capture_output=True, text=True, timeout=1200, cwd=REPO)
    if build.returncode != 0:
        pytest.fail(f"make image failed:\n{(build.stderr or build.stdout)[-3000:]}")
    return IMAGE


class Container:
    def __init__(self, name: str, http_port: int, grpc_port: int):
        self.name, self.http_port, self.grpc_port = name, http_port, grpc_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def logs(self) -> str:
        return sh(ENGINE, "logs", self.name, check=False).stderr + sh(ENGINE, "logs", self.name, check=False).stdout


def _wait_ready(url: str, timeout: float = 90) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready within {timeout:.0f}s")


@pytest.fixture
def container(image):
    http_port, grpc_port = free_port(), free_port()
    name = f"quicknet-test-{uuid.uuid4().hex[:8]}"
    sh(
        ENGINE, "run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
        "-e", f"QUICKNET_HTTP_PORT={http_port}", "-e", f"QUICKNET_GRPC_PORT={grpc_port}",
        "-e", "QUICKNET_HTTP_HOST=127.0.0.1", "-e", "QUICKNET_GRPC_HOST=127.0.0.1", "-e", "QUICKNET_DRAIN_SECONDS=30",
        "-e", "QUICKNET_MAX_QUEUE_IMAGES=100000",
        image,
    )  # fmt: skip
    box = Container(name, http_port, grpc_port)
    try:
        yield box
    finally:
        sh(ENGINE, "rm", "-f", "-t", "0", name, check=False)


def test_the_image_serves_drains_and_stays_small(container, cifar):
    ready_s = _wait_ready(container.url)
    assert ready_s < 60, "ready within the HEALTHCHECK start period"
    images = cifar.test.images[:4]
    r = httpx.post(f"{container.url}/classify", content=images.tobytes(), headers=RAW)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 4
    with grpc.insecure_channel(f"127.0.0.1:{container.grpc_port}") as ch:
        reply = pb_grpc.ClassifierStub(ch).Classify(pb.ClassifyRequest(image=pb.Image(pixels=images[0].tobytes())))
    assert reply.predictions
    user = sh(ENGINE, "exec", container.name, "python", "-c", "import os; print(os.getuid(), os.getgid())").stdout
    assert user.split() == ["10001", "10001"], "the server runs as the non-root user"
    assert (
        sh(
            ENGINE, "exec", container.name, "python", "-c", "import importlib.util as u; print(u.find_spec('torch'))"
        ).stdout.strip()
        == "None"
    )
    if Path(ENGINE).name == "podman":
        sh(ENGINE, "healthcheck", "run", container.name)  # the image's own HEALTHCHECK (kept by --format docker)
    size = int(sh(ENGINE, "image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip())
    assert size < 600 << 20, f"the CPU image is {size >> 20} MB"

    body = np.repeat(images[:1], 256, axis=0).tobytes()
    # the small model (this is about draining: 16 x 256 images of the full one took ~25 s of 2
    # shared cores, near the 30 s default deadline, while the other test worker ran), and enough
    # of it (32 x 256 images, ~7 s alone) that the stop surely arrives while work is queued
    drained = f"{container.url}/classify?model=quicknet-xs"

    async def load_then_stop() -> tuple[list, float]:
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = [asyncio.create_task(client.post(drained, content=body, headers=RAW)) for _ in range(32)]
            queued = await queued_images(client, container.url)
            stop = await asyncio.create_subprocess_exec(ENGINE, "stop", "-t", "40", container.name)
            responses = await asyncio.gather(*tasks, return_exceptions=True)
            await stop.wait()
            return responses, queued

    responses, queued = asyncio.run(load_then_stop())
    assert queued > 0, "the stop must arrive while work is queued"
    assert [getattr(r, "status_code", repr(r)) for r in responses] == [200] * 32, container.logs()[-3000:]
    state = json.loads(sh(ENGINE, "inspect", container.name, "--format", "{{json .State}}").stdout)
    assert state["ExitCode"] == 0, container.logs()[-3000:]


def _compose_for_host_network(tmp: Path, http_port: int, grpc_port: int, prom_port: int) -> Path:
    """The real docker-compose.yml on host networking: our own ports, Prometheus scraping
    127.0.0.1 (compose DNS does not exist on the host network), no Grafana (no image here)."""
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = doc["services"]
    for name in ("grafana", "quicknet-gpu"):
        services.pop(name)
    for service in services.values():
        service.pop("ports", None)
        service.pop("networks", None)
        service.pop("depends_on", None)
        service["network_mode"] = "host"
    app = services["quicknet"]
    app.pop("build", None)
    # the store mount, from the compose file's folder (this copy is written elsewhere)
    app["volumes"] = [str(REPO / v[2:]) if v.startswith("./") else v for v in app.get("volumes", [])]
    app["environment"] |= {
        "QUICKNET_HTTP_HOST": "127.0.0.1",
        "QUICKNET_HTTP_PORT": str(http_port),
        "QUICKNET_GRPC_HOST": "127.0.0.1",
        "QUICKNET_GRPC_PORT": str(grpc_port),
    }
    app["healthcheck"]["test"] = [
        t.replace("127.0.0.1:8000", f"127.0.0.1:{http_port}") for t in app["healthcheck"]["test"]
    ]
    prom_dir = tmp / "prometheus"
    prom_dir.mkdir()
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["scrape_configs"] = [
        {"job_name": "quicknet", "static_configs": [{"targets": [f"127.0.0.1:{http_port}"]}]},
        {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{prom_port}"]}]},
    ]
    (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(REPO / "deploy" / "prometheus" / "rules.yml", prom_dir / "rules.yml")
    prom = services["prometheus"]
    prom["volumes"] = [f"{prom_dir}:/etc/prometheus:ro", "prometheus-data:/prometheus"]
    prom["command"] = [*prom["command"], f"--web.listen-address=127.0.0.1:{prom_port}"]
    prom["healthcheck"]["test"] = [
        t.replace("127.0.0.1:9090", f"127.0.0.1:{prom_port}") for t in prom["healthcheck"]["test"]
    ]
    doc["networks"] = {}
    doc["volumes"] = {"prometheus-data": {}}
    doc.pop("secrets", None)  # Grafana's, and Grafana is not run here
    doc["name"] = f"quicknet-test-{uuid.uuid4().hex[:6]}"
    path = tmp / "compose.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _query(prom: str, expr: str) -> list:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]


def test_compose_runs_with_a_real_prometheus_that_scrapes_and_evaluates_the_rules(image, tmp_path):
    beside = Path(sys.executable).with_name("podman-compose")
    compose = str(beside) if beside.exists() else shutil.which("podman-compose")
    if compose is None:
        pytest.skip("podman-compose is not installed (the dev extra has it)")
    sh(str(REPO / "deploy" / "podman" / "base-images.sh"), "prometheus", timeout=900)
    http_port, grpc_port, prom_port = free_port(), free_port(), free_port()
    path = _compose_for_host_network(tmp_path, http_port, grpc_port, prom_port)
    sh(compose, "-f", str(path), "up", "-d", timeout=300)
    try:
        _wait_ready(f"http://127.0.0.1:{http_port}")
        prom = f"http://127.0.0.1:{prom_port}"
        for _ in range(20):
            httpx.post(f"http://127.0.0.1:{http_port}/classify", content=bytes(3072 * 8), headers=RAW)
        doc = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yml").read_text())
        recorded = [r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r]
        alerts = {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}
        deadline = time.monotonic() + 120
        missing = ["up", "quicknet_request_duration_seconds_count", *recorded]
        while missing and time.monotonic() < deadline:
            time.sleep(3)
            if _query(prom, 'up{job="quicknet"} == 1'):
                missing = [m for m in missing if m != "up"]
            missing = [m for m in missing if m == "up" or not _query(prom, m)]
        assert not missing, f"no data from Prometheus for {missing}"
        loaded = httpx.get(f"{prom}/api/v1/rules", timeout=5).json()["data"]["groups"]
        assert alerts <= {r["name"] for g in loaded for r in g["rules"] if r["type"] == "alerting"}
    finally:
        sh(compose, "-f", str(path), "down", "-t", "30", "-v", check=False, timeout=300)


def test_the_kubernetes_cpu_overlay_runs_under_podman_kube_play(image, tmp_path, cifar):
    if Path(ENGINE).name != "podman":
        pytest.skip("`kube play` is podman's")
    kubectl = shutil.which("kubectl") or str(Path(sys.executable).with_name("kubectl"))
    rendered = sh(kubectl, "kustomize", str(REPO / "deploy" / "k8s" / "overlays" / "cpu")).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    http_port, grpc_port = free_port(), free_port()
    deployment["spec"]["replicas"] = 1
    pod = deployment["spec"]["template"]["spec"]
    pod["hostNetwork"] = True
    (box,) = pod["containers"]
    box.pop("ports", None)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        box[probe]["httpGet"]["port"] = http_port
    box["image"] = f"localhost/{IMAGE}" if ":" in IMAGE else IMAGE
    config["data"] |= {
        "QUICKNET_HTTP_HOST": "127.0.0.1",
        "QUICKNET_HTTP_PORT": str(http_port),
        "QUICKNET_GRPC_HOST": "127.0.0.1",
        "QUICKNET_GRPC_PORT": str(grpc_port),
    }
    spec = tmp_path / "kube.yaml"
    spec.write_text(yaml.safe_dump_all([config, deployment]))
    sh(ENGINE, "kube", "play", str(spec), timeout=300)
    try:
        _wait_ready(f"http://127.0.0.1:{http_port}")
        r = httpx.post(f"http://127.0.0.1:{http_port}/classify", content=cifar.test.images[:2].tobytes(), headers=RAW)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2
        pods = json.loads(sh(ENGINE, "pod", "ps", "--format", "json").stdout)
        assert any(p["Status"] == "Running" for p in pods)
        inspect = json.loads(sh(ENGINE, "ps", "--format", "json").stdout)
        name = next(c["Names"][0] for c in inspect if IMAGE.split(":")[0] in c["Image"])
        details = json.loads(sh(ENGINE, "inspect", name).stdout)[0]
        assert details["HostConfig"]["ReadonlyRootfs"] is True
        assert details["Config"]["User"].startswith("10001")
        sh(ENGINE, "kube", "down", str(spec), timeout=120)
        left = json.loads(sh(ENGINE, "ps", "-a", "--format", "json").stdout)
        assert not [c for c in left if IMAGE.split(":")[0] in c["Image"]], "kube down removed the pod"
    finally:
        sh(ENGINE, "kube", "down", str(spec), check=False, timeout=120)
