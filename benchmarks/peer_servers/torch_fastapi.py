"""Plain FastAPI + the same torch model, no batching: the GPU peer of `benchmarks.gpu_serve`.

    python -m benchmarks.peer_servers.torch_fastapi STORE PORT

What a user writing their own server would run: one `async def` route that reads the request's
raw uint8 pixels (N x 32 x 32 x 3, what `hey` and our clients send), runs the model on them on the
event loop and answers the top 5 per image. The model is the service's own torch engine for the
store's default version (fp16, channels_last, one CUDA graph per batch size), so the comparison
measures the serving, not the engine. Its buckets go to 64: a request is run whole.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from benchmarks.peer_servers.common import top5
from quicknet import store
from quicknet.serve.backends.pytorch import TorchBackend
from quicknet.serve.config import Settings

root = Path(sys.argv[1])
engine = TorchBackend.load(
    store.get_version(root, store.default_model(root)), Settings(backend="torch", max_batch_size=64, instances=1)
)
engine.warmup()
app = FastAPI()


@app.post("/classify")
async def classify(request: Request) -> Response:
    body = await request.body()
    if not body or len(body) % 3072:
        return JSONResponse({"error": "send N x 32 x 32 x 3 uint8 pixels"}, status_code=400)
    logits = engine.infer(np.frombuffer(body, dtype=np.uint8).reshape(-1, 32, 32, 3))
    return JSONResponse({"predictions": [top5(row) for row in logits]})


@app.get("/health")
async def health() -> dict:
    return {"ok": True}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
