"""Writes deploy/grafana/dashboards/quicknet.json: `python deploy/grafana/make_dashboard.py`.

The dashboard is generated so that every query gets the same filters: the `instance` and `model`
template variables, and for latency, only inference calls that succeeded (health, metadata and
refused requests answer in microseconds and would flatter every quantile). Batch size is a mean
(images ÷ batches, as Triton's inference_count / execution_count); traffic is per model version;
model state and loads, process CPU and memory, latency per protocol. The GPU panels sit in a
collapsed row: on a CPU-only server their queries are empty (the NVML gauges have no samples) and
the row stays one closed header. tests/test_deploy.py checks that the committed JSON is what this
script writes.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "quicknet.json"
DS = {"type": "prometheus", "uid": "prometheus"}
INSTANCE = 'instance=~"$instance"'
MODEL = 'model=~"$model"'
BOTH = f"{INSTANCE}, {MODEL}"
# inference endpoints on every front (REST route paths, gRPC method names), successful answers only
WORK_ENDPOINTS = 'endpoint=~"/classify|.*/infer|Classify.*|Model(Stream)?Infer"'
WORK = f'{BOTH}, {WORK_ENDPOINTS}, code=~"200|OK"'
GPU_ROW = "GPU (NVML; collapsed: empty on a server without a GPU)"
CALLS = f'{INSTANCE}, endpoint!~"/healthz|/readyz|/metrics|/v2/health/.*"'
RATE = "[$__rate_interval]"
SERVER_ERRORS = "5..|INTERNAL|UNKNOWN|UNAVAILABLE|DEADLINE_EXCEEDED"
CLIENT_ERRORS = "4..|INVALID_ARGUMENT|NOT_FOUND|UNAUTHENTICATED|RESOURCE_EXHAUSTED"


def panel(title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int, **defaults) -> dict:
    return {
        "type": "timeseries",
        "title": title,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": 12, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit, **defaults}, "overrides": []},
        "targets": [
            {"refId": chr(65 + i), "expr": expr, "legendFormat": legend, "datasource": DS}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def rate(metric: str, selector: str) -> str:
    return f"rate({metric}{{{selector}}}{RATE})"


def quantile(q: float, metric: str, selector: str) -> str:
    return f"histogram_quantile({q}, sum by (le) ({rate(metric + '_bucket', selector)}))"


def share(codes: str) -> str:
    """The share of calls (health excluded) answered with one of `codes`."""
    count = "quicknet_request_duration_seconds_count"
    some = rate(count, f'{CALLS}, code=~"{codes}"')
    return f"sum({some}) / clamp_min(sum({rate(count, CALLS)}), 1e-9)"


def variable(name: str, query: str) -> dict:
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": name},
        "definition": query,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,  # on time-range change: new instances and models appear
        "sort": 1,
    }


def row(title: str, y: int, collapsed: bool = False, panels: list[dict] | None = None) -> dict:
    """A row; a collapsed one holds its panels (Grafana draws them only when it is opened)."""
    return {
        "type": "row",
        "title": title,
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
        "collapsed": collapsed,
        "panels": panels or [],
    }


def mean_batch(selector: str) -> str:
    """Images per engine batch over the window: the histogram's sum over its count, per model
    (Triton's inference_count / execution_count), not its cumulative `le` buckets as lines."""
    sums = f"sum by (model) ({rate('quicknet_batch_size_sum', selector)})"
    return f"{sums} / clamp_min(sum by (model) ({rate('quicknet_batch_size_count', selector)}), 1e-9)"


def dashboard() -> dict:
    latency = "quicknet_request_duration_seconds"
    calls = "quicknet_request_duration_seconds_count"
    names = f'{INSTANCE}, name=~"$model"'  # the model gauges and counters label it `name`
    process = f'job="quicknet", {INSTANCE}'
    panels = [
        panel(
            "Throughput (images/s)",
            "short",
            [(f"sum by (model, protocol) ({rate('quicknet_images_total', BOTH)})", "{{model}} {{protocol}}")],
            0,
            0,
        ),
        panel(
            "Inference latency (successful calls)",
            "s",
            [(quantile(q, latency, WORK), f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)],
            12,
            0,
        ),
        panel(
            "Error rate (share of calls)",
            "percentunit",
            [
                (share(SERVER_ERRORS), "server errors (5xx, INTERNAL, UNAVAILABLE, deadline)"),
                (share(CLIENT_ERRORS), "refused or bad input (4xx)"),
            ],
            0,
            8,
            min=0,
        ),
        panel(
            "Rejections by reason (/s)",
            "reqps",
            [
                (
                    f"sum by (reason, protocol) ({rate('quicknet_rejections_total', INSTANCE)})",
                    "{{reason}} ({{protocol}})",
                )
            ],
            12,
            8,
        ),
        panel(
            "Queue depth (images) and batches in flight",
            "short",
            [
                (f"sum by (model) (quicknet_queue_images{{{BOTH}}})", "queued {{model}}"),
                (f"sum by (model) (quicknet_batches_in_flight{{{BOTH}}})", "in flight {{model}}"),
            ],
            0,
            16,
        ),
        panel(
            "Mean batch size (images ÷ batches)",
            "short",
            [(mean_batch(BOTH), "{{model}}")],
            12,
            16,
            min=0,
        ),
        panel(
            "Inference latency p99 by protocol (successful calls)",
            "s",
            [(f"histogram_quantile(0.99, sum by (le, protocol) ({rate(latency + '_bucket', WORK)}))", "{{protocol}}")],
            0,
            24,
        ),
        panel(
            "Stage latency p99: decode, queue wait, inference per batch",
            "s",
            [
                (quantile(0.99, "quicknet_decode_duration_seconds", INSTANCE), "decode"),
                (quantile(0.99, "quicknet_queue_wait_seconds", BOTH), "queue wait"),
                (quantile(0.99, "quicknet_inference_duration_seconds", BOTH), "inference (batch)"),
            ],
            12,
            24,
        ),
        panel(
            "Inference calls by model version (/s)",
            "reqps",
            [
                (
                    f"sum by (model, version) ({rate(calls, BOTH + ', ' + WORK_ENDPOINTS)})",
                    "{{model}} v{{version}}",
                )
            ],
            0,
            32,
        ),
        panel(
            "Model versions READY; loads and unloads",
            "short",
            [
                (
                    f'max by (name, version) (quicknet_model_state{{{names}, state="READY"}})',
                    "{{name}} v{{version}} ready",
                ),
                (
                    f"sum by (name, outcome) (increase(quicknet_model_loads_total{{{names}}}{RATE}))",
                    "{{name}} load {{outcome}}",
                ),
                (f"sum by (name) (increase(quicknet_model_unloads_total{{{names}}}{RATE}))", "{{name}} unload"),
            ],
            12,
            32,
            min=0,
        ),
        panel(
            "Process CPU (cores)",
            "short",
            [(f"sum by (instance) (rate(process_cpu_seconds_total{{{process}}}{RATE}))", "{{instance}}")],
            0,
            40,
            min=0,
        ),
        panel(
            "Process memory (resident)",
            "bytes",
            [(f"sum by (instance) (process_resident_memory_bytes{{{process}}})", "{{instance}}")],
            12,
            40,
            min=0,
        ),
        panel(
            "Ready instances",
            "short",
            # "scraped": instances whose gauge arrived, whatever the scrape job is named
            [(f"sum(quicknet_ready{{{INSTANCE}}})", "ready"), (f"count(quicknet_ready{{{INSTANCE}}})", "scraped")],
            0,
            48,
        ),
        panel(
            "CPU wait: ONNX Runtime runs waiting for another model's (s/s)",
            "short",
            [(f"sum by (instance) (rate(quicknet_cpu_wait_seconds_total{{{INSTANCE}}}{RATE}))", "{{instance}}")],
            12,
            48,
            min=0,
        ),
    ]
    # GPU panels: in a row that is collapsed, so a CPU-only service shows one closed header, not
    # two empty graphs; their queries are empty without NVML samples (no GPU, no gpu label values).
    gpu = [
        panel(
            "GPU utilization",
            "percentunit",
            [(f"avg by (instance, gpu) (quicknet_gpu_utilization_ratio{{{INSTANCE}}})", "{{instance}} gpu {{gpu}}")],
            0,
            57,
            min=0,
            max=1,
        ),
        panel(
            "GPU memory used",
            "bytes",
            [(f"sum by (instance, gpu) (quicknet_gpu_memory_used_bytes{{{INSTANCE}}})", "{{instance}} gpu {{gpu}}")],
            12,
            57,
            min=0,
        ),
    ]
    layout = [*panels, row(GPU_ROW, 56, collapsed=True, panels=gpu)]
    for i, p in enumerate([*panels, *gpu, layout[-1]], 1):
        p["id"] = i
    return {
        "uid": "quicknet-serving",
        "title": "QuickNet Serving",
        "schemaVersion": 39,
        "version": 3,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "tags": ["quicknet"],
        "timezone": "browser",
        "templating": {
            "list": [
                variable("instance", "label_values(quicknet_ready, instance)"),
                variable("model", "label_values(quicknet_images_total, model)"),
            ]
        },
        "annotations": {"list": []},
        "panels": layout,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
