"""Fuzz targets: every parser a client reaches, each a function `bytes -> None` that raises
`Finding` when the service would answer a 5xx (REST) or INTERNAL/UNKNOWN (gRPC), or when a
decoder raises anything but the one-line `InputError`.

Shared by tests/test_fuzz.py (hypothesis: structured inputs, a short run on every CI, plus a
replay of `tests/fuzz_corpus/`) and benchmarks/fuzz.py (atheris: the long coverage-guided run,
which saves every input that ever failed into that corpus). Inputs run in process through the
real app and servicers (routing, body limits, parsers, limits, error mapping) over a stand-in
model that answers zeros: the engine is not what is fuzzed, and it keeps each input ~1 ms.

Input formats (what a corpus file holds):
  image         an encoded image (any bytes)
  classify      content-type \\n query-string \\n X-Request-Timeout-Ms \\n body   (POST /classify)
  kserve_rest   Inference-Header-Content-Length \\n body   (POST /v2/models/<m>/infer; empty: no header)
  grpc          one byte choosing the method (`GRPC_METHODS`), then the request message's bytes
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from quicknet.serve.batcher import Batcher, Timing
from quicknet.serve.errors import InputError
from quicknet.serve.images import Limits, decode_image
from quicknet.serve.model import ModelHandle, ModelInfo, Statistics
from quicknet.serve.transport.grpc import INTERNAL_ERROR

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "fuzz_corpus"
LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MODEL = "quicknet-xs"
LIMITS = Limits(max_image_bytes=1 << 20, max_image_pixels=1 << 20, max_images=16)
GRPC_METHODS = (
    "/quicknet.v1.Classifier/Classify",
    "/quicknet.v1.Classifier/ClassifyBatch",
    "/quicknet.v1.Classifier/ClassifyStream",
    "/inference.GRPCInferenceService/ModelInfer",
    "/inference.GRPCInferenceService/ModelStreamInfer",
    "/inference.GRPCInferenceService/ModelMetadata",
    "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/ModelStatistics",
)


class Finding(Exception):
    """An input the service mishandles: a 5xx, an INTERNAL, or an exception where a 4xx belongs."""


class ZeroModel(ModelHandle):
    """A model version whose engine answers zeros, behind the real batcher (deadlines, queue limits)."""

    def __init__(self) -> None:
        self.info = ModelInfo(
            name=MODEL,
            version=1,
            labels=LABELS,
            metadata={},
            backend="onnxruntime",
            description={},
            max_batch_size=LIMITS.max_images,
        )
        self.batcher = Batcher(
            self._zeros, model=MODEL, backend="zero", max_batch_size=LIMITS.max_images, max_queue_images=1024
        )

    @staticmethod
    def _zeros(images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3), images.shape
        return np.zeros((len(images), 10), np.float32)

    async def submit(self, images: np.ndarray, deadline: float, protocol: str) -> tuple[np.ndarray, Timing]:
        return await self.batcher.submit(images, deadline, protocol)

    async def statistics(self) -> dict:
        return Statistics().to_dict()


class _Logged(logging.Handler):
    """Keeps the last exception the service logged, so a 500 comes with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.last = record.exc_info[1]


class _Aborted(Exception):
    pass


class _Context:
    """The slice of grpc.aio.ServicerContext the servicers use."""

    def __init__(self) -> None:
        self.status: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.status, self.details = code, details
        raise _Aborted

    def code(self) -> grpc.StatusCode | None:
        return self.status

    def set_trailing_metadata(self, metadata: tuple) -> None:
        self.trailing = tuple(metadata)

    def trailing_metadata(self) -> tuple:
        return getattr(self, "trailing", ())

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple:
        return ()


