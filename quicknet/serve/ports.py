"""The ports a server listens on: checked before anything binds them, and the one line a user reads
when one is taken."""

from __future__ import annotations

import socket

from quicknet.errors import QuickNetError
from quicknet.serve.config import Settings


def pick_another(field: str) -> str:
    """The hint when a port is taken: the flag and the variable that set Settings.`field` (`make
    serve` takes no flags, so the flag alone would leave its user nowhere to put it)."""
    return f"pick another with --{field.replace('_', '-')} or QUICKNET_{field.upper()}"


def taken(host: str, port: int, what: str, field: str, why: str) -> QuickNetError:
    return QuickNetError(f"cannot listen on {host}:{port} for {what} ({why}); {pick_another(field)}")


def free_port(host: str, port: int, what: str, field: str) -> int:
    """The port, or a free one for 0, checked by binding without SO_REUSEPORT (a listener that
    shares ports would otherwise be joined silently; gRPC's own failure to bind is a log line of its
    C core before ours), with SO_REUSEADDR as the servers bind (the last server's connections
    waiting in TIME_WAIT after a restart are no listener)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise taken(host, port, what, field, e.strerror) from None
        return probe.getsockname()[1]


def free_ports(settings: Settings) -> tuple[int, int]:
    """The REST and gRPC ports (a free one for 0), both checked before anything binds them."""
    return (
        free_port(settings.http_host, settings.http_port, "REST", "http_port"),
        free_port(settings.grpc_host, settings.grpc_port, "gRPC", "grpc_port"),
    )
