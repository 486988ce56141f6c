"""Every way the service refuses a request, defined once.

Each kind carries what every side of the house needs, so none of them keeps its own list:
- `http_status` and `headers()`: the REST answer (`transport.http` maps any `Refusal` by these);
- `grpc_code`: the gRPC status, by the name of its `grpc.StatusCode` member (this module does not
  import grpc: the engine process and the batcher raise these too);
- `reason`: the one word that metrics (`quicknet_requests_rejected_total{reason}`), the access log
  and clients see; the kind's own name unless the raiser is more precise (`draining`, `not_ready`);
- `kind`: what crosses the engine process's wire (`to_wire` / `from_wire`): a front re-raises the
  same exception the engine raised.

A `Refusal` is the client's answer, never a bug: anything else that escapes a handler is logged
with its traceback and answered 500 / INTERNAL in one line without paths.
"""

from __future__ import annotations

from typing import ClassVar


def clip(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters with "…" when longer: what an answer echoes of a request."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Refusal(Exception):
    """A request the service will not do; one line that says why and what to do."""

    kind: ClassVar[str]
    http_status: int  # a class's own, or (InputError) the instance's
    grpc_code: str

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or self.kind

    def headers(self) -> dict[str, str]:
        return {}

    def http_message(self) -> str:
        return str(self)

    def rpc_message(self) -> str:
        return str(self)

    def extra(self) -> object:
        """What `from_wire` needs besides the message (JSON-able)."""
        return self.reason

    @classmethod
    def rebuild(cls, message: str, extra: object) -> Refusal:
        return cls(message, extra if isinstance(extra, str) else None)


class InputError(Refusal):
    """A request the client must fix; `status` is the HTTP code (gRPC maps it). The message is one
    line of at most 300 characters, whatever the request held (a name, a shape) that it echoes."""

    kind = "bad_input"
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    GRPC_BY_STATUS: ClassVar[dict[int, str]] = {404: "NOT_FOUND"}  # 400, 413, 415: INVALID_ARGUMENT

    def __init__(self, message: str, status: int = 400, reason: str = "bad_input"):
        super().__init__(clip(message, 300), reason)
        self.status = status
        self.http_status = status  # per instance: 413 too large, 415 unsupported type, 404 no such route
        self.grpc_code = self.GRPC_BY_STATUS.get(status, "INVALID_ARGUMENT")

    def extra(self) -> object:
        return [self.status, self.reason]

    @classmethod
    def rebuild(cls, message: str, extra: object) -> Refusal:
        status, reason = extra if isinstance(extra, list | tuple) and len(extra) == 2 else (400, "bad_input")
        return cls(message, status, reason)


class QueueFull(Refusal):
    """The queue holds `max_queue_images` already; retry after `retry_after_s`."""

    kind = "queue_full"
    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, retry_after_s: float):
        super().__init__("server is at capacity; retry shortly")
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(int(max(1, round(self.retry_after_s))))}

    def rpc_message(self) -> str:
        return f"{self} (retry after {self.retry_after_s:.0f}s)"

    def extra(self) -> object:
        return self.retry_after_s

    @classmethod
    def rebuild(cls, message: str, extra: object) -> Refusal:
        return cls(float(extra) if isinstance(extra, int | float) else 1.0)


class DeadlineExceeded(Refusal):
    """The request's deadline passed before its images reached the engine."""

    kind = "deadline"
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"

    def http_message(self) -> str:
        return "deadline exceeded before the images reached the engine"


class NotAccepting(Refusal):
    """Not taking work: still loading (`not_ready`), draining for shutdown (`draining`), or the
    engine process is away (`engine_unavailable`)."""

    kind = "not_accepting"
    http_status = 503
    grpc_code = "UNAVAILABLE"

    def __init__(self, message: str, reason: str = "draining"):
        super().__init__(message, reason)


API_KEY_MISSING = "missing or invalid API key (send Authorization: Bearer <key>)"


class Unauthenticated(Refusal):
    """No API key, or one the server does not hold (for load and unload: no admin key)."""

    kind = "unauthenticated"
    http_status = 401
    grpc_code = "UNAUTHENTICATED"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="quicknet"'}

    def rpc_message(self) -> str:  # gRPC carries the key as lower-case metadata, not a header
        return str(self).replace("Authorization: Bearer <key>", "authorization: Bearer <key> metadata")


class Forbidden(Refusal):
    """A key the server holds, without the role the request needs (an admin key to load and unload)."""

    kind = "forbidden"
    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class ModelNotFound(Refusal):
    """No such model or version is being served (or, for the repository API, stored or loaded)."""

    kind = "not_found"
    http_status = 404
    grpc_code = "NOT_FOUND"


class RepositoryError(Refusal):
    """A repository request that cannot be done (wrong mode, the default model, a failed load)."""

    kind = "repository"
    http_status = 400
    grpc_code = "FAILED_PRECONDITION"


class EngineFailure(Refusal):
    """The engine raised on the batch holding this request; the message carries its reason."""

    kind = "engine_error"
    http_status = 500
    grpc_code = "INTERNAL"

    def http_message(self) -> str:
        return f"inference failed: {self}"

    rpc_message = http_message


REFUSALS: dict[str, type[Refusal]] = {
    cls.kind: cls
    for cls in (
        InputError,
        QueueFull,
        DeadlineExceeded,
        NotAccepting,
        Unauthenticated,
        Forbidden,
        ModelNotFound,
        RepositoryError,
        EngineFailure,
    )
}


def to_wire(e: Refusal) -> tuple[str, str, object]:
    """(kind, message, extra): what the engine process sends a front for a refused request."""
    return e.kind, str(e), e.extra()


def from_wire(kind: str, message: str, extra: object) -> Refusal:
    """The same refusal on the front's side; an unknown kind (a newer engine) is an engine failure."""
    return REFUSALS.get(kind, EngineFailure).rebuild(message, extra)
