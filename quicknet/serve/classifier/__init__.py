"""Our own API, on both transports: REST `/classify` + `/v1/models`, and gRPC `quicknet.v1.Classifier`.

What a request may ask is checked here once for both: which model and version, how many labels."""

from __future__ import annotations

from quicknet.serve.errors import InputError, clip
from quicknet.serve.runtime import Runtime

MAX_TOP_K = 10  # CIFAR-10's classes


def model_choice(runtime: Runtime, name: str | None, version: str | None) -> tuple[str | None, str | None]:
    """A request's model and version (None or "": not asked) as `Runtime.serving` takes them: a
    version is a whole number (else 400), and a version alone is the default model's."""
    if version and not (version.isascii() and version.isdigit()):
        raise InputError(f"version must be a whole number such as 1, got {clip(version, 20)!r}")
    if version and not name:
        name = runtime.default.name if runtime.default is not None else None
    return name or None, version or None


def check_top_k(k: int) -> int:
    if not 1 <= k <= MAX_TOP_K:
        raise InputError(f"top_k must be from 1 to {MAX_TOP_K}, got {k}")
    return k
