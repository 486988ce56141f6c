"""tests/CLAIMS.md maps each README claim to the tests that check it: every test it names exists,
every claim of the kinds the README enumerates has a row, and in CI a claim's test may not skip."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.claims import CLAIMS, claimed_skips, claimed_tests, exempt_tests

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

# Settings in the README's table that no CLAIMS row names yet: the gaps, in sight. The list only
# shrinks: a setting here that gains a row fails the test until it is taken off.
UNCLAIMED_SETTINGS = {
    "--preferred-batch-sizes",
    "--version-policy",
    "--version-policies",
    "--default-timeout-ms",
    "--max-image-bytes",
    "--max-request-bytes",
    "--grpc-max-message-bytes",
    "--log-json",
}


def _claims() -> list[str]:
    """The claim (first column) of every row of the claims table."""
    rows = [line for line in CLAIMS.read_text().splitlines() if line.startswith("| ") and "`tests/" in line]
    return [row[2:].split(" | `tests/")[0] for row in rows]


def _names(claims: list[str], flag: str) -> bool:
    return any(re.search(f"`{re.escape(flag)}[` ]", claim) for claim in claims)


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


def test_every_setting_of_the_readme_table_has_a_claim_row():
    """The other direction: the README enumerates its settings in one table; each setting's flag
    is named (in backticks) by a CLAIMS row whose tests use it, or is a listed gap."""
    table = README.split("| setting | default | what |")[1].split("\n\n")[0]
    flags = [f for line in table.splitlines()[2:] for f in re.findall(r"`(--[a-z0-9-]+)`", line.split("|")[1])]
    assert len(flags) > 25 and set(flags) >= UNCLAIMED_SETTINGS
    claims = _claims()
    missing = [f for f in flags if not _names(claims, f) and f not in UNCLAIMED_SETTINGS]
    assert not missing, f"settings in the README's table with no CLAIMS row: {missing}"
    claimed_now = [f for f in UNCLAIMED_SETTINGS if _names(claims, f)]
    assert not claimed_now, f"these have a CLAIMS row now: take them off UNCLAIMED_SETTINGS: {claimed_now}"


def test_every_hardening_bullet_has_a_claim_row():
    """Each bullet of the README's "Hardening" list (`- **Title**`) has a row whose claim starts
    with that title."""
    section = README.split("### Hardening")[1].split("\n## ")[0]
    titles = re.findall(r"^- \*\*(.+?)\*\*", section, re.M)
    assert len(titles) >= 9
    claims = [c.lower() for c in _claims()]
    missing = [t for t in titles if not any(c.startswith(t.lower()) for c in claims)]
    assert not missing, f"Hardening bullets with no CLAIMS row starting with their title: {missing}"
