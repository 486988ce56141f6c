"""The load generators: `hey`'s CSV (the REST loader of `benchmarks.loadgen` and of the GPU serve
run, which the CPU dry run never starts) read into a table row; the gRPC loader's two bodies."""

from __future__ import annotations

import pytest

from benchmarks.loadgen import parse_hey_csv

# `hey -o csv` as Debian's hey 0.1.4 (what `make gpu-wheels` puts in .gpu/bin) writes it, captured
# here; the status codes set to four 200s and two 429s.
HEY_CSV = """response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
0.0019,0.0002,0.0000,0.0001,0.0015,0.0001,200,0.0003
0.0020,0.0006,0.0000,0.0001,0.0013,0.0000,200,0.0003
0.0007,0.0001,0.0000,0.0000,0.0005,0.0001,429,0.0022
0.0006,0.0001,0.0000,0.0000,0.0005,0.0000,200,0.0029
0.0014,0.0000,0.0000,0.0000,0.0012,0.0002,429,0.0024
0.0005,0.0001,0.0000,0.0000,0.0003,0.0001,200,0.0037
"""


def test_hey_csv_is_read_into_a_table_row():
    row = parse_hey_csv(HEY_CSV, n_images=8, concurrency=2)
    elapsed = 0.0037 + 0.0005  # the last answer's offset plus its response time
    assert (row["requests"], row["ok"], row["rejected"]) == (6, 4, 2)
    assert row["requests_s"] == pytest.approx(4 / elapsed) and row["served_img_s"] == pytest.approx(32 / elapsed)
    assert row["p50_ms"] == pytest.approx(1.05) and row["p99_ms"] == pytest.approx(1.995)
    assert row["p90_ms"] == pytest.approx(1.95)
    assert (row["client"], row["protocol"], row["concurrency"], row["images_per_request"]) == ("hey", "rest", 2, 8)


@pytest.mark.parametrize("out", ["", HEY_CSV.splitlines()[0] + "\n", "Error: dial tcp: connection refused\n"])
def test_a_hey_run_with_no_answered_request_is_one_clear_error(out):
    """Transport errors have no CSV line: an output without rows (or without hey's columns) is an
    error naming it, not a division by zero or a percentile of nothing."""
    with pytest.raises(RuntimeError, match="hey answered no request"):
        parse_hey_csv(out, n_images=1, concurrency=1)


def test_the_grpc_loader_sends_encoded_images_as_the_python_client_does(tmp_path, monkeypatch):
    """`benchmarks.engine_core --request grpc` measures a front on what the Python client sends for a
    file (the PNG in `Image.encoded`), where the GPU run's `grpc` case sends raw pixels: both answer."""
    import asyncio

    from benchmarks import loadgen
    from quicknet.testing import FAST_MODEL, start_server

    sent: list[tuple[str, bytes]] = []
    real = loadgen._grpc_call

    def spy(stub, pb, blobs, field="pixels"):
        sent.append((field, blobs[0]))
        return real(stub, pb, blobs, field)

    monkeypatch.setattr(loadgen, "_grpc_call", spy)
    srv = start_server(tmp_path, access_log="false")
    try:
        for protocol in ("grpc-png", "grpc"):
            sent.clear()
            row = asyncio.run(loadgen.run_case(protocol, srv.grpc_target, 1, 2, 0.0, 0.5, FAST_MODEL, channels=2))
            assert row["ok"] > 0 and row["rejected"] == 0, (protocol, row)
            field, blob = sent[0]
            if protocol == "grpc-png":
                assert field == "encoded" and blob.startswith(b"\x89PNG"), blob[:8]
            else:
                assert field == "pixels" and len(blob) == 32 * 32 * 3
    finally:
        assert srv.stop() == 0


def test_the_grpc_floor_measures_an_echo_server_of_each_kind():
    """`benchmarks.grpc_floor` (benchmarks/README.md, "gRPC's own floor"): both kinds of server start,
    answer the client's calls, and their CPU a call is counted; a kind it does not know is one line."""
    import subprocess
    import sys

    from benchmarks.grpc_floor import measure

    for kind in ("aio", "sync2"):
        row = measure(kind, 2, 0.5)
        assert row["server"] == kind and row["calls_s"] > 0 and row["server_us_per_call"] > 0, row
        assert row["client_us_per_call"] > 0, row
    for kinds in (["sync"], ["sync0", "aio"]):
        bad = subprocess.run([sys.executable, "-m", "benchmarks.grpc_floor", "--servers", *kinds], capture_output=True)
        assert (
            bad.returncode != 0
            and bad.stderr.decode().strip() == f"--servers: aio or syncN (N threads), got {kinds[0]}"
        )
