"""A model's own `config.json` in the store (as Triton's config.pbtxt): its batch policy, instances,
precision, threads and version policy win for that model; the flags are the defaults."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from quicknet.errors import StoreError
from quicknet.serve.config import Settings
from quicknet.testing import FAST_MODEL, STORE, free_port, start_server


def _store(tmp_path, config: dict | str | None):
    root = tmp_path / "store"
    shutil.copytree(STORE, root)
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (root / FAST_MODEL / "config.json").write_text(text)
    return root


def test_a_model_config_wins_for_its_model_and_the_flags_fill_the_rest(tmp_path):
    root = _store(tmp_path, {"max_batch_size": 4, "max_queue_delay_ms": 2.5, "precision": "fp32"})
    flags = Settings(model_store=root, max_batch_size=64, instances=3)
    mine = flags.for_model(FAST_MODEL)
    assert (mine.max_batch_size, mine.max_queue_delay_ms, mine.precision) == (4, 2.5, "fp32")
    assert mine.instances == 3, "what the file does not set comes from the flags"
    assert flags.max_batch_size == 64, "the server-wide settings are untouched"
    assert Settings(model_store=_store(tmp_path / "bare", None)).for_model(FAST_MODEL).max_batch_size == 64


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"max_batch_size": 0}, "quicknet-xs/config.json: max_batch_size: Input should be greater than or equal to 1"),
        ({"max_batch": 8}, "quicknet-xs/config.json: unknown setting 'max_batch'; a model may set instances, "),
        ({"version_policy": "newest"}, "quicknet-xs/config.json: version_policy: "),
        ("{not json", "quicknet-xs/config.json is not valid JSON"),
        ("[1, 2]", "quicknet-xs/config.json must be a JSON object"),
    ],
)
def test_a_wrong_model_config_is_one_line_naming_the_file(tmp_path, config, message):
    with pytest.raises(StoreError) as e:
        Settings(model_store=_store(tmp_path, config)).for_model(FAST_MODEL)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_the_server_runs_a_model_by_its_config_and_refuses_a_wrong_one_before_loading(tmp_path):
    import subprocess
    import sys

    from quicknet.testing import REPO

    root = _store(tmp_path, {"max_batch_size": 4, "max_queue_delay_ms": 3, "instances": 2})
    srv = start_server(tmp_path, store=root, max_batch_size=32)
    try:
        config = httpx.get(f"{srv.url}/v2/models/{FAST_MODEL}/config").json()
        assert config["max_batch_size"] == 4
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 3000
        assert config["instance_group"][0]["count"] == 2
    finally:
        assert srv.stop() == 0, srv.log()

    from quicknet.testing import publish_shipped

    publish_shipped(root, "twin")  # a second model, after the default: its config is checked before any load
    (root / "twin" / "config.json").write_text('{"instances": -1}')
    (root / FAST_MODEL / "config.json").unlink()
    env = {"QUICKNET_MODEL_STORE": str(root), "QUICKNET_HTTP_PORT": str(free_port())}
    env["QUICKNET_GRPC_PORT"] = str(free_port())
    out = subprocess.run(
        [sys.executable, "-m", "quicknet", "serve"], cwd=REPO, capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "twin/config.json: instances: " in out.stderr and "loaded" not in out.stderr


def test_version_policies_flag_wins_over_a_model_config_which_is_checked_anyway(tmp_path):
    from quicknet.serve.engine import Engine

    root = _store(tmp_path, {"version_policy": "latest:2"})
    assert Engine(Settings(model_store=root)).policy_for(FAST_MODEL) == "latest:2"
    flags = Settings(model_store=root, version_policies={FAST_MODEL: "all"})
    assert Engine(flags).policy_for(FAST_MODEL) == "all", "--version-policies names the model: it wins"
    (root / FAST_MODEL / "config.json").write_text('{"max_batch_size": 0}')
    with pytest.raises(StoreError, match="max_batch_size"):
        Engine(flags).policy_for(FAST_MODEL)


def test_a_version_policy_that_picks_nothing_says_what_there_is(tmp_path):
    import asyncio

    from quicknet.serve.engine import Engine

    root = _store(tmp_path, {})
    version = max(int(p.name) for p in (root / FAST_MODEL).iterdir() if p.name.isdigit())
    engine = Engine(Settings(model_store=root, version_policy=f"specific:{version + 1}", warmup=False))
    with pytest.raises(StoreError) as err:
        asyncio.run(engine.load())
    assert str(err.value) == (
        f"version policy 'specific:{version + 1}' picks no version of '{FAST_MODEL}' (it has v{version})"
    )


def test_an_engine_section_applies_only_when_that_engine_serves_the_model(tmp_path):
    """A batch policy tuned for ONNX Runtime on 2 cores must not cap the same model on a GPU."""
    root = _store(tmp_path, {"max_queue_delay_ms": 1, "onnxruntime": {"max_batch_size": 8}, "torch": {"instances": 2}})
    flags = Settings(model_store=root, max_batch_size=64)
    cpu, gpu, plain = (flags.for_model(FAST_MODEL, e) for e in ("onnxruntime", "torch", None))
    assert (cpu.max_batch_size, cpu.instances, cpu.max_queue_delay_ms) == (8, 1, 1)
    assert (gpu.max_batch_size, gpu.instances, gpu.max_queue_delay_ms) == (64, 2, 1)
    assert (plain.max_batch_size, plain.instances) == (64, 1)
    for bad, message in (
        ({"torch": {"max_batch_size": 0}}, "quicknet-xs/config.json: torch: max_batch_size: "),
        ({"torch": 8}, "quicknet-xs/config.json: torch: an engine's section must be a JSON object"),
    ):
        (root / FAST_MODEL / "config.json").write_text(json.dumps(bad))
        with pytest.raises(StoreError, match=f"^{message}"):
            flags.for_model(FAST_MODEL, "onnxruntime")  # every section is checked, whichever applies


def test_settings_that_work_against_each_other_are_said_once_at_start():
    from quicknet.serve.config import Settings

    assert Settings(max_queue_images=256, max_images_per_request=256).doubts() == []
    (doubt,) = Settings(max_queue_images=64, max_images_per_request=256).doubts()
    assert doubt.startswith("--max-images-per-request 256 is more than --max-queue-images 64") and "\n" not in doubt
