"""`quicknet models|stats|load|unload|health`: a running server's repository, statistics and health,
as Triton's repository API is used through `curl`, over REST or gRPC.

The URL picks the transport as for `quicknet classify` (`http(s)://host:port`, or `grpc(s)://host:port`;
default `$QUICKNET_URL`), with the same TLS and key options (`quicknet.client.endpoint`). Both speak
the Open Inference Protocol (KServe v2) the server serves: the repository index, model
configuration and statistics, and load / unload (an admin key when API keys are in force, see
`--admin-api-keys-file`). Over REST, `models` also reads `/v1/models` for the engine's precision
and the published accuracy, which the v2 protocol has no field for; over gRPC those columns show
the platform and `-`.

Needs only the client extra (httpx; grpcio for gRPC URLs): no torch, no server libraries.
Exit 0 on success; `health` exits 1 when the server answers but is not ready; 2 (one `error:`
line) when the server cannot be reached or refuses."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import quote

from quicknet import store
from quicknet.client.endpoint import Endpoint
from quicknet.client.results import QuickNetClientError
from quicknet.errors import QuickNetError, StoreError

PLATFORM_ENGINES = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt", "pytorch_torchexport": "torch"}


def _segment(value: str) -> str:
    """One URL path segment, percent-encoded (a `?` or `#` in a name stays in the name)."""
    return quote(str(value), safe="")


def _model_name(name: str) -> str:
    """`name`, or the server's own one-line refusal (400) before any request: a name holding `/`
    (`../x`) cannot reach the server's routes as one path segment, whatever the encoding."""
    try:
        return store.check_name(name)
    except StoreError as e:
        raise QuickNetClientError(400, str(e), from_server=False) from None


@dataclass
class ModelRow:
    """One model version in the store, as `quicknet models` shows it."""

    name: str
    version: str
    state: str
    reason: str = ""
    default: bool | None = None  # REST only (/v1/models)
    engine: str = ""
    accuracy: float | None = None
    accuracy_of: str = ""
    config: dict = field(default_factory=dict)  # Triton's model configuration, JSON form (READY versions)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "state": self.state,
            "reason": self.reason,
            "default": self.default,
            "engine": self.engine,
            "accuracy": self.accuracy,
            "accuracy_of": self.accuracy_of,
            "config": self.config,
        }


def _engine_text(backend: dict) -> str:
    """`onnxruntime int8 cpu` from /v1/models' engine description (whichever keys the engine gives)."""
    parts = [str(backend.get("backend", ""))]
    for key in ("precision", "device", "provider"):
        value = backend.get(key)
        if value and str(value) not in parts:
            parts.append(str(value).removesuffix("ExecutionProvider").lower() if key == "provider" else str(value))
    return " ".join(p for p in parts if p)


def _accuracy(accuracy: dict, backend: dict) -> tuple[float | None, str]:
    """The published top-1 of what is served: the INT8 evaluation for an INT8 engine, else FP32 ONNX's."""
    int8 = str(backend.get("precision", "")).lower() == "int8"
    for key in ("onnx-int8",) if int8 else ("onnx", "checkpoint"):
        if accuracy.get(key) is not None:
            return float(accuracy[key]), key
    return None, ""


