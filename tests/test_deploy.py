"""Deployment files checked offline (no container engine or cluster here): schemas, references,
and that every probe, port and metric they name is what the real server serves."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from quicknet.testing import REPO, free_port, start_server

BIN = Path(sys.executable).parent
DEPLOY = REPO / "deploy"
OVERLAYS = ["cpu", "gpu", "cpu-secure", "cpu-store"]
KSERVE = DEPLOY / "kserve" / "inferenceservice.yaml"


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    out = {}
    for overlay in OVERLAYS:
        res = run(str(BIN / "kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay))
        assert res.returncode == 0, res.stderr
        out[overlay] = [d for d in yaml.safe_load_all(res.stdout) if d]
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("deploy"))
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def exported_metrics(server) -> set[str]:
    text = httpx.get(f"{server.url}/metrics").text
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_compose_matches_the_compose_spec():
    res = run(str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_references_resolve(compose):
    services, volumes, networks = compose["services"], compose.get("volumes", {}), compose.get("networks", {})
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name} mounts missing path {source}"
            else:
                assert source in volumes, f"{name} uses undeclared volume {source}"
        for net in svc.get("networks", []):
            assert net in networks, f"{name} uses undeclared network {net}"
        build = svc.get("build")
        if build:
            assert (REPO / build["context"] / build["dockerfile"]).is_file()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_valid_kubernetes(overlay, tmp_path, rendered):
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(rendered[overlay]))
    res = run(str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


def _deployment(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "Deployment")


def _config(docs: list[dict]) -> dict:
    """A rendered overlay's ConfigMap data: the QUICKNET_* settings its pods get."""
    return next(d for d in docs if d["kind"] == "ConfigMap")["data"]


def _kserve_predictor() -> dict:
    return yaml.safe_load(KSERVE.read_text())["spec"]["predictor"]


