"""Where the server is and how to reach it: the URL (scheme picks REST or gRPC), TLS material and
the API key, resolved once so both transports read the same settings."""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from quicknet.client.results import QuickNetClientError

GRPC_DEFAULT_PORT = 8001


def default_url() -> str:
    """`QUICKNET_URL`, else the REST port `quicknet serve` uses on this machine."""
    return os.environ.get("QUICKNET_URL") or f"http://127.0.0.1:{os.environ.get('QUICKNET_HTTP_PORT') or 8000}"


# What "nothing listens there" means to do, for both transports' refused connections (the same
# words from the library and the commands: each way of giving an address is named).
NOBODY_LISTENS = (
    "is `quicknet serve` running there? Another address: the client's url (--url or --grpc on the command line), "
    "or QUICKNET_URL"
)


# The server's own paths: a URL ending in one names an endpoint, not the server (the client adds
# /classify itself; a path before these, as behind a reverse proxy, is kept).
API_PATHS = re.compile(
    r"(/classify|/predictions/[^/]+(/\d+)?|/v1/models|/v2(/models(/.*)?)?|/docs|/redoc|/metrics|/healthz|/readyz)$"
)


def _not_an_endpoint(parts) -> None:
    path = parts.path.rstrip("/")
    if m := API_PATHS.search(path):
        server = f"{parts.scheme}://{parts.netloc}{path[: m.start()]}"
        raise ValueError(
            f"{parts.geturl()} is an endpoint's address; give the server's, {server} (the client adds /classify itself)"
        )


@dataclass(frozen=True)
class Endpoint:
    """`url` is the REST base URL, or for gRPC the `host:port` target."""

    protocol: Literal["rest", "grpc"]
    url: str
    tls: bool
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    api_key: str | None = None

    @classmethod
    def resolve(
        cls,
        url: str | None,
        *,
        api_key: str | None = None,
        cacert: str | os.PathLike | None = None,
        cert: str | os.PathLike | None = None,
        key: str | os.PathLike | None = None,
    ) -> Endpoint:
        """`127.0.0.1:8000` means `http://127.0.0.1:8000`; `grpc://host:port` (or `grpcs://`, TLS
        with the system's roots) speaks gRPC; `--cacert`/`--cert` turn TLS on for gRPC too."""
        raw = (url or default_url()).strip()
        if "://" not in raw:
            raw = "http://" + raw
        parts = urlsplit(raw)
        scheme = parts.scheme.lower()
        if not parts.hostname:
            raise ValueError(f"no host in URL {url!r}")
        if cert and not key:
            raise ValueError("a client certificate needs its private key (key=...)")
        files = {"cacert": cacert, "cert": cert, "key": key}
        for name, path in files.items():
            if path is not None and not Path(path).is_file():
                raise QuickNetClientError(None, f"{name} file {path} not found")
        api_key = api_key if api_key is not None else os.environ.get("QUICKNET_API_KEY") or None
        common = {k: (str(v) if v is not None else None) for k, v in files.items()}
        if scheme in ("http", "https"):
            _not_an_endpoint(parts)
            return cls("rest", raw.rstrip("/"), scheme == "https", api_key=api_key, **common)
        if scheme in ("grpc", "grpcs"):
            target = parts.netloc if parts.port else f"{parts.netloc}:{GRPC_DEFAULT_PORT}"
            tls = scheme == "grpcs" or cacert is not None or cert is not None
            return cls("grpc", target, tls, api_key=api_key, **common)
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}: use http, https, grpc or grpcs")

    def ssl_context(self) -> ssl.SSLContext | bool:
        """For httpx: the system's trust store unless a CA file is given, plus a client certificate."""
        if not (self.cacert or self.cert):
            return True
        try:
            context = ssl.create_default_context(cafile=self.cacert)
            if self.cert:
                context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise QuickNetClientError(None, f"cannot load the TLS files: {e}") from None
        return context

    def grpc_credentials(self):
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.cacert).read_bytes() if self.cacert else None,
            private_key=Path(self.key).read_bytes() if self.cert and self.key else None,
            certificate_chain=Path(self.cert).read_bytes() if self.cert else None,
        )

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