class RestAdmin:
    def __init__(self, endpoint: Endpoint, timeout: float):
        import httpx

        self.url = endpoint.url
        self.timeout = timeout
        self._httpx = httpx
        self._http = httpx.Client(
            base_url=endpoint.url, verify=endpoint.ssl_context(), headers=endpoint.headers(), timeout=timeout
        )

    def _call(self, method: str, path: str, ok=(200,), **kwargs):
        from quicknet.client.rest import transport_error

        try:
            response = self._http.request(method, path, **kwargs)
        except self._httpx.TransportError as e:
            raise transport_error(self.url, e, self.timeout) from None
        if response.status_code not in ok:
            raise self._refused(response, path)
        return response

    def _refused(self, response, path: str) -> QuickNetClientError:
        """The server's one-line `{"error": ...}`; an answer without one is not this server's."""
        try:
            doc = response.json()
            message = str(doc["error"]) if isinstance(doc, dict) and "error" in doc else None
        except ValueError:
            message = None
        if message is None or (response.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed")):
            message = (
                f"{self.url}{path} answered {response.status_code} {response.reason_phrase}: is {self.url} a "
                "QuickNet server's REST port (8000 by default)?"
            )
        return QuickNetClientError(response.status_code, " ".join(message.split())[:500])

    def health(self) -> dict:
        live = self._call("GET", "/v2/health/live", ok=(200, 400)).status_code == 200
        ready = self._call("GET", "/v2/health/ready", ok=(200, 400)).status_code == 200
        return {"live": live, "ready": ready}

    def index(self) -> list[dict]:
        return self._call("POST", "/v2/repository/index", json={}).json()

    def served(self) -> dict[tuple[str, str], dict]:
        return {(m["name"], m["version"]): m for m in self._call("GET", "/v1/models").json()["models"]}

    def config(self, name: str, version: str) -> dict:
        return self._call("GET", f"/v2/models/{_segment(name)}/versions/{_segment(version)}/config").json()

    def stats(self) -> list[dict]:
        return self._call("GET", "/v2/models/stats").json()["model_stats"]

    def load(self, name: str) -> None:
        self._call("POST", f"/v2/repository/models/{_segment(_model_name(name))}/load", json={})

    def unload(self, name: str) -> None:
        self._call("POST", f"/v2/repository/models/{_segment(_model_name(name))}/unload", json={})

    def close(self) -> None:
        self._http.close()


class GrpcAdmin:
    def __init__(self, endpoint: Endpoint, timeout: float):
        import grpc

        from quicknet.api._generated import grpc_predict_v2_pb2 as pb
        from quicknet.api._generated import grpc_predict_v2_pb2_grpc as pb_grpc
        from quicknet.client.rpc import OPTIONS

        self.target = endpoint.url
        self.timeout = timeout
        self.pb = pb
        self._grpc = grpc
        self._metadata = endpoint.metadata()
        self.tls = endpoint.tls
        if endpoint.tls:
            self._channel = grpc.secure_channel(endpoint.url, endpoint.grpc_credentials(), OPTIONS)
        else:
            self._channel = grpc.insecure_channel(endpoint.url, OPTIONS)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def _call(self, method: str, request):
        from quicknet.client.rpc import rpc_error

        try:
            return getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata)
        except self._grpc.RpcError as e:
            raise rpc_error(self.target, e, self.tls) from None

    @staticmethod
    def _dict(message) -> dict:
        from google.protobuf.json_format import MessageToDict

        # zeros included (a queue delay of 0 is a setting, not a missing one), as REST's JSON has them
        return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

    def health(self) -> dict:
        live = self._call("ServerLive", self.pb.ServerLiveRequest()).live
        ready = self._call("ServerReady", self.pb.ServerReadyRequest()).ready
        return {"live": live, "ready": ready}

    def index(self) -> list[dict]:
        reply = self._call("RepositoryIndex", self.pb.RepositoryIndexRequest())
        return [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in reply.models]

    def served(self) -> dict[tuple[str, str], dict]:
        return {}  # no /v1/models over gRPC: the config's backend names the engine

    def config(self, name: str, version: str) -> dict:
        reply = self._call("ModelConfig", self.pb.ModelConfigRequest(name=name, version=version))
        return self._dict(reply.config)

    def stats(self) -> list[dict]:
        return [self._dict(m) for m in self._call("ModelStatistics", self.pb.ModelStatisticsRequest()).model_stats]

    def load(self, name: str) -> None:
        self._call("RepositoryModelLoad", self.pb.RepositoryModelLoadRequest(model_name=name))

    def unload(self, name: str) -> None:
        self._call("RepositoryModelUnload", self.pb.RepositoryModelUnloadRequest(model_name=name))

    def close(self) -> None:
        self._channel.close()


def connect(args: argparse.Namespace) -> RestAdmin | GrpcAdmin:
    try:
        endpoint = Endpoint.resolve(args.url, api_key=args.api_key, cacert=args.cacert, cert=args.cert, key=args.key)
    except (QuickNetClientError, ValueError) as e:
        raise QuickNetError(str(e)) from None
    if args.timeout <= 0:
        raise QuickNetError("--timeout must be positive")
    return (RestAdmin if endpoint.protocol == "rest" else GrpcAdmin)(endpoint, args.timeout)


