"""Packaging: the lock files agree with pyproject.toml's pins and with the environment `make`
built, and the licence pyproject declares is the one shipped."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from quicknet.testing import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _locked(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements" / name).read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line):
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def _pins(groups: list[str]) -> dict[str, str]:
    requirements = list(PYPROJECT["dependencies"])
    for group in groups:
        requirements += PYPROJECT["optional-dependencies"][group]
    pins = {}
    for text in requirements:
        req = Requirement(text)
        (spec,) = req.specifier  # every direct dependency is pinned exactly
        assert spec.operator == "==", text
        pins[canonicalize_name(req.name)] = spec.version
    return pins


LOCKS = [("serve.lock", ["serve", "client"]), ("dev.lock", ["serve", "client", "build", "dev"])]


@pytest.mark.parametrize(("lock", "groups"), LOCKS)
def test_the_lock_holds_every_pin_of_pyproject(lock, groups):
    locked = _locked(lock)
    for name, version in _pins(groups).items():
        assert name in locked, f"{name} is missing from requirements/{lock}: run `make lock`"
        assert locked[name].split("+")[0] == version, f"{name}: pyproject {version}, {lock} {locked[name]}: `make lock`"


def test_the_serve_lock_is_the_dev_lock_where_they_overlap():
    """A CPU server and the test environment run the same versions of what they share."""
    serve, dev = _locked("serve.lock"), _locked("dev.lock")
    assert {name: v for name, v in serve.items() if dev.get(name) != v} == {}


def test_the_environment_is_the_locked_one():
    """`make venv-dev` installs under the lock as constraints: what runs the tests is what is locked."""
    drift = {}
    for name, version in _locked("dev.lock").items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            drift[name] = "not installed"
            continue
        if installed != version:
            drift[name] = installed
    assert drift == {}, f"installed versions differ from requirements/dev.lock: {drift}"


def test_the_declared_licence_is_shipped():
    assert PYPROJECT["license"] == "MIT"
    assert (REPO / "LICENSE").read_text().startswith("MIT License")


def test_make_serve_sets_up_what_the_readmes_first_commands_run():
    """`make serve`'s venv runs the service and the README's client commands (`quicknet classify`
    with its progress bar: the client extra), under the serve lock; PYTHON picks another interpreter."""
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^\$\(VENV\)/\.installed-serve:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert recipe and "-c requirements/serve.lock -e '.[serve,client]'" in recipe.group(1), recipe
    assert re.search(r"^PYTHON \?= python3\.11$", makefile, re.MULTILINE), "make serve PYTHON=python3.12 overrides it"
