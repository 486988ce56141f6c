"""Protocol plumbing shared by the fronts: `http` (errors, deadlines, disconnects, call metrics,
the app) and `grpc` (status mapping, deadlines, call metrics, health, the server). A front
declares its routes or servicers and its protocol tag; these modules do the rest."""

from __future__ import annotations

import random


def request_id(incoming: str) -> str:
    """A request's id on every front: the caller's `x-request-id` (at most 128 characters), or a
    new random one (128 bits from the process's generator, seeded from the OS and again after a
    fork: an id must be unique, not secret, and the OS's own randomness is a system call a request).
    It goes back on the answer and on the request's log lines and span."""
    return incoming[:128] or f"{random.getrandbits(128):032x}"
