"""Triton's own load generator, `perf_analyzer` 2.60.0, against a real `quicknet serve`: over HTTP
and gRPC, one and eight images per request, it runs to completion. After every measurement window
it reads our statistics extension and aborts when they break Triton's semantics (e.g. "Server side
statistics compute counts must be the same"), so a clean exit also checks those.

perf_analyzer is installed into `.perf_analyzer/` by `benchmarks/perf_analyzer.py` (the PyPI
wheel plus Debian trixie's glibc, nothing system-wide); where that cannot be done (offline, not
x86_64 Linux, no apt) the tests skip with the reason. A few hundred milliseconds of measurement
each: speed lives in `python -m benchmarks.perf_analyzer`, not here."""

from __future__ import annotations

import pytest

from benchmarks.perf_analyzer import BrokenInstall, InstallError, install, run
from quicknet.testing import start_server

MODEL = "quicknet-xs"


@pytest.fixture(scope="module")
def perf_analyzer():
    try:
        return install()
    except BrokenInstall:
        raise  # installed but not starting: ours to fix, never a skip
    except InstallError as e:
        pytest.skip(f"perf_analyzer cannot be installed here: {e}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, perf_analyzer):
    srv = start_server(tmp_path_factory.mktemp("logs"))
    yield srv
    srv.stop()


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_to_completion(perf_analyzer, server, protocol, batch):
    target = f"127.0.0.1:{server.http_port}" if protocol == "http" else server.grpc_target
    # -s 1000: any three windows count as stable (the 2 shared cores are noisy; speed is not the point)
    rows, proc = run(
        perf_analyzer,
        model=MODEL,
        protocol=protocol,
        target=target,
        batch=batch,
        concurrency="1:2",
        interval_ms=200,
        stability=1000,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Server side statistics" not in output and "error" not in output.lower(), output
    assert [r["concurrency"] for r in rows] == [1, 2], output
    assert all(r["infer_s"] > 0 and r["p99_ms"] > 0 for r in rows), rows
    # the server's side of the report, from our statistics: every request executed, none failed
    assert output.count("Successful request count") == 2, output
    assert f"Batch size: {batch}" in output, output
