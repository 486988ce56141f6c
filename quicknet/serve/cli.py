"""`quicknet serve` (every Settings field as a flag), `probe` and `api-key`; `quicknet classify` is the
client's (quicknet/client/cli.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing

from quicknet.errors import QuickNetError
from quicknet.serve.errors import clip


def _default_text(field) -> str:
    """A setting's default as `serve --help` shows it (argparse's own %(default)s is None: an
    unset flag must leave the environment's value alone)."""
    value = field.get_default(call_default_factory=True)
    if value is None or value == "" or value == [] or value == {}:
        text = "none"
    elif isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, list | tuple):
        text = " ".join(str(v) for v in value)
    elif isinstance(value, dict):
        text = json.dumps(value)
    else:
        text = str(value)
    return text.replace("%", "%%")


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    from quicknet.serve.config import Settings

    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "QUICKNET_" + name.upper()
        description = field.description or ""
        if "(default" in description:  # says its default in words ("the store's DEFAULT", "newest")
            help_text = f"{description} [env {env}]".strip()
        else:
            help_text = f"{description} [default: {_default_text(field)}; env {env}]".strip()
        kind = field.annotation
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            parser.add_argument(flag, type=item, nargs="*", default=None, help=help_text)
        elif typing.get_origin(kind) is dict:
            parser.add_argument(flag, type=json.loads, default=None, metavar="JSON", help=help_text)
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(kind), default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, help=help_text)


def cmd_serve(args: argparse.Namespace) -> None:
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from quicknet.serve.config import Settings
    from quicknet.serve.main import run

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        first = e.errors()[0]
        where = f"invalid setting {first['loc'][0]}" if first["loc"] else "invalid settings"
        raise QuickNetError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
    except SettingsError as e:  # a QUICKNET_* variable that does not parse (a list or map that is not JSON)
        raise QuickNetError(f"{e}: lists and maps are JSON, e.g. QUICKNET_MODELS='[\"quicknet\"]'") from None
    sys.exit(run(settings))


def cmd_probe(args: argparse.Namespace) -> None:
    """Exit 0 if the server answers /healthz (or /readyz with --ready), else 1 with one line on
    stderr saying why (refused, timed out, TLS, or the status and the server's reason). Without
    --url it asks this container's own server: it reads the same QUICKNET_* settings, so it follows
    a changed port, TLS (it asks its own loopback, so it does not check the server's name; under
    mutual TLS it presents the server's certificate, which must then be one the client CA signed)
    and, when health endpoints are closed, sends QUICKNET_API_KEY. With --url, that server
    (http(s)://host:port); https is not verified either: liveness, not identity."""
    import http.client
    import ssl
    import urllib.error
    import urllib.request

    from quicknet.serve.config import Settings

    path = "/readyz" if args.ready else "/healthz"
    context = None
    if args.url:
        base = args.url.strip().rstrip("/")
        base = base if "://" in base else "http://" + base
        if not base.startswith(("http://", "https://")):  # grpc://: health over gRPC is grpc_health_probe's
            raise QuickNetError(
                f"probe asks REST's /healthz over http(s)://, not {clip(base.partition('://')[0], 20)}://: "
                "give the REST port (8000 unless --http-port), or use grpc_health_probe for gRPC"
            )
        url = base if base.endswith(("/healthz", "/readyz")) else base + path
        if url.startswith("https://"):
            context = ssl._create_unverified_context()
    else:
        settings = Settings()
        host = settings.http_host if settings.http_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if settings.tls else "http"
        url = f"{scheme}://{host}:{settings.http_port}{path}"
        if settings.tls:
            context = ssl._create_unverified_context()  # our own loopback: liveness, not identity
            if settings.tls_client_ca is not None:
                context.load_cert_chain(settings.tls_cert, settings.tls_key)
    request = urllib.request.Request(url)
    if key := os.environ.get("QUICKNET_API_KEY"):
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout, context=context) as response:
            ok = response.status == 200
            why = f"answered {response.status}"
    except urllib.error.HTTPError as e:
        ok, why = False, f"answered {e.code}: {_error_text(e)}"
    except urllib.error.URLError as e:
        ok, why = False, f"cannot reach it: {getattr(e.reason, 'strerror', None) or e.reason}"
    except TimeoutError:
        ok, why = False, f"no answer within {args.timeout:g}s"
    except http.client.HTTPException as e:  # an answer that is not HTTP/1.1: the gRPC port, say
        why = f"it did not answer in HTTP/1.1 ({type(e).__name__}): if that is the gRPC port, probe the REST port"
        ok = False
    except (OSError, ValueError) as e:
        ok, why = False, f"cannot ask it: {e}"
    if not ok:
        print(f"probe {url}: {why}", file=sys.stderr)
    sys.exit(0 if ok else 1)


def _error_text(error) -> str:
    """The server's one-line reason from its JSON error body, else the HTTP reason phrase."""
    try:
        doc = json.loads(error.read(4096) or b"{}")
        if isinstance(doc, dict) and doc.get("error"):
            return " ".join(str(doc["error"]).split())[:200]
    except (OSError, ValueError):
        pass
    return str(error.reason)


def cmd_api_key(args: argparse.Namespace) -> None:
    """A new API key and its key-file line (hashed: the file need not hold the secret). With
    --hash, the line for a key read from standard input instead."""
    from quicknet.serve.auth import MIN_KEY_LENGTH, hashed_line, new_key

    if args.hash:
        key = sys.stdin.readline().strip()
        if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
            raise QuickNetError(f"a key needs at least {MIN_KEY_LENGTH} characters and no spaces")
        print(hashed_line(key))
        return
    key = new_key()
    print(f"key:  {key}")
    print(f"line: {hashed_line(key)}")
    print("Give the key to the client (Authorization: Bearer <key>); put the line in --api-keys-file.", file=sys.stderr)


def add_commands(sub: argparse._SubParsersAction) -> None:
    import quicknet.serve.config  # noqa: F401 - fail here, not mid-command, when the serve extra is missing

    serve = sub.add_parser("serve", help="serve a model over REST and gRPC")
    _settings_flags(serve)
    serve.set_defaults(func=cmd_serve)

    probe = sub.add_parser(
        "probe",
        help="container health check: exit 0 if the server answers /healthz, else 1 and why",
        description=cmd_probe.__doc__,
    )
    probe.add_argument("--ready", action="store_true", help="ask /readyz (warmed up, not draining) instead")
    probe.add_argument(
        "--url",
        help="ask this server (http(s)://host:port) instead of the one this machine's QUICKNET_* settings describe",
    )
    probe.add_argument("--timeout", type=float, default=2.0, help="seconds to wait (default: %(default)s)")
    probe.set_defaults(func=cmd_probe)

    api_key = sub.add_parser("api-key", help="make an API key and its (hashed) line for --api-keys-file")
    api_key.add_argument("--hash", action="store_true", help="hash a key read from standard input instead")
    api_key.set_defaults(func=cmd_api_key)
