"""tests/CLAIMS.md maps each README claim to the tests that check it: every test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

CLAIMS = Path(__file__).with_name("CLAIMS.md")


def claimed_tests() -> list[tuple[str, str]]:
    return re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", CLAIMS.read_text())


def test_every_claimed_test_exists():
    root = Path(__file__).resolve().parents[1]
    named = claimed_tests()
    assert len(named) > 40
    missing = [f"{f}::{t}" for f, t in named if f"def {t}(" not in (root / f).read_text()]
    assert not missing, f"CLAIMS.md names tests that do not exist: {missing}"
