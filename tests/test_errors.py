"""Every refusal kind is defined once (`quicknet/serve/errors.py`) and every side maps it by that
table: REST, gRPC, and the engine process's wire to a front."""

from __future__ import annotations

import ast
from pathlib import Path

import grpc
import pytest

from quicknet.serve import errors
from quicknet.serve.errors import (
    REFUSALS,
    InputError,
    NotAccepting,
    QueueFull,
    Refusal,
    Unauthenticated,
    from_wire,
    to_wire,
)
from quicknet.serve.transport.grpc import to_rpc_error
from quicknet.serve.transport.http import refusal_to_http

SERVE = Path(errors.__file__).parent


def _one_of_each() -> list[Refusal]:
    made = []
    for cls in REFUSALS.values():
        if cls is QueueFull:
            made.append(QueueFull(3.4))
        elif cls is InputError:
            made += [InputError("bad image"), InputError("too big", 413, "too_large"), InputError("no route", 404)]
        elif cls is NotAccepting:
            made += [NotAccepting("warming up", "not_ready"), NotAccepting("stopping")]
        else:
            made.append(cls(f"a {cls.__name__}"))
    return made


@pytest.mark.parametrize("refusal", _one_of_each(), ids=lambda e: f"{type(e).__name__}-{e.reason}")
def test_rest_and_grpc_answer_each_refusal_by_its_table_entry(refusal):
    http = refusal_to_http(refusal)
    assert (http.status, http.reason, http.headers) == (refusal.http_status, refusal.reason, refusal.headers())
    rpc = to_rpc_error(refusal)
    assert (rpc.code, rpc.reason) == (grpc.StatusCode[refusal.grpc_code], refusal.reason)
    assert (str(http), str(rpc)) == (refusal.http_message(), refusal.rpc_message())


def test_the_table_holds_the_answers_clients_rely_on():
    """The statuses the README and the KServe/Triton clients rely on, each kind once."""
    table = {kind: (cls.http_status, cls.grpc_code) for kind, cls in REFUSALS.items()}
    assert table == {
        "bad_input": (400, "INVALID_ARGUMENT"),
        "queue_full": (429, "RESOURCE_EXHAUSTED"),
        "deadline": (504, "DEADLINE_EXCEEDED"),
        "not_accepting": (503, "UNAVAILABLE"),
        "unauthenticated": (401, "UNAUTHENTICATED"),
        "forbidden": (403, "PERMISSION_DENIED"),
        "not_found": (404, "NOT_FOUND"),
        "repository": (400, "FAILED_PRECONDITION"),
        "engine_error": (500, "INTERNAL"),
    }
    assert refusal_to_http(QueueFull(3.4)).headers == {"Retry-After": "3"}
    assert refusal_to_http(Unauthenticated("x")).headers == {"WWW-Authenticate": 'Bearer realm="quicknet"'}
    assert (InputError("x", 404).grpc_code, InputError("x", 413).grpc_code) == ("NOT_FOUND", "INVALID_ARGUMENT")


@pytest.mark.parametrize("refusal", _one_of_each(), ids=lambda e: f"{type(e).__name__}-{e.reason}")
def test_a_refusal_crosses_the_engine_wire_unchanged(refusal):
    again = from_wire(*to_wire(refusal))
    assert type(again) is type(refusal)
    assert (str(again), again.reason, again.extra(), again.headers()) == (
        str(refusal),
        refusal.reason,
        refusal.extra(),
        refusal.headers(),
    )


def test_every_refusal_kind_is_in_the_table():
    """A kind left out of REFUSALS would cross the engine's wire as an engine failure."""
    assert set(REFUSALS.values()) == set(Refusal.__subclasses__())
    assert all(kind == cls.kind for kind, cls in REFUSALS.items())


def test_an_unknown_kind_from_a_newer_engine_is_an_engine_failure():
    e = from_wire("brand_new", "something", None)
    assert (type(e).__name__, e.http_status, str(e)) == ("EngineFailure", 500, "something")


def test_a_bug_is_not_a_refusal():
    rpc = to_rpc_error(KeyError("/secret/path"))
    assert rpc.code == grpc.StatusCode.INTERNAL and "/secret" not in str(rpc)


def test_refusals_are_defined_only_in_errors_py():
    """No module of the server defines its own request refusal: what may live elsewhere is
    transport plumbing (an HTTP or gRPC answer being built) and the engines' load failure."""
    allowed = {"HTTPError", "BodyTimeout", "RpcError", "Undecodable", "BackendError"}
    found = {}
    for path in SERVE.rglob("*.py"):
        if path.name == "errors.py" and path.parent == SERVE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                if bases & {"Exception", "LookupError", "ValueError", "RuntimeError", "Refusal", "InputError"}:
                    found[node.name] = path.relative_to(SERVE).as_posix()
    assert set(found) <= allowed, {k: v for k, v in found.items() if k not in allowed}
