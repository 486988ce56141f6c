"""tests/CLAIMS.md maps each README claim to the tests that check it: every test it names exists,
every claim of the kinds the README enumerates has a row, and in CI a claim's test may not skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.claims import claimed_skips, claimed_tests, exempt_tests

REPO = Path(__file__).resolve().parents[1]


def test_every_claimed_test_exists():
    named = claimed_tests()
    assert len(named) > 40
    missing = [f"{f}::{t}" for f, t in named if f"def {t}(" not in (REPO / f).read_text()]
    assert not missing, f"CLAIMS.md names tests that do not exist: {missing}"
    stale = [t for t in exempt_tests() if f"def {t.split('::')[1]}(" not in (REPO / t.split("::")[0]).read_text()]
    assert not stale, f"CLAIMS.md exempts tests that do not exist: {stale}"


def test_a_skipped_claim_is_found_by_its_node_id():
    text = (
        "| a claim | `tests/test_a.py::test_one`, `tests/test_a.py::test_two` |\n\n"
        "## Tests that may skip in CI\n\n- `tests/test_a.py::test_two`: needs a GPU\n"
    )
    skipped = ["tests/test_a.py::test_one[rest]", "tests/test_a.py::test_two", "tests/test_b.py::test_one"]
    assert claimed_skips(skipped, text) == ["tests/test_a.py::test_one[rest]"]
    assert exempt_tests(text) == {"tests/test_a.py::test_two": "needs a GPU"}


def test_ci_fails_when_a_claims_test_skips(tmp_path):
    """A plugin skips every test; the claimed one skipped fails the run only where CI is set,
    and the run names it and prints the skip's reason (-rs)."""
    (tmp_path / "skip_all.py").write_text(
        "import pytest\n\ndef pytest_runtest_setup(item):\n    pytest.skip('no tool here')\n"
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:randomly", "-p", "skip_all", "--no-header"]
    cmd.append("tests/test_claims.py::test_a_skipped_claim_is_found_by_its_node_id")  # CLAIMS.md names it
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    local = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    ci = subprocess.run(cmd, cwd=REPO, env={**env, "CI": "true"}, capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stdout + local.stderr
    assert "SKIPPED" in local.stdout and "no tool here" in local.stdout, "the reason is printed"
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "claims left unchecked" in ci.stdout
    assert "tests/test_claims.py::test_a_skipped_claim_is_found_by_its_node_id" in ci.stdout.split("unchecked")[1]
