"""`quicknet serve` (every Settings field as a flag) and `quicknet classify` (a small client)."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from quicknet.errors import QuickNetError


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    from service.config import Settings

    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "QUICKNET_" + name.upper()
        help_text = f"{field.description or ''} [env {env}]".strip()
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

    from service.config import Settings
    from service.main import run

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        first = e.errors()[0]
        raise QuickNetError(f"invalid setting {first['loc'][0]}: {first['msg']}") from None
    sys.exit(run(settings))


def cmd_probe(args: argparse.Namespace) -> None:
    """Exit 0 if this container's server answers /healthz (or /readyz with --ready), else 1.
    It reads the same QUICKNET_* settings as the server, so it follows a changed port."""
    import urllib.request

    from service.config import Settings

    settings = Settings()
    host = settings.http_host if settings.http_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{settings.http_port}{'/readyz' if args.ready else '/healthz'}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            ok = response.status == 200
    except OSError:
        ok = False
    sys.exit(0 if ok else 1)


def cmd_classify(args: argparse.Namespace) -> None:
    images = [Path(p) for p in args.images]
    for p in images:
        if not p.is_file():
            raise QuickNetError(f"{p} not found")
    results = _classify_grpc(args, images) if args.grpc else _classify_http(args, images)
    for path, preds in zip(images, results, strict=True):
        if args.json:
            print(json.dumps({"image": str(path), "predictions": preds}))
        else:
            best = ", ".join(f"{p['label']} {p['score']:.3f}" for p in preds)
            print(f"{path}: {best}")


def _classify_http(args: argparse.Namespace, images: list[Path]) -> list[list[dict]]:
    import httpx

    files = [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in images]
    try:
        r = httpx.post(
            f"{args.url.rstrip('/')}/classify", files=files, params={"top_k": args.top_k}, timeout=args.timeout
        )
    except httpx.HTTPError as e:
        raise QuickNetError(f"cannot reach {args.url}: {e}") from None
    if r.status_code != 200:
        raise QuickNetError(f"server answered {r.status_code}: {r.json().get('error', r.text)}")
    return r.json()["predictions"]


def _classify_grpc(args: argparse.Namespace, images: list[Path]) -> list[list[dict]]:
    import grpc

    from service._generated import classifier_pb2 as pb
    from service._generated import classifier_pb2_grpc as pb_grpc

    with grpc.insecure_channel(args.grpc) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        request = pb.ClassifyBatchRequest(images=[pb.Image(encoded=p.read_bytes()) for p in images], top_k=args.top_k)
        try:
            reply = stub.ClassifyBatch(request, timeout=args.timeout)
        except grpc.RpcError as e:
            raise QuickNetError(f"gRPC {e.code().name}: {e.details()}") from None
    return [[{"label": p.label, "index": p.index, "score": p.score} for p in r.predictions] for r in reply.results]


def add_commands(sub: argparse._SubParsersAction) -> None:
    import service.config  # noqa: F401 - fail here, not mid-command, when the serve extra is missing

    serve = sub.add_parser("serve", help="serve a model over REST and gRPC")
    _settings_flags(serve)
    serve.set_defaults(func=cmd_serve)

    probe = sub.add_parser("probe", help="container health check: exit 0 if the server answers /healthz")
    probe.add_argument("--ready", action="store_true", help="ask /readyz (warmed up, not draining) instead")
    probe.add_argument("--timeout", type=float, default=2.0)
    probe.set_defaults(func=cmd_probe)

    classify = sub.add_parser("classify", help="classify image files with a running server")
    classify.add_argument("images", nargs="+", metavar="IMAGE")
    target = classify.add_mutually_exclusive_group()
    target.add_argument("--url", default="http://127.0.0.1:8000", help="REST endpoint (default)")
    target.add_argument("--grpc", metavar="HOST:PORT", help="use gRPC instead, e.g. 127.0.0.1:8001")
    classify.add_argument("--top-k", type=int, default=3)
    classify.add_argument("--timeout", type=float, default=10.0)
    classify.add_argument("--json", action="store_true", help="one JSON line per image")
    classify.set_defaults(func=cmd_classify)
