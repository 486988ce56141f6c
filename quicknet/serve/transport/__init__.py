"""Protocol plumbing shared by the fronts: `http` (errors, deadlines, disconnects, call metrics,
the app) and `grpc` (status mapping, deadlines, call metrics, health, the server). A front
declares its routes or servicers and its protocol tag; these modules do the rest."""

from __future__ import annotations

import os


def request_id(incoming: str) -> str:
    """A request's id on every front: the caller's `x-request-id` (at most 128 characters), or a
    new random one. It goes back on the answer and on the request's log lines and span."""
    return incoming[:128] or os.urandom(16).hex()
