"""Every `curl` command in the README runs as written, from the repository root, against a real
server (its port swapped in), and answers what the README says."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from quicknet.testing import REPO, SHIPPED_STORE, start_server


def readme_curls() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.startswith("curl ")]


def test_the_readme_has_curl_examples_for_every_body_form():
    commands = readme_curls()
    assert len(commands) >= 6
    for form in ("-F image=@", "-F images=@", "image/png", "application/json", "application/octet-stream"):
        assert any(form in c for c in commands), form


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("logs"), store=SHIPPED_STORE)  # what `make serve` serves
    yield srv
    assert srv.stop() == 0


@pytest.mark.parametrize("command", [c for c in readme_curls() if "https://" not in c])  # TLS: tests/test_tls.py
def test_readme_curl_runs_as_written(server, command):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    runnable = command.replace("localhost:8000", f"127.0.0.1:{server.http_port}")
    done = subprocess.run(["bash", "-c", runnable], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout.strip()
    if "| grep" in command:
        assert out, "the README's pipeline finds what it greps for"
        return
    answer = json.loads(out)
    if "/v2/models/" in command and '"classification"' in command:  # KServe v2, the classification extension
        assert answer["outputs"][0]["shape"] == [1, 3] and answer["outputs"][0]["data"][0].endswith(":3:cat"), answer
        return
    if "/classify" in command or "/predictions/" in command:
        assert "error" not in answer, answer
        predictions = answer["predictions"]
        if "/predictions/" in command:  # TorchServe's path: a list per image, always
            assert [len(row) for row in predictions] == [5] and predictions[0][0]["label"] == "cat"
            return
        if "examples/cat.png" in command and "images=" not in command:
            assert predictions[0]["label"] == "cat", "the README's cat is classified a cat"
        if "top_k=3" in command:
            assert len(predictions) == 2 and all(len(p) == 3 for p in predictions)


def test_the_readme_names_the_classes_the_models_answer_with():
    from quicknet import store

    named = re.search(r"CIFAR-10's ten classes \(([^)]*)\)", (REPO / "README.md").read_text())
    assert named, "the README's opening says what the model answers"
    classes = [c.strip() for c in named.group(1).replace("\n", " ").split(",")]
    for model in ("quicknet", "quicknet-xs"):
        assert store.get_version(SHIPPED_STORE, model).metadata["labels"] == classes, model


def test_make_serve_answers_with_the_full_quicknet_by_default(server):
    """`make serve` serves the store's DEFAULT, the GPU-trained full quicknet; quicknet-xs beside it."""
    import httpx

    models = httpx.get(f"{server.url}/v1/models").json()["models"]
    default = next(m for m in models if m["default"])
    assert default["name"] == "quicknet" == (SHIPPED_STORE / "DEFAULT").read_text().strip()
    assert {m["name"] for m in models} == {"quicknet", "quicknet-xs"}
    answer = httpx.post(f"{server.url}/classify", files={"image": (REPO / "examples/cat.png").read_bytes()}).json()
    assert answer["model"] == "quicknet" and answer["predictions"][0]["label"] == "cat"
    config = httpx.get(f"{server.url}/v2/models/quicknet/config").json()
    assert config["max_batch_size"] == 8, "its batch policy ships with it (model_store/quicknet/config.json)"
    small = httpx.get(f"{server.url}/v2/models/quicknet-xs/config").json()
    assert small["max_batch_size"] == 16, "and quicknet-xs's (model_store/quicknet-xs/config.json)"


def test_the_metrics_section_names_every_metric_with_its_labels():
    """README "Metrics": every metric the service declares, each with exactly the labels it carries
    (in braces; none where it has none), and no name the service does not have."""
    from prometheus_client import Counter, Gauge, Histogram

    from quicknet.serve import metrics

    section = (REPO / "README.md").read_text().split("### Metrics (`/metrics`", 1)[1].split("\n### ", 1)[0]
    found = re.findall(r"`(quicknet_[a-z0-9_]+)(?:\{([a-z0-9_,]+)\})?`", section)
    named = {name.removesuffix("_total"): labels for name, labels in found}
    declared = {
        m._name.removesuffix("_total"): ",".join(m._labelnames)
        for m in vars(metrics).values()
        if isinstance(m, Counter | Gauge | Histogram)
    }
    assert set(named) == set(declared), (set(declared) - set(named), set(named) - set(declared))
    assert {name: labels or "" for name, labels in named.items()} == declared
