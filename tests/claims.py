"""tests/CLAIMS.md read as data: the tests each README claim names, and the few allowed to skip in CI.

`tests/conftest.py` fails a CI run (`CI` set) in which a test named by a claim was skipped: a claim
whose test skipped was not checked, and a skip reason scrolls by unseen."""

from __future__ import annotations

import re
from pathlib import Path

CLAIMS = Path(__file__).with_name("CLAIMS.md")
TEST = re.compile(r"`(tests/test_\w+\.py)::(test_\w+)`")
EXEMPT_HEADING = "## Tests that may skip in CI"


def _sections(text: str) -> tuple[str, str]:
    """(the claims, the exemptions): the exemptions are the section under EXEMPT_HEADING."""
    claims, _, rest = text.partition(EXEMPT_HEADING)
    exempt, _, after = rest.partition("\n## ")
    return claims + ("\n## " + after if after else ""), exempt


def claimed_tests(text: str | None = None) -> list[tuple[str, str]]:
    """(file, test function) for every test a claim names, in order, repeats kept."""
    return TEST.findall(_sections(CLAIMS.read_text() if text is None else text)[0])


def exempt_tests(text: str | None = None) -> dict[str, str]:
    """`file::test` -> why it may skip in CI (lines `- \\`tests/...::test_x\\`: reason`)."""
    _, exempt = _sections(CLAIMS.read_text() if text is None else text)
    found = re.findall(r"^- `(tests/test_\w+\.py::test_\w+)`:\s*(.+)$", exempt, re.M)
    return dict(found)


def claimed_skips(skipped_nodeids: list[str], text: str | None = None) -> list[str]:
    """The skipped node ids (parameters and all) whose test a claim names and no exemption covers."""
    text = CLAIMS.read_text() if text is None else text
    claimed = {f"{f}::{t}" for f, t in claimed_tests(text)}
    exempt = exempt_tests(text)
    return [n for n in skipped_nodeids if (base := n.split("[", 1)[0]) in claimed and base not in exempt]
