from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see "two workers" below

import pytest

from quicknet.build import data


@pytest.fixture(scope="session")
def cifar() -> data.Dataset:
    """The real CIFAR-10 JPEG copy from ../shared/data (decoded once, then cached)."""
    return data.load()


@pytest.fixture(scope="session")
def test_images(cifar: data.Dataset) -> data.Split:
    return cifar.test.sample(512, seed=7)


@pytest.fixture(scope="session")
def hung_server(tmp_path_factory):
    """`quicknet serve` with two front processes whose every engine batch first sleeps (tests/hung.py):
    one for the whole session, shared by the deadline and cancellation tests of every front."""
    from quicknet.testing import start_server
    from tests.hung import HANG_S

    srv = start_server(
        tmp_path_factory.mktemp("hung"), workers=2, fault_injection=f"hang-every=1,hang-seconds={HANG_S}"
    )
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(autouse=True)
def _isolated_service_state(monkeypatch):
    """Every test starts from the same service state, whatever ran before it (pytest-randomly):
    no server setting (`QUICKNET_<FIELD>`), client or progress setting, or `OTEL_*` switch from the
    caller's environment reaches a test (the subprocess helpers strip QUICKNET_* too;
    QUICKNET_DATA and QUICKNET_CACHE, which say where the data is, stay), and no served-model label
    is left in this thread's context by a test that called `Runtime.serving()` outside a request
    task."""
    try:
        from quicknet.serve import metrics
        from quicknet.serve.config import Settings
    except ImportError:  # a build-only environment
        yield
        return
    for field in Settings.model_fields:
        monkeypatch.delenv(f"QUICKNET_{field.upper()}", raising=False)
    for name in ("QUICKNET_PROGRESS", "QUICKNET_API_KEY", "QUICKNET_URL"):  # the client's and the build's
        monkeypatch.delenv(name, raising=False)
    for name in [n for n in os.environ if n.startswith("OTEL_")]:  # OpenTelemetry's own switches
        monkeypatch.delenv(name)
    token = metrics.SERVED.set(("", ""))
    yield
    metrics.SERVED.reset(token)


# --- two workers (`make test` runs pytest-xdist) ------------------------------------------------

# The modules that train or run torch share one worker, one test at a time: two of them at once
# oversubscribe two cores badly. The other CPU-heavy modules (podman builds, 10k-image scoring with
# ONNX Runtime, a saturating load test) share a second group. Every other module stays whole on one
# worker (its server fixtures start once). A scheduler of our own, because xdist 3.8's
# `xdist_group` marker does nothing under pytest 9 (it renames `item._nodeid`, which pytest 9 no
# longer reads). OMP_WAIT_POLICY=PASSIVE (set at the top of this file): torch's OpenMP threads
# sleep at a barrier instead of spinning, which on 2 shared cores took the tiny training run from
# 87 s to 59 s beside one busy process (27 s alone).
GROUPS = {
    "test_build_pipeline.py": "torch",
    "test_fold_export.py": "torch",
    "test_gpu_engine.py": "torch",
    "test_gpu_jobs.py": "torch",
    "test_train.py": "torch",
    "test_containers.py": "heavy",
    "test_reliability.py": "heavy",
    "test_shipped_model.py": "heavy",
}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: without xdist (`-p no:xdist`) it is simply not called
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    from xdist.scheduler import LoadFileScheduling

    class Grouped(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return GROUPS.get(path.rsplit("/", 1)[-1], path)

    return Grouped(config, log)


# --- a claim's test may not skip in CI ---------------------------------------------------------

_SKIPPED: list[str] = []
_CLAIMED_SKIPS: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With `CI` set (as CI services set it), a skipped test that backs a tests/CLAIMS.md row fails
    the run: that claim went unchecked. Exemptions, each with its reason, are listed in CLAIMS.md."""
    if not os.environ.get("CI") or not _SKIPPED:
        return
    from tests.claims import claimed_skips

    _CLAIMED_SKIPS[:] = claimed_skips(_SKIPPED)
    if _CLAIMED_SKIPS and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if _CLAIMED_SKIPS:
        terminalreporter.section("claims left unchecked", red=True)
        terminalreporter.line(
            "CI is set and these tests back tests/CLAIMS.md rows, yet skipped (reasons above, -rs); "
            "install what they need or list them under 'Tests that may skip in CI' with the reason:"
        )
        for nodeid in _CLAIMED_SKIPS:
            terminalreporter.line(f"  {nodeid}", red=True)