def models(admin: RestAdmin | GrpcAdmin) -> list[ModelRow]:
    """Every version in the store with its state; for READY ones the engine, accuracy and the
    configuration in force (the store's config.json over the serve flags)."""
    served = admin.served()
    rows = []
    for entry in admin.index():
        row = ModelRow(str(entry["name"]), str(entry["version"]), str(entry["state"]), str(entry.get("reason") or ""))
        if row.state == "READY":
            row.config = admin.config(row.name, row.version)
            info = served.get((row.name, row.version))
            if info is not None:
                row.default = bool(info.get("default"))
                row.engine = _engine_text(info.get("backend") or {})
                row.accuracy, row.accuracy_of = _accuracy(info.get("accuracy") or {}, info.get("backend") or {})
            else:
                platform = row.config.get("platform", "")
                row.engine = row.config.get("backend") or PLATFORM_ENGINES.get(platform, platform)
        rows.append(row)
    return rows


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def models_table(rows: list[ModelRow]) -> str:
    out = []
    for r in rows:
        c = r.config
        batching = c.get("dynamic_batching") or {}
        instances = sum(int(g.get("count", 0)) for g in c.get("instance_group") or ())
        delay_us = batching.get("max_queue_delay_microseconds")
        preferred = ",".join(str(s) for s in batching.get("preferred_batch_size") or ())
        name = r.name + (" *" if r.default else "")
        out.append(
            [
                name,
                r.version,
                r.state,
                r.engine or "-",
                f"{r.accuracy:.2%}" if r.accuracy is not None else "-",
                str(c["max_batch_size"]) if "max_batch_size" in c else "-",
                f"{int(delay_us) / 1000:g}" if delay_us is not None else "-",
                preferred or "-",
                str(instances) if c else "-",
                r.reason,
            ]
        )
    headers = ["MODEL", "VERSION", "STATE", "ENGINE", "TOP-1", "MAX BATCH", "DELAY MS", "PREFERRED", "INSTANCES"]
    table = _table([*headers, "REASON"], out)
    if any(r.default for r in rows):
        table += "\n* the default model (what /classify answers with when no model is named)"
    return table


def _n(value) -> int:
    return int(value or 0)  # MessageToDict writes uint64 as strings, and leaves zeros out


def stats_rows(stats: list[dict]) -> list[dict]:
    """Per version: requests, images, batches, mean batch (images / batches, as Triton's
    inference_count / execution_count), failures, mean request, queue and compute time."""
    out = []
    for s in stats:
        inference = s.get("inference_stats") or {}
        success, fail = inference.get("success") or {}, inference.get("fail") or {}
        queue, infer = inference.get("queue") or {}, inference.get("compute_infer") or {}
        images, batches = _n(s.get("inference_count")), _n(s.get("execution_count"))

        def mean_ms(d: dict) -> float | None:
            return _n(d.get("ns")) / _n(d.get("count")) / 1e6 if _n(d.get("count")) else None

        last = _n(s.get("last_inference"))
        out.append(
            {
                "name": s.get("name", ""),
                "version": str(s.get("version", "")),
                "requests": _n(success.get("count")),
                "failed": _n(fail.get("count")),
                "images": images,
                "batches": batches,
                "mean_batch": images / batches if batches else None,
                "mean_request_ms": mean_ms(success),
                "mean_queue_ms": mean_ms(queue),
                "mean_infer_ms": mean_ms(infer),
                "last_inference_ms": last or None,
            }
        )
    return out


def stats_table(rows: list[dict]) -> str:
    def ms(v: float | None) -> str:
        return f"{v:.2f}" if v is not None else "-"

    def ago(last_ms: int | None) -> str:
        return f"{max(0.0, time.time() - last_ms / 1000):.0f}s ago" if last_ms else "never"

    body = [
        [
            r["name"],
            r["version"],
            str(r["requests"]),
            str(r["failed"]),
            str(r["images"]),
            str(r["batches"]),
            f"{r['mean_batch']:.1f}" if r["mean_batch"] is not None else "-",
            ms(r["mean_request_ms"]),
            ms(r["mean_queue_ms"]),
            ms(r["mean_infer_ms"]),
            ago(r["last_inference_ms"]),
        ]
        for r in rows
    ]
    headers = ["MODEL", "VERSION", "REQUESTS", "FAILED", "IMAGES", "BATCHES", "MEAN BATCH"]
    return _table([*headers, "REQUEST MS", "QUEUE MS", "INFER MS", "LAST"], body)


