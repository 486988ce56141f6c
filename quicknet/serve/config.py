"""One settings object. Every field is a `--flag` on `quicknet serve` and a `QUICKNET_*` variable."""

from __future__ import annotations

import math
import os
import typing
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def parse_policy(text: str) -> tuple[str, tuple[int, ...]]:
    """`latest:N`, `all` or `specific:1,3` -> (kind, numbers); ValueError with one line if malformed."""
    kind, _, rest = text.strip().partition(":")
    try:
        if kind == "all" and not rest:
            return "all", ()
        if kind == "latest":
            n = int(rest)
            if n >= 1:
                return "latest", (n,)
        if kind == "specific":
            numbers = tuple(int(x) for x in rest.split(","))
            if numbers and all(x >= 1 for x in numbers):
                return "specific", numbers
    except ValueError:
        pass
    raise ValueError(f"version policy {text!r}: use latest:N, all, or specific:V1,V2")


# A cgroup's CPU limit (v2, then v1): a container's `--cpus`, a pod's CPU limit.
CPU_LIMIT_FILES = (Path("/sys/fs/cgroup/cpu.max"), Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"))


def cpu_limit() -> float | None:
    """The CPUs a cgroup limit allows this process, None where none is set."""
    v2, v1 = CPU_LIMIT_FILES
    try:
        quota, period = v2.read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(v1.read_text())
        return None if quota_us <= 0 else quota_us / int((v1.parent / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU limit. Affinity
    alone reports every core of the host to a container limited to two of them, and sixteen front
    processes there would share two cores and hold sixteen times a front's memory."""
    cores = len(os.sched_getaffinity(0))
    limit = cpu_limit()
    return cores if limit is None else max(1, min(cores, math.ceil(limit)))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUICKNET_", protected_namespaces=())

    model_store: Path | None = Field(
        None,
        description="model store root (default: the model_store/ folder of this checkout, whatever the current one)",
    )
    model: str | None = Field(None, description="default model, for /classify (default: the store's DEFAULT)")
    version: int | None = Field(None, description="version of the default model for /classify (default: newest)")
    models: list[str] = Field(
        default_factory=list,
        description="models to load, the versions --version-policy names of each (default: all in the store)",
    )
    model_control_mode: Literal["none", "poll", "explicit"] = Field(
        "none",
        description="none: load the store once at start; poll: follow the store (new versions go live, removed ones "
        "unload, DEFAULT is followed); explicit: the default model at start, then only the repository API",
    )
    poll_interval_s: float = Field(2.0, gt=0, description="poll mode: seconds between looks at the store")
    version_policy: str = Field(
        "latest:1",
        description="versions served per model: latest:N, all, or specific:V1,V2 (latest:1, as Triton: one "
        "engine per model in memory; older versions stay in the store)",
    )
    version_policies: dict[str, str] = Field(
        default_factory=dict, description='per-model policies, e.g. {"quicknet-xs": "all"} (JSON)'
    )
    backend: Literal["auto", "onnxruntime", "torch", "tensorrt", "fused"] = Field(
        "auto",
        description="engine: auto picks tensorrt (plan for this GPU) > fused (engine built for this GPU) > torch "
        "(CUDA) > onnxruntime",
    )
    precision: Literal["auto", "fp32", "int8"] = Field(
        "auto",
        description="onnxruntime: auto times FP32 and INT8 at load and serves the faster (INT8 only if it costs"
        " at most 0.5 point of published accuracy); fp32 or int8 force one",
    )
    threads: int = Field(
        2,
        ge=1,
        description="CPU threads per engine instance (ONNX Runtime / torch intra-op); the ONNX Runtime CPU runs of"
        " every model in the process take turns on its cores, first come first served",
    )
    plan_dir: Path | None = Field(None, description="where TensorRT plans live (default: the model version folder)")

    workers: int = Field(
        0,
        ge=0,
        description="front processes (REST + gRPC on shared ports) feeding one engine process; "
        "0: auto (1 — everything in one process — on up to 4 cores, else half the cores, at most 16; "
        "the cores a cgroup CPU limit allows, where one is set)",
    )

    http_host: str = Field("0.0.0.0", description="REST bind address")
    http_port: int = Field(8000, ge=0, le=65535, description="REST port")
    grpc_host: str = Field("0.0.0.0", description="gRPC bind address")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port")
    grpc_max_message_bytes: int = Field(16 << 20, ge=1 << 20, description="gRPC max message size, both ways")
    grpc_idle_timeout_s: float = Field(
        300.0,
        ge=0,
        description="gRPC: close a connection with no call in flight for this many seconds (a client's channel "
        "reconnects on its next call); 0: never",
    )
    grpc_max_connection_age_s: float = Field(
        0.0,
        ge=0,
        description="gRPC: ask a client to reconnect after this many seconds, so that replicas added behind a load "
        "balancer get their share (calls in flight get --default-timeout-ms to finish; a longer one or an open "
        "stream is ended, UNAVAILABLE); 0: never",
    )

    max_batch_size: int = Field(64, ge=1, description="largest batch the engine runs")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, description="wait this long for a fuller batch (0: take what is queued)"
    )
    preferred_batch_sizes: list[int] = Field(default_factory=list, description="batch sizes to form when possible")
    instances: int = Field(1, ge=1, description="batches in flight at once")
    max_queue_images: int = Field(1024, ge=1, description="queued images before new requests get 429")
    default_timeout_ms: float = Field(30000, gt=0, description="deadline for requests that set none")

    max_request_bytes: int = Field(64 << 20, ge=1024, description="largest REST request body")
    max_image_bytes: int = Field(8 << 20, ge=1, description="largest encoded image accepted")
    max_image_pixels: int = Field(40_000_000, ge=1024, description="largest decoded image (decompression bombs)")
    max_images_per_request: int = Field(256, ge=1, description="images in one request")
    default_top_k: int = Field(5, ge=1, le=10, description="classes returned per image")

    api_keys_file: Path | None = Field(
        None,
        description="require an API key (Authorization: Bearer) on every request; one key per line, or "
        "'sha256:<hex>' hashed (`quicknet api-key` makes one); re-read when it changes",
    )
    admin_api_keys_file: Path | None = Field(
        None,
        description="the admin key set (same format as --api-keys-file): only these keys may load and unload "
        "models (the repository API); they are accepted on every route. With --api-keys-file and no admin "
        "file, nobody may load or unload",
    )
    open_health_endpoints: bool = Field(
        True, description="with API keys: health, readiness and /metrics answer without a key (probes, Prometheus)"
    )
    tls_cert: Path | None = Field(None, description="TLS certificate chain (PEM) for REST and gRPC; needs --tls-key")
    tls_key: Path | None = Field(None, description="TLS private key (PEM)")
    tls_client_ca: Path | None = Field(
        None, description="mutual TLS: clients must present a certificate signed by this CA (PEM)"
    )
    http_idle_timeout_s: float = Field(
        5.0, gt=0, description="REST: close a connection that sends nothing for this long (new or kept alive), seconds"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="REST: a request head not complete this many seconds after its first byte gets 408"
    )
    max_header_bytes: int = Field(
        64 << 10, ge=1024, description="REST: a request head (request line and headers) over this many bytes gets 431"
    )
    body_read_timeout_s: float = Field(
        30.0, gt=0, description="REST: a request body not fully received within this many seconds gets 408"
    )
    watchdog_s: float = Field(
        60.0,
        ge=0,
        description="an engine batch running longer than this marks the service not live (/healthz 503), so "
        "an orchestrator restarts it (0: off)",
    )

    cors_origins: list[str] = Field(
        default_factory=list,
        description="browser origins allowed to call the REST API (CORS), e.g. https://app.example.com; '*' for any",
    )
    otlp_endpoint: str = Field(
        "",
        description="OpenTelemetry: send traces (OTLP over HTTP) to this collector, e.g. http://localhost:4318 "
        "(empty: tracing off)",
    )
    otlp_service_name: str = Field("quicknet", description="OpenTelemetry: service.name of the spans")
    trace_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="OpenTelemetry: share of new traces recorded (a caller's sampled flag wins)"
    )

    fault_injection: str = Field(
        "", description="tests and drills only: 'fail-every=N' and/or 'hang-every=N,hang-seconds=S' engine batches"
    )
    drain_seconds: float = Field(25.0, ge=0, description="on SIGTERM, time allowed for queued and in-flight work")
    warmup: bool = Field(True, description="run every batch bucket once before reporting ready")
    log_json: bool = Field(False, description="structured JSON logs")
    access_log: bool = Field(True, description="one log line per request (REST and gRPC)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("version_policy")
    @classmethod
    def _policy(cls, text: str) -> str:
        parse_policy(text)
        return text

    @field_validator("version_policies")
    @classmethod
    def _policies(cls, policies: dict[str, str]) -> dict[str, str]:
        for text in policies.values():
            parse_policy(text)
        return policies

    @field_validator("otlp_endpoint")
    @classmethod
    def _otlp_url(cls, url: str) -> str:
        from urllib.parse import urlsplit

        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
            raise ValueError(f"{url!r} is not an http(s)://host:port URL (OTLP over HTTP, e.g. http://localhost:4318)")
        return url

    @field_validator("fault_injection")
    @classmethod
    def _fault_plan(cls, spec: str) -> str:
        from quicknet.serve.faults import FaultPlan

        FaultPlan.parse(spec)
        return spec

    @field_validator("api_keys_file", "admin_api_keys_file")
    @classmethod
    def _keys(cls, path: Path | None) -> Path | None:
        if path is not None:
            from quicknet.serve.auth import ApiKeys

            ApiKeys(path)  # readable and well-formed, or one line now (not at the first request)
        return path

    @field_validator("tls_cert", "tls_key", "tls_client_ca")
    @classmethod
    def _readable(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path} is not a readable file")
        return path

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        return self

    def doubts(self) -> list[str]:
        """Settings that are valid but work against each other: logged once at start, one line each."""
        out = []
        if self.max_images_per_request > self.max_queue_images:
            out.append(
                f"--max-images-per-request {self.max_images_per_request} is more than --max-queue-images "
                f"{self.max_queue_images}: a request of more images than the queue holds gets 429 every time"
            )
        return out

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def front_workers(self) -> int:
        """`workers`, with 0 resolved for this machine (see the field's description)."""
        if self.workers:
            return self.workers
        cores = usable_cores()
        return 1 if cores <= 4 else min(16, cores // 2)

    @property
    def store_root(self) -> Path:
        from quicknet.store import default_root

        return self.model_store or default_root()

    def for_model(self, name: str, engine: str | None = None) -> Settings:
        """These settings with the model's own `config.json` from the store applied on top (it wins
        for its model; the flags are the defaults for what it does not set). A section named after
        an engine (`"onnxruntime": {...}`, `"torch": {...}`) applies on top only when that engine
        serves the model: a batch policy tuned for a CPU must not cap a GPU. Every section is
        checked whichever applies, by the same field rules as the flags; a wrong file is one line
        naming the file and the field."""
        from quicknet.store import model_config

        config = model_config(self.store_root, name)
        if not config:
            return self
        sections = {k: config.pop(k) for k in list(config) if k in ENGINE_NAMES}
        base = self._configured(name, "", config)
        applied = {key: base._configured(name, key, values) for key, values in sections.items()}
        return applied.get(engine, base)

    def _configured(self, name: str, section: str, values: object) -> Settings:
        from pydantic import ValidationError

        from quicknet.errors import StoreError
        from quicknet.store import MODEL_CONFIG

        where = f"{name}/{MODEL_CONFIG}: " + (f"{section}: " if section else "")
        if not isinstance(values, dict):
            raise StoreError(f"{where}an engine's section must be a JSON object")
        unknown = sorted(set(values) - PER_MODEL)
        if unknown:
            raise StoreError(
                f"{where}unknown setting {unknown[0]!r}; a model may set {', '.join(sorted(PER_MODEL))}, "
                f"also under an engine's name ({', '.join(ENGINE_NAMES)})"
            )
        try:
            return type(self).model_validate({**self.model_dump(), **values})
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "value"
            raise StoreError(f"{where}{field}: {first['msg']}") from None


# The engines a model's `config.json` may have a section for: `--backend`'s choices but auto.
ENGINE_NAMES = tuple(e for e in typing.get_args(Settings.model_fields["backend"].annotation) if e != "auto")
# What a model's `config.json` may set (Triton's config.pbtxt, for this service's batcher and engine).
PER_MODEL = frozenset(
    {"max_batch_size", "max_queue_delay_ms", "preferred_batch_sizes", "instances", "precision", "threads"}
    | {"version_policy"}
)