class _Capture:
    """Stands in for the grpc server: keeps the (guarded) handlers a front registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers.update({f"/{service}/{name}": h for name, h in handlers.items()})


class Harness:
    """The service's fronts in this process, over `ZeroModel`; one event loop for every input."""

    def __init__(self) -> None:
        from quicknet.serve.classifier import grpc as classifier_grpc
        from quicknet.serve.classifier import rest as classifier_rest
        from quicknet.serve.config import Settings
        from quicknet.serve.kserve import grpc as kserve_grpc
        from quicknet.serve.kserve import rest as kserve_rest
        from quicknet.serve.runtime import Runtime
        from quicknet.serve.transport.app import create_app
        from quicknet.serve.transport.grpc import Registrar

        settings = Settings(
            max_image_bytes=LIMITS.max_image_bytes,
            max_image_pixels=LIMITS.max_image_pixels,
            max_images_per_request=LIMITS.max_images,
            max_request_bytes=4 << 20,
            access_log=False,
        )
        self.loop = asyncio.new_event_loop()
        self.model = ZeroModel()
        self.loop.call_soon(self.model.batcher.start)
        self.loop.run_until_complete(asyncio.sleep(0))
        self.runtime = Runtime(settings)
        self.runtime.install([self.model], MODEL)
        self.app = create_app(self.runtime, [classifier_rest, kserve_rest])
        capture = _Capture()
        for front in (classifier_grpc, kserve_grpc):
            registrar = Registrar(capture, front.PROTOCOL)  # type: ignore[arg-type]
            front.add_to_server(registrar, self.runtime)
        self.grpc = capture.handlers
        self.logged = _Logged()
        self.last = ""  # the last input's outcome: "ok" (a 200 / OK / decoded image) or "refused"
        logging.getLogger("quicknet").addHandler(self.logged)
        self.targets: dict[str, Callable[[bytes], None]] = {
            "image": self.image,
            "classify": self.classify,
            "kserve_rest": self.kserve_rest,
            "grpc": self.grpc_call,
        }

    def close(self) -> None:
        logging.getLogger("quicknet").removeHandler(self.logged)
        self.loop.run_until_complete(self.model.batcher.close())
        self.loop.close()

    # --- targets ------------------------------------------------------------------------------

    def image(self, data: bytes) -> None:
        self.last = "refused"
        try:
            pixels = decode_image(data, LIMITS)
        except InputError:
            return
        except Exception as e:
            raise Finding(f"decode_image raised {type(e).__name__}: {e}") from e
        if pixels.shape != (32, 32, 3) or pixels.dtype != np.uint8:
            raise Finding(f"decode_image returned {pixels.dtype} {pixels.shape}")
        self.last = "ok"

    def classify(self, data: bytes) -> None:
        content_type, query, timeout, body = [*data.split(b"\n", 3), b"", b"", b""][:4]
        headers = [(b"content-type", content_type)] if content_type else []
        if timeout:
            headers.append((b"x-request-timeout-ms", timeout))
        self._rest("/classify", query, headers, body)

    def kserve_rest(self, data: bytes) -> None:
        header_length, _, body = data.partition(b"\n")
        headers = [(b"content-type", b"application/json")]
        if header_length:
            headers.append((b"inference-header-content-length", header_length))
        self._rest(f"/v2/models/{MODEL}/infer", b"", headers, body)

    def grpc_call(self, data: bytes) -> None:
        self.last = "refused"
        self.logged.last = None
        if not data:
            return
        method = GRPC_METHODS[data[0] % len(GRPC_METHODS)]
        handler = self.grpc[method]
        context = _Context()

        async def call():
            if handler.request_streaming:

                async def requests():
                    yield data[1:]

                return [reply async for reply in handler.stream_stream(requests(), context)]
            return await handler.unary_unary(data[1:], context)

        try:
            replies = self.loop.run_until_complete(call())
        except _Aborted:
            if context.status in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                raise Finding(f"{method}: {context.status.name} {context.details}") from self.logged.last
            return
        except Exception as e:
            raise Finding(f"{method} raised {type(e).__name__}: {e}") from e
        for reply in replies if isinstance(replies, list) else ():
            message = getattr(reply, "error_message", "")
            if message.startswith("inference failed") or message == INTERNAL_ERROR:  # INTERNAL, inside a stream
                raise Finding(f"{method}: stream error {message}") from self.logged.last
        streamed_errors = any(getattr(r, "error_message", "") for r in replies) if isinstance(replies, list) else False
        self.last = "refused" if streamed_errors else "ok"

    # --- plumbing -----------------------------------------------------------------------------

    def _rest(self, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        try:
            headers = [(k, v.decode("latin-1").encode("latin-1")) for k, v in headers]
        except UnicodeError:
            return
        headers.append((b"content-length", str(len(body)).encode()))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        sent = False
        status: list[int] = []
        answer: list[bytes] = []

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never leaves

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body":
                answer.append(message.get("body", b""))

        self.logged.last = None
        try:
            self.loop.run_until_complete(self.app(scope, receive, send))
        except Exception as e:
            raise Finding(f"POST {path} raised {type(e).__name__}: {e}") from e
        self.last = "ok" if status and status[0] == 200 else "refused"
        if not status or status[0] >= 500:
            raise Finding(
                f"POST {path} answered {status[0] if status else 'nothing'}: {b''.join(answer)[:300]!r}"
            ) from (self.logged.last)


# --- seeds: valid and nearly valid inputs, the starting points for both fuzzers ------------------


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def image_seeds() -> list[bytes]:
    """Every accepted format and mode, an unaccepted format, and headers that declare bombs."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    seeds = [p.read_bytes() for p in sorted(examples.glob("*")) if p.suffix in (".png", ".jpg")]
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    seeds += [
        _encode(rgb, "PNG"),
        _encode(rgb, "JPEG", quality=75),
        _encode(rgb, "WEBP", quality=80),
        _encode(rgb, "BMP"),
        _encode(rgb.convert("P"), "GIF"),
        _encode(rgb.convert("L"), "PNG"),
        _encode(rgb.convert("RGBA"), "PNG"),
        _encode(rgb.convert("LA"), "PNG"),
        _encode(rgb.convert("1"), "PNG"),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(Image.fromarray(rng.integers(0, 65536, (32, 32), dtype=np.uint16)), "PNG"),
        _encode(rgb.resize((64, 48)), "PNG"),
        _encode(rgb, "TIFF"),
        _encode(rgb.convert("P"), "GIF", save_all=True, append_images=[rgb.convert("P")]),
    ]
    png = _encode(Image.new("L", (1, 1)), "PNG")  # the IHDR says 1x1; make it say 100000 x 100000
    seeds.append(png[:16] + (100000).to_bytes(4, "big") * 2 + png[24:])
    return seeds


def _tensor_json(pixels: bytes, n: int) -> dict:
    return {"name": "images", "datatype": "UINT8", "shape": [n, 32, 32, 3], "data": list(pixels)}


def classify_seeds() -> list[bytes]:
    png = image_seeds()[3]
    b64 = base64.b64encode(png).decode()
    boundary = b"fuzzboundary"
    multipart = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--" + boundary + b"--\r\n"
    )
    return [
        b"image/png\ntop_k=3\n\n" + png,
        b"application/octet-stream\n\n\n" + bytes(3072 * 2),
        b"application/json\n\n1000\n" + json.dumps({"image": b64, "top_k": 2}).encode(),
        b"application/json\n\n\n" + json.dumps({"images": [b64, b64]}).encode(),
        b"multipart/form-data; boundary=" + boundary + b"\ntop_k=1\n\n" + multipart,
    ]


def kserve_rest_seeds() -> list[bytes]:
    png = image_seeds()[3]
    pixels = bytes(3072)
    doc = {"inputs": [_tensor_json(pixels, 1)], "outputs": [{"name": "logits", "parameters": {"classification": 3}}]}
    bytes_doc = {
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png).decode()]}]
    }
    binary_header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [1, 32, 32, 3],
                    "parameters": {"binary_data_size": 3072},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return [
        b"\n" + json.dumps(doc).encode(),
        b"\n" + json.dumps(bytes_doc).encode(),
        str(len(binary_header)).encode() + b"\n" + binary_header + pixels,
    ]


def grpc_seeds() -> list[bytes]:
    from quicknet.api._generated import classifier_pb2 as cpb
    from quicknet.api._generated import grpc_predict_v2_pb2 as kpb

    png = image_seeds()[3]
    infer = kpb.ModelInferRequest(model_name=MODEL, id="x")
    infer.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 3])
    infer.raw_input_contents.append(bytes(3072))
    out = infer.outputs.add(name="logits")
    out.parameters["classification"].int64_param = 2
    typed = kpb.ModelInferRequest(model_name=MODEL)
    tensor = typed.inputs.add(name="images", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(png)
    messages = {
        0: cpb.ClassifyRequest(image=cpb.Image(encoded=png), top_k=3, request_id="r"),
        1: cpb.ClassifyBatchRequest(images=[cpb.Image(pixels=bytes(3072)), cpb.Image(encoded=png)], top_k=2),
        2: cpb.ClassifyRequest(image=cpb.Image(pixels=bytes(3072))),
        3: infer,
        4: typed,
        5: kpb.ModelMetadataRequest(name=MODEL, version="1"),
        6: kpb.ModelReadyRequest(name=MODEL),
        7: kpb.ModelStatisticsRequest(name=MODEL),
    }
    return [bytes([i]) + m.SerializeToString() for i, m in messages.items()]


SEEDS: dict[str, Callable[[], list[bytes]]] = {
    "image": image_seeds,
    "classify": classify_seeds,
    "kserve_rest": kserve_rest_seeds,
    "grpc": grpc_seeds,
}


def corpus(target: str) -> list[Path]:
    return sorted((CORPUS / target).glob("*.bin"))


def save_finding(target: str, data: bytes) -> Path:
    """Keep an input that failed, named by its hash, for every later run to replay."""
    path = CORPUS / target / f"{hashlib.sha1(data).hexdigest()[:16]}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path