def _run(args: argparse.Namespace, work) -> None:
    admin = connect(args)
    try:
        work(admin)
    except QuickNetClientError as e:
        raise QuickNetError(explain(e, args.command)) from None
    finally:
        admin.close()


def explain(e: QuickNetClientError, command: str) -> str:
    """The client's message, with what to do for the refusals a user of `quicknet <command>` meets first."""
    text = str(e)
    if e.status == 401:
        return f"{text} (pass --api-key or set QUICKNET_API_KEY)"
    if e.status == 403 and command in ("load", "unload"):
        return f"{text} (load and unload need a key from the server's --admin-api-keys-file)"
    return text


def _print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2))


def cmd_models(args: argparse.Namespace) -> None:
    def work(admin) -> None:
        rows = models(admin)
        if args.json:
            _print_json([r.to_dict() for r in rows])
        else:
            print(models_table(rows))

    _run(args, work)


def cmd_stats(args: argparse.Namespace) -> None:
    def work(admin) -> None:
        rows = stats_rows(admin.stats())
        if args.model:
            rows = [r for r in rows if r["name"] == args.model]
        _print_json(rows) if args.json else print(stats_table(rows))

    _run(args, work)


def cmd_load(args: argparse.Namespace) -> None:
    def work(admin) -> None:
        (admin.load if args.command == "load" else admin.unload)(args.name)
        done = "loaded" if args.command == "load" else "unloaded"
        versions = [m for m in admin.index() if m["name"] == args.name]
        states = ", ".join(f"v{m['version']} {m['state']}" for m in versions) or "no versions"
        print(f"{done} {args.name}: {states}")

    _run(args, work)


def cmd_health(args: argparse.Namespace) -> None:
    state: dict = {}

    def work(admin) -> None:
        state.update(admin.health())

    _run(args, work)
    if args.json:
        _print_json(state)
    else:
        print("ready" if state["ready"] else "live, not ready" if state["live"] else "not live")
    if not state["ready"]:
        raise SystemExit(1)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=None,
        help="server: http(s)://host:port (REST) or grpc(s)://host:port (gRPC) "
        "[default $QUICKNET_URL, else http://127.0.0.1:${QUICKNET_HTTP_PORT:-8000}]",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="JSON on stdout instead of a table")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("QUICKNET_API_KEY"),
        help="API key; an admin key for load/unload [env QUICKNET_API_KEY]",
    )
    parser.add_argument("--cacert", metavar="PEM", help="TLS: trust this CA (https:// or grpcs:// URL)")
    parser.add_argument("--cert", metavar="PEM", help="mutual TLS: client certificate (with --key)")
    parser.add_argument("--key", metavar="PEM", help="mutual TLS: client private key")


def add_commands(sub: argparse._SubParsersAction) -> None:
    description = __doc__.split("\n\n")[1]
    models_p = sub.add_parser(
        "models",
        help="a running server's models: versions, state, engine, accuracy, configuration in force",
        description=description,
    )
    _common(models_p)
    models_p.set_defaults(func=cmd_models)

    stats_p = sub.add_parser(
        "stats", help="a running server's statistics per model version (requests, images, mean batch, times)"
    )
    _common(stats_p)
    stats_p.add_argument("--model", help="only this model")
    stats_p.set_defaults(func=cmd_stats)

    for verb, text in (
        ("load", "load a model on a running server (--model-control-mode explicit; an admin key if keys are on)"),
        ("unload", "unload a model from a running server (explicit mode; an admin key if keys are on)"),
    ):
        p = sub.add_parser(verb, help=text)
        p.add_argument("name", metavar="NAME", help="the model's name in the store")
        _common(p)
        p.set_defaults(func=cmd_load)

    health_p = sub.add_parser(
        "health", help="is a running server live and ready? exit 0 ready, 1 not ready, 2 unreachable"
    )
    _common(health_p)
    health_p.set_defaults(func=cmd_health)


if __name__ == "__main__":  # python -m quicknet.client.admin models
    parser = argparse.ArgumentParser(prog="quicknet")
    add_commands(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args()
    try:
        parsed.func(parsed)
    except QuickNetError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
