"""The reliability report's script in miniature (the full run is `python -m benchmarks.reliability`):
it drives a real server through an overload burst and reports no 5xx and no lost request."""

from __future__ import annotations

import re
import subprocess
import sys

from quicknet.testing import REPO


def test_the_overload_scenario_runs_and_reports():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.reliability", "--quick", "--scenarios", "overload", "--no-save"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("overload"))
    cells = [c.strip() for c in row.split("|")]
    assert int(cells[3]) > 0, row  # requests sent
    assert cells[4] == "0" and cells[5] == "0", f"5xx and lost: {row}"
    refused = int(re.search(r"refused_429\W+(\d+)", result.stdout)[1])
    with_retry_after = int(re.search(r"refused_with_retry_after\W+(\d+)", result.stdout)[1])
    assert refused > 0 and with_retry_after == refused, "the burst was refused, and every refusal said when to retry"