def test_gpu_overlay_asks_for_a_gpu_and_cpu_does_not(rendered):
    gpu = _deployment(rendered["gpu"])["spec"]["template"]["spec"]["containers"][0]["resources"]
    cpu = _deployment(rendered["cpu"])["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1 and "nvidia.com/gpu" not in cpu.get("limits", {})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_process_count_fits_the_cpus_asked_for_and_the_autoscaler_owns_the_replicas(overlay, rendered):
    """`QUICKNET_WORKERS` auto counts the node's cores, all of which a pod without a CPU limit sees:
    every manifest names the count for the CPUs it requests (the engine process and N fronts above
    1). With an autoscaler, a Deployment's `replicas` would reset its count on every apply."""
    docs = rendered[overlay]
    config = _config(docs)
    deployment = _deployment(docs)
    cpus = float(deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
    workers = int(config["QUICKNET_WORKERS"])
    assert workers >= 1 and (1 if workers == 1 else workers + 1) <= max(cpus, 2), (overlay, workers, cpus)
    assert any(d["kind"] == "HorizontalPodAutoscaler" for d in docs)
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the count"
    container = _kserve_predictor()["containers"][0]
    assert {e["name"]: e["value"] for e in container["env"]}["QUICKNET_WORKERS"] == "1"


def test_the_secure_overlay_serves_tls_and_keys_from_its_secrets(rendered, tmp_path):
    docs = rendered["cpu-secure"]
    spec = _deployment(docs)["spec"]["template"]["spec"]
    container = spec["containers"][0]
    config = _config(docs)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert secrets == {"tls": "quicknet-tls", "api-keys": "quicknet-api-keys"}
    for setting, volume in (("TLS_CERT", "tls"), ("TLS_KEY", "tls"), ("API_KEYS_FILE", "api-keys")):
        assert config[f"QUICKNET_{setting}"].startswith(mounts[volume] + "/"), setting
    assert all(
        container[p]["httpGet"]["scheme"] == "HTTPS" for p in ("readinessProbe", "livenessProbe", "startupProbe")
    )
    assert _deployment(docs)["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    (monitor,) = [
        d for d in _with_component(tmp_path, "cpu-secure", "service-monitor-tls") if d["kind"] == "ServiceMonitor"
    ]
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["ca"]["secret"]["name"] == secrets["tls"]


def test_a_service_monitor_is_opt_in(rendered):
    """A plain cluster (kind, minikube) has no Prometheus Operator: an overlay holding a
    ServiceMonitor stops `kubectl apply` there ("no matches for kind"). The overlays scrape by pod
    annotation; the service-monitor components add one (rendered in the tests that read them)."""
    for overlay, docs in rendered.items():
        assert not [d for d in docs if d["kind"] == "ServiceMonitor"], overlay
        annotations = _deployment(docs)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"


def _image_store() -> str:
    """QUICKNET_MODEL_STORE as the images set it (where the store is baked in)."""
    stores = {
        re.search(r"QUICKNET_MODEL_STORE=(\S+)", p.read_text()).group(1) for p in DEPLOY.glob("docker/Dockerfile.*")
    }
    (store,) = stores
    return store


def test_compose_mounts_the_model_store_and_follows_it(compose):
    """The store is a read-only bind mount over the image's copy, followed in poll mode: a
    published version goes live without a rebuild."""
    for name in ("quicknet", "quicknet-gpu"):
        service = compose["services"][name]
        assert f"./model_store:{_image_store()}:ro" in service["volumes"], name
        assert service["environment"]["QUICKNET_MODEL_CONTROL_MODE"] == "${QUICKNET_MODEL_CONTROL_MODE:-poll}"
    assert (REPO / "model_store" / "DEFAULT").is_file()


def test_grafanas_admin_password_is_a_secret_not_admin(compose):
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env, "no password in the environment, and no admin/admin default"
    assert not any(v == "admin" or ":-admin" in str(v) for v in env.values())
    assert grafana["secrets"] == ["grafana_admin_password"]
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    source = compose["secrets"]["grafana_admin_password"]["file"]
    ignored = subprocess.run(["git", "check-ignore", "-q", source], cwd=REPO, timeout=30)
    assert ignored.returncode == 0, f"{source} must be git-ignored: a password is never committed"


def test_the_operators_pages_listen_on_loopback_and_the_service_everywhere(compose):
    """Prometheus and Jaeger have no sign-in: published on every address they would be anyone's
    on the network. The service is what the box is for."""
    for name in ("prometheus", "grafana", "jaeger"):
        assert all(port.startswith("127.0.0.1:") for port in compose["services"][name]["ports"]), name
    for name in ("quicknet", "quicknet-gpu"):
        assert not any(port.startswith("127.") for port in compose["services"][name]["ports"]), name


def _queue_bounds(rendered: dict[str, list[dict]], compose: dict) -> dict[str, int]:
    """QUICKNET_MAX_QUEUE_IMAGES as every manifest sets it."""
    out = {overlay: int(_config(docs)["QUICKNET_MAX_QUEUE_IMAGES"]) for overlay, docs in rendered.items()}
    for name in ("quicknet", "quicknet-gpu"):
        out[f"compose {name}"] = int(compose["services"][name]["environment"]["QUICKNET_MAX_QUEUE_IMAGES"])
    env = _kserve_predictor()["containers"][0]["env"]
    out["kserve"] = int(next(e["value"] for e in env if e["name"] == "QUICKNET_MAX_QUEUE_IMAGES"))
    return out


def test_the_queue_is_bounded_by_time_not_left_at_seconds_of_work(rendered, compose):
    """A CPU pod's queue holds about the half second the p99 alert allows (2,048 images was 3-7 s
    of the default model's work on 2 CPUs), a GPU pod's more; and every queue takes the largest
    request the server accepts, which a smaller queue would answer 429 forever."""
    from quicknet.serve.config import Settings

    bounds = _queue_bounds(rendered, compose)
    largest = Settings.model_fields["max_images_per_request"].default
    assert all(bound >= largest for bound in bounds.values()), (bounds, largest)
    cpu = {k: v for k, v in bounds.items() if "gpu" not in k}
    assert set(cpu.values()) == {256}, cpu
    assert bounds["gpu"] == bounds["compose quicknet-gpu"] > 256


def test_pods_hold_no_api_token_and_take_traffic_only_on_the_serving_ports(rendered):
    """The server never calls the Kubernetes API; a NetworkPolicy admits the serving ports alone and
    lets out only DNS and OTLP."""
    for overlay, docs in rendered.items():
        template = _deployment(docs)["spec"]["template"]
        assert template["spec"]["automountServiceAccountToken"] is False, overlay
        (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
        selected = policy["spec"]["podSelector"]["matchLabels"]
        assert selected.items() <= template["metadata"]["labels"].items(), overlay
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        served = {p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}
        (ingress,) = policy["spec"]["ingress"]
        assert "from" not in ingress and {p["port"] for p in ingress["ports"]} == served, overlay
        allowed_out = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
        assert allowed_out == {53, 4317, 4318} and not any("to" in rule for rule in policy["spec"]["egress"])
    assert _kserve_predictor()["automountServiceAccountToken"] is False


def test_every_setting_the_deployment_files_name_is_one_the_server_reads(rendered, compose):
    """pydantic-settings ignores a QUICKNET_* variable it has no field for: a misspelt one in a
    manifest would be silently without effect."""
    from quicknet.serve.config import Settings

    known = {f"QUICKNET_{name.upper()}" for name in Settings.model_fields}
    named = {}
    for overlay, docs in rendered.items():
        data = _config(docs)
        for key in data:
            named[key] = overlay
        for container in _deployment(docs)["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                named[env["name"]] = f"{overlay} Deployment"
        values = {k.removeprefix("QUICKNET_").lower(): v for k, v in data.items() if k in known}
        files = {k for k in values if k.endswith("_file") or k.startswith("tls_")}  # mounted in the pod only
        Settings.model_validate({k: v for k, v in values.items() if k not in files})  # each value parses
    for name, service in compose["services"].items():
        for key in service.get("environment") or {}:
            named[key] = f"compose {name}"
    for env in _kserve_predictor()["containers"][0]["env"]:
        named[env["name"]] = "kserve"
    for dockerfile in DEPLOY.glob("docker/Dockerfile.*"):
        for key in re.findall(r"\b(QUICKNET_[A-Z0-9_]+)[= ]", dockerfile.read_text()):
            named[key] = dockerfile.name
    unknown = {k: where for k, where in named.items() if k.startswith("QUICKNET_") and k not in known}
    assert not unknown, unknown


def _with_component(tmp_path, overlay: str, component: str) -> list[dict]:
    """An overlay of `overlay` with `component`, as a user writes it: rendered, and checked to be
    valid Kubernetes."""
    k8s = DEPLOY / "k8s"
    folder = tmp_path / f"{overlay}-with-{component}"
    folder.mkdir()
    (folder / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(k8s / "overlays" / overlay, folder)],
                "components": [os.path.relpath(k8s / "components" / component, folder)],
            }
        )
    )
    res = run(str(BIN / "kubectl"), "kustomize", str(folder))
    assert res.returncode == 0, res.stderr
    path = tmp_path / f"{folder.name}.yaml"
    path.write_text(res.stdout)
    valid = run(str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(path))
    assert valid.returncode == 0, valid.stdout + valid.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def test_the_queue_autoscaling_metric_is_opt_in(rendered, tmp_path):
    """Base scales on CPU alone: a Pods metric no adapter serves would stop every scale-down. The
    component adds it, and the result is valid Kubernetes."""
    for docs in rendered.values():
        (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
        assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource"]
    docs = _with_component(tmp_path, "cpu", "queue-autoscaling")
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == ["quicknet_queue_images"]


def _plans_volume(docs: list[dict]) -> dict:
    spec = _deployment(docs)["spec"]["template"]["spec"]
    (mount,) = [
        m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == _config(docs)["QUICKNET_PLAN_DIR"]
    ]
    return next(v for v in spec["volumes"] if v["name"] == mount["name"])


def test_the_gpu_plan_cache_is_a_shared_volume_when_opted_in(rendered, tmp_path):
    """The GPU overlay builds its TensorRT plans into the pod's emptyDir (each start builds them);
    the plan-cache component puts QUICKNET_PLAN_DIR on a ReadWriteMany claim instead, nothing else
    of the volume left behind."""
    assert set(_plans_volume(rendered["gpu"])) == {"name", "emptyDir"}
    docs = _with_component(tmp_path, "gpu", "plan-cache")
    volume = _plans_volume(docs)
    assert set(volume) == {"name", "persistentVolumeClaim"}, volume
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == volume["persistentVolumeClaim"]["claimName"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_store_overlay_and_kserve_read_the_store_from_a_volume(rendered):
    docs = rendered["cpu-store"]
    spec = _deployment(docs)["spec"]["template"]["spec"]
    config = _config(docs)
    assert config["QUICKNET_MODEL_CONTROL_MODE"] == "poll" and config["QUICKNET_MODEL_STORE"] == _image_store()
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == _image_store()]
    assert mount["readOnly"] is True
    claim = next(v for v in spec["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]["claimName"]
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == claim and "ReadWriteMany" in pvc["spec"]["accessModes"]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    job_spec = job["spec"]["template"]["spec"]
    assert job_spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    script = job_spec["containers"][0]["command"][-1]
    assert script.index("cp -R") < script.index("/store/DEFAULT\n"), "DEFAULT is written last"
    assert job_spec["containers"][0]["image"] == spec["containers"][0]["image"], "seeds from the served image"

    container = _kserve_predictor()["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["STORAGE_URI"] == f"pvc://{claim}/", "the same claim, mounted by KServe at /mnt/models"
    assert env["QUICKNET_MODEL_STORE"] == "/mnt/models" and env["QUICKNET_MODEL_CONTROL_MODE"] == "poll"


def test_the_registry_steps_name_the_image_every_overlay_uses(rendered):
    """deploy/README.md's build-and-push steps retag the image name the manifests use."""
    doc = (DEPLOY / "README.md").read_text()
    names = {
        c["image"].split(":")[0]
        for docs in rendered.values()
        for c in _deployment(docs)["spec"]["template"]["spec"]["containers"]
    }
    assert names == {"quicknet-serving"}
    assert "kustomize edit set image quicknet-serving=" in doc and "docker push" in doc
    assert "imagePullSecrets" in doc


def test_grace_period_exceeds_the_drain(rendered):
    for docs in rendered.values():
        spec = _deployment(docs)["spec"]["template"]["spec"]
        config = _config(docs)
        pre_stop = spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert spec["terminationGracePeriodSeconds"] > float(config["QUICKNET_DRAIN_SECONDS"]) + pre_stop
        assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["securityContext"]["runAsNonRoot"] is True


def test_probes_ports_and_paths_are_served(server, rendered, compose, tmp_path):
    monitor = next(d for d in _with_component(tmp_path, "cpu", "service-monitor") if d["kind"] == "ServiceMonitor")
    for docs in rendered.values():
        container = _deployment(docs)["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": 8000, "grpc": 8001}  # the server's default ports
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            path = container[probe]["httpGet"]["path"]
            assert httpx.get(f"{server.url}{path}").status_code == 200, f"{probe} {path}"
        services = [d for d in docs if d["kind"] == "Service"]
        for svc in services:
            for port in svc["spec"]["ports"]:
                assert port["targetPort"] in ports
        endpoint = monitor["spec"]["endpoints"][0]
        assert any(p["name"] == endpoint["port"] for s in services for p in s["spec"]["ports"])
        assert "quicknet_images_total" in httpx.get(f"{server.url}{endpoint['path']}").text
        annotations = _deployment(docs)["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == ports["http"]
        assert "quicknet_images_total" in httpx.get(f"{server.url}{annotations['prometheus.io/path']}").text
    checks = [
        svc["healthcheck"]["test"][1:] for name, svc in compose["services"].items() if name.startswith("quicknet")
    ]
    for dockerfile in (DEPLOY / "docker").glob("Dockerfile.*"):
        text = dockerfile.read_text()
        assert "EXPOSE 8000 8001" in text and "USER 10001" in text
        checks.append(json.loads(re.search(r"HEALTHCHECK .*\n\s*CMD (\[.*\])", text).group(1)))
    assert checks and all(c[:2] == ["quicknet", "probe"] for c in checks), checks
    env = {**os.environ, "QUICKNET_HTTP_PORT": str(server.http_port)}
    for check in checks:  # the probes, run as the container runs them, follow the server's port
        assert subprocess.run([sys.executable, "-m", "quicknet", *check[1:]], env=env, timeout=60).returncode == 0
    dead = {**env, "QUICKNET_HTTP_PORT": str(free_port())}
    assert subprocess.run([sys.executable, "-m", "quicknet", "probe"], env=dead, timeout=60).returncode == 1


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bquicknet_[a-z_]+", expr))


def _exported(name: str, exported: set[str]) -> bool:
    base = re.sub(r"_(bucket|count|sum|total|info)$", "", name)
    return name in exported or base in exported or f"{base}_info" in exported


def test_make_test_installs_promtool_or_says_how(tmp_path):
    """`make test` on a fresh machine: promtool missing, as root it installs Debian's prometheus
    package (apt-get, faked here), otherwise it stops with one line saying how."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    calls = tmp_path / "apt-calls"

    def tool(name: str, body: str) -> None:
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)

    tool(
        "apt-get",
        f'echo "$@" >> {calls}\ncase "$*" in *install*prometheus*) /bin/ln -s /bin/true {bin_}/promtool;; esac',
    )
    make = ["make", "--no-print-directory", "-s", "-f", str(REPO / "Makefile"), "test-tools"]
    env = {"PATH": str(bin_), "HOME": str(tmp_path)}
    tool("id", "echo 1000")
    user = subprocess.run([shutil.which("make"), *make[1:]], env=env, capture_output=True, text=True, timeout=60)
    assert user.returncode == 2 and "needs promtool" in user.stdout and "apt-get install prometheus" in user.stdout
    assert not calls.exists(), "not root: nothing installed"
    tool("id", "echo 0")
    root = subprocess.run([shutil.which("make"), *make[1:]], env=env, capture_output=True, text=True, timeout=60)
    assert root.returncode == 0, root.stdout + root.stderr
    assert "install -y -qq --no-install-recommends prometheus" in calls.read_text()
    again = subprocess.run([shutil.which("make"), *make[1:]], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and calls.read_text().count("prometheus") == 1, "installed once, then found"


def test_the_rejection_ratio_counts_calls_as_the_dashboard_does():
    """Probes are not calls: KServe probes /v2/health/*, and counting them diluted the ratio the
    QuickNetRejecting alert reads, while the dashboard left them out."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dashboard", DEPLOY / "grafana" / "make_dashboard.py")
    dashboard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dashboard)
    probes = re.search(r'endpoint!~"([^"]+)"', dashboard.CALLS).group(1)
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    (ratio,) = [r for g in rules["groups"] for r in g["rules"] if r.get("record") == "quicknet:rejections:ratio_rate5m"]
    assert f'quicknet_request_duration_seconds_count{{endpoint!~"{probes}"}}' in ratio["expr"], ratio["expr"]


def test_prometheus_rules(exported_metrics):
    rules = DEPLOY / "prometheus" / "rules.yml"
    assert shutil.which("promtool"), "promtool is missing: `make test` installs it (Debian's prometheus)"
    res = run("promtool", "check", "rules", str(rules))
    assert res.returncode == 0, res.stdout + res.stderr
    res = run("promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    doc = yaml.safe_load(rules.read_text())
    exprs = [r["expr"] for g in doc["groups"] for r in g["rules"]]
    assert {r.get("alert") for g in doc["groups"] for r in g["rules"]} >= {
        "QuickNetHighP99Latency",
        "QuickNetRejecting",
        "QuickNetNotReady",
        "QuickNetDown",
    }
    res = run("promtool", "test", "rules", str(DEPLOY / "prometheus" / "rules_test.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    for expr in exprs:
        for name in _metric_names(expr):
            assert _exported(name, exported_metrics), f"rules use {name}, which the server does not export"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_links_its_runbook_section():
    """Each alert's runbook_url names a section of deploy/RUNBOOK.md written for it, and the
    runbook has no section for an alert that no longer exists."""
    doc = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"] if "alert" in r]
    alerts = {r["alert"]: r["annotations"].get("runbook_url") for r in rules}
    sections = dict(re.findall(r"^## (\S+)\n(.*?)(?=^## |\Z)", (DEPLOY / "RUNBOOK.md").read_text(), re.M | re.S))
    assert set(sections) == set(alerts)
    for alert, url in alerts.items():
        assert url == f"deploy/RUNBOOK.md#{_anchor(alert)}", (alert, url)
        assert all(f"**{part}.**" in sections[alert] for part in ("What fired", "Look first")), alert
        assert (REPO / url.split("#")[0]).is_file()


def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "quicknet.json").read_text())


def _panels(dash: dict) -> list[dict]:
    """Every graph, those inside rows (a collapsed row holds its panels) included."""
    out = []
    for p in dash["panels"]:
        out += p.get("panels", []) if p["type"] == "row" else [p]
    return out


def test_grafana_dashboard_queries_exported_metrics(exported_metrics):
    exprs = [t["expr"] for p in _panels(_dashboard()) for t in p["targets"]]
    assert len(exprs) >= 8
    used = set().union(*(_metric_names(e) for e in exprs))
    for name in used:
        assert _exported(name, exported_metrics), f"dashboard uses {name}, which the server does not export"
    for needed in (
        "quicknet_images_total",
        "quicknet_queue_images",
        "quicknet_batch_size_sum",
        "quicknet_rejections_total",
        "quicknet_gpu_utilization_ratio",
    ):
        assert needed in used
    processes = {n for e in exprs for n in re.findall(r"\bprocess_[a-z_]+", e)}
    assert processes == {"process_cpu_seconds_total", "process_resident_memory_bytes"}
    assert processes <= exported_metrics, "the server exports its process metrics"


def test_the_dashboard_answers_what_an_operator_asks_first():
    """Mean batch size as images over batches (not `le` buckets as lines), traffic per model
    version, model state and loads, process CPU and memory, latency per protocol; GPU panels only
    in a collapsed row (a CPU-only server shows one closed header, not empty graphs)."""
    dash = _dashboard()
    panels = {p["title"]: p for p in _panels(dash)}
    exprs = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in panels.items()}
    assert not any("_bucket" in e and "histogram_quantile" not in e for e in exprs.values()), "buckets as lines"
    (batch,) = [t for t in exprs if t.startswith("Mean batch size")]
    assert re.search(r"quicknet_batch_size_sum.*\) / clamp_min\(.*quicknet_batch_size_count", exprs[batch])
    (traffic,) = [t for t in exprs if "by model version" in t]
    assert "sum by (model, version)" in exprs[traffic]
    (state,) = [t for t in exprs if "READY" in t]
    assert all(m in exprs[state] for m in ("quicknet_model_state", "quicknet_model_loads_total"))
    assert 'name=~"$model"' in exprs[state], "the model gauges label it `name`"
    assert any("process_cpu_seconds_total" in e for e in exprs.values())
    assert any("process_resident_memory_bytes" in e for e in exprs.values())
    (by_protocol,) = [t for t in exprs if "by protocol" in t]
    assert "sum by (le, protocol)" in exprs[by_protocol]
    rows = [p for p in dash["panels"] if p["type"] == "row"]
    (gpu_row,) = [r for r in rows if r["title"].startswith("GPU")]
    assert gpu_row["collapsed"] is True
    in_row = {t["expr"] for p in gpu_row["panels"] for t in p["targets"]}
    outside = [t["expr"] for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]
    assert in_row and all("quicknet_gpu_" in e for e in in_row)
    assert not any("quicknet_gpu_" in e for e in outside), "GPU queries only in the GPU row"
    ids = [p["id"] for p in [*dash["panels"], *_panels(dash)]]
    assert len(set(ids)) == len(_panels(dash)) + len(rows), "every panel and row has its own id"


def test_the_dashboard_is_what_its_script_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dashboard", DEPLOY / "grafana" / "make_dashboard.py")
    make_dashboard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_dashboard)
    assert (DEPLOY / "grafana" / "dashboards" / "quicknet.json").read_text() == make_dashboard.render(), (
        "run python deploy/grafana/make_dashboard.py"
    )


def test_the_dashboard_filters_by_instance_and_model_and_keeps_units_apart():
    dash = _dashboard()
    assert {v["name"] for v in dash["templating"]["list"]} == {"instance", "model"}
    for p in _panels(dash):
        for t in p["targets"]:
            if "quicknet_" in t["expr"]:
                assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
            per_model = ("quicknet_images_total", "quicknet_queue_images", "quicknet_batch_size_sum")
            if any(f"{m}{{" in t["expr"] for m in per_model):
                assert 'model=~"$model"' in t["expr"], (p["title"], t["expr"])
            if "quicknet_request_duration_seconds_bucket" in t["expr"]:
                assert 'code=~"200|OK"' in t["expr"], "latency of successful inference only"
        units = {"quicknet_gpu_memory_used_bytes": "bytes", "quicknet_gpu_utilization_ratio": "percentunit"}
        for metric, unit in units.items():
            if any(metric in t["expr"] for t in p["targets"]):
                assert p["fieldConfig"]["defaults"]["unit"] == unit, p["title"]
    assert any("Error rate" in p["title"] for p in _panels(dash))


def _unknown_fields(isvc: dict) -> list[str]:
    res = subprocess.run(
        [sys.executable, "-m", "tests.kserve_fields"],
        input=yaml.safe_dump(isvc),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_the_kserve_inference_service_uses_only_kserve_fields():
    isvc = yaml.safe_load(KSERVE.read_text())
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert _unknown_fields(isvc) == []
    broken = {**isvc, "spec": {"predictor": {**isvc["spec"]["predictor"], "replicas": 2}}}
    assert _unknown_fields(broken) == [".spec.predictor.replicas: not a field of V1beta1PredictorSpec"]


def test_the_kserve_predictor_is_a_valid_pod(tmp_path):
    """The predictor's pod fields, as the Pod KServe makes of them, pass Kubernetes' strict schema."""
    predictor = _kserve_predictor()
    pod_fields = {"containers", "securityContext", "volumes", "terminationGracePeriodSeconds"}
    pod_fields |= {"automountServiceAccountToken"}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "quicknet-predictor"}}
    pod["spec"] = {k: v for k, v in predictor.items() if k in pod_fields}
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(pod))
    res = run(str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_kserve_predictor_probes_the_v2_health_the_server_serves(server):
    isvc = yaml.safe_load(KSERVE.read_text())
    container = isvc["spec"]["predictor"]["containers"][0]
    assert container["name"] == "kserve-container" and container["ports"][0]["containerPort"] == 8000
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        path = container[probe]["httpGet"]["path"]
        assert path.startswith("/v2/health/") and httpx.get(f"{server.url}{path}").status_code == 200, probe
    annotations = isvc["metadata"]["annotations"]
    assert "quicknet_images_total" in httpx.get(f"{server.url}{annotations['prometheus.kserve.io/path']}").text
    assert int(annotations["prometheus.kserve.io/port"]) == container["ports"][0]["containerPort"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert annotations["serving.kserve.io/autoscalerClass"] == "hpa"
    grace = isvc["spec"]["predictor"]["terminationGracePeriodSeconds"]
    drain = next(float(e["value"]) for e in container["env"] if e["name"] == "QUICKNET_DRAIN_SECONDS")
    assert grace > drain + container["lifecycle"]["preStop"]["sleep"]["seconds"]


def test_what_the_readmes_say_a_cluster_and_tracing_need_is_what_the_files_ask(rendered, compose):
    """deploy/README's cluster needs follow from the manifests (the preStop hook's built-in sleep
    is GA in Kubernetes 1.30; (minReplicas + maxSurge) pods of the CPU request), and the README's
    tracing command is what compose needs: tracing off unless QUICKNET_OTLP_ENDPOINT names a
    collector, Jaeger (the OTLP receiver the command names) only in the tracing profile."""
    deploy_readme = " ".join((DEPLOY / "README.md").read_text().split())
    deployment = _deployment(rendered["cpu"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "sleep" in container["lifecycle"]["preStop"] and "Kubernetes 1.30 or later" in deploy_readme
    (hpa,) = [d for d in rendered["cpu"] if d["kind"] == "HorizontalPodAutoscaler"]
    pods = hpa["spec"]["minReplicas"] + deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    assert f"so {pods * int(container['resources']['requests']['cpu'])} free CPUs" in deploy_readme

    command = "QUICKNET_OTLP_ENDPOINT=http://jaeger:4318 docker compose --profile tracing up -d"
    assert command in " ".join((REPO / "README.md").read_text().split()) and command in deploy_readme
    for name, service in compose["services"].items():
        if name.startswith("quicknet"):
            assert service["environment"]["QUICKNET_OTLP_ENDPOINT"] == "${QUICKNET_OTLP_ENDPOINT:-}", name
    assert compose["services"]["jaeger"]["profiles"] == ["tracing"]
    assert compose["services"]["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")  # OTLP/HTTP on 4318
