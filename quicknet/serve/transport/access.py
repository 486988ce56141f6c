"""What a request's access-log line says besides its method, path, status and time: who asked (the
client's address), which model version answered and with how many images, and for a refusal, why.

The REST middleware and the gRPC observer `begin` one record per request (a dict in a context
variable: every task a request starts shares it, and each request runs in a task of its own); the
model handle `note_run`s the model, version and images it runs, the error handlers `note` the
message they answer with. `describe` writes the line's tail, `fields` the same
for JSON logs. Nothing here is read on a request unless the access log is on."""

from __future__ import annotations

import contextlib
import json
from contextvars import ContextVar, Token
from urllib.parse import unquote

from quicknet.serve.metrics import SERVED

MAX_REASON_CHARS = 200  # the client sees the whole message; the log keeps its start

_RECORD: ContextVar[dict | None] = ContextVar("quicknet_access", default=None)


def begin() -> tuple[dict, Token]:
    record: dict = {}
    return record, _RECORD.set(record)


def end(token: Token) -> None:
    with contextlib.suppress(ValueError):  # a stream's generator closed from another context: its task ends
        _RECORD.reset(token)


def note(**fields: object) -> None:
    """Fields of the current request's line (a later note of the same field wins)."""
    record = _RECORD.get()
    if record is not None:
        record.update(fields)


def note_run(model: str, version: int | str, images: int) -> None:
    """A model version ran `images` images for this request (added up over a stream's messages)."""
    record = _RECORD.get()
    if record is not None:
        record["model"], record["version"] = model, str(version)
        record["images"] = record.get("images", 0) + images


def rest_client(scope: dict) -> str:
    client = scope.get("client")
    if not client:
        return "-"
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def grpc_client(peer: str | None) -> str:
    """`ipv4:10.0.0.1:5000` / `ipv6:%5B::1%5D:5000` as `10.0.0.1:5000` / `[::1]:5000`."""
    if not peer:
        return "-"
    kind, _, address = peer.partition(":")
    return unquote(address) if kind in ("ipv4", "ipv6") and address else peer


def fields(record: dict, client: str, failed: bool, reason: str | None = None) -> dict:
    """The record as JSON-log fields: client, model, version, images, and `reason` when `failed`.
    A request refused after the runtime picked its model version (a bad image) still names it:
    `metrics.SERVED` holds what the runtime picked."""
    out: dict = {"client": client}
    if "model" not in record:
        model, version = SERVED.get()
        if model:
            record = {**record, "model": model, "version": version}
    for key in ("model", "version", "images"):
        if key in record:
            out[key] = record[key]
    why = reason if reason is not None else record.get("reason")
    if failed and why:
        text = " ".join(str(why).split())
        out["reason"] = text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
    return out


def describe(extra: dict) -> str:
    """`client=1.2.3.4:5 model=m version=3 images=2 reason="…"` (the text log's tail; the
    formatter escapes anything non-printable the reason echoes)."""
    parts = [f"{key}={extra[key]}" for key in ("client", "model", "version", "images") if key in extra]
    if "reason" in extra:
        parts.append("reason=" + json.dumps(extra["reason"], ensure_ascii=False))
    return " ".join(parts)
