"""The QuickNet Python client: classify images with a running `quicknet serve`, over REST or gRPC,
blocking (`Client`) or with asyncio (`AsyncClient`).

    from quicknet.client import Client

    with Client("127.0.0.1:8000", timeout=5) as client:    # or "grpc://127.0.0.1:8001"
        print(client.classify("examples/cat.png").label)    # cat
        for r in client.classify_batch(["examples/ship.png", open("x.jpg", "rb").read(), pil_image]):
            print(r.label, r.score, r.model, r.version)
        labels = [r.label for r in client.classify_batch(uint8_nhwc_array)]

Design. Its own light extra (`pip install 'quicknet-serving[client]'`: httpx, grpcio, protobuf,
numpy, pillow, tqdm; no torch, no FastAPI). Inputs are paths, encoded bytes, uint8 H x W x 3 (or
N x H x W x 3) arrays and PIL images; 32x32 arrays travel as raw pixels, everything else encoded.
Calls are split under the server's per-request limits; refusals that say "later" (429 / 503,
RESOURCE_EXHAUSTED / UNAVAILABLE, a refused connection) are retried with jittered exponential
backoff, honouring the server's Retry-After (header or gRPC trailing metadata), within the call's
deadline (`X-Request-Timeout-Ms` on REST, the gRPC deadline); every failure is one
`QuickNetClientError` with the HTTP status and the server's one-line message.

gRPC uses the generated stubs in `quicknet.api._generated` (`classifier_pb2`, `classifier_pb2_grpc`),
imported lazily, only when a `grpc://` URL is used. They are the API contract: pure protobuf and
grpcio code made from `proto/quicknet/v1/classifier.proto`, with no dependency on the server. This
is the one place `quicknet/` imports from `quicknet/serve/`; the build never does.

Files, one job each: `results` (what calls return and raise), `inputs` (images to wire payloads),
`endpoint` (URL, TLS, API key), `retry` (backoff), `plan` (chunking, retries, isolating a bad
image: no I/O), `rest` and `rpc` (the transports), `client` (the two clients), `cli`
(`quicknet classify`, the batch tool).
"""

from __future__ import annotations

from quicknet.client.client import AsyncClient, Client
from quicknet.client.endpoint import default_url
from quicknet.client.results import Prediction, QuickNetClientError, Result
from quicknet.client.retry import Retry

__all__ = ["AsyncClient", "Client", "Prediction", "QuickNetClientError", "Result", "Retry", "default_url"]
