"""Plain FastAPI + uvicorn, no batching: decode the PNG body, run the model on one image, answer.

python -m benchmarks.peer_servers.fastapi_plain MODEL.onnx PORT
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI, Request

from benchmarks.peer_servers.common import decode_png, session, top5

sess = session(sys.argv[1])
app = FastAPI()


@app.post("/classify")
async def classify(request: Request) -> dict:
    pixels = decode_png(await request.body())
    logits = sess.run(None, {"images": pixels[None]})[0][0]
    return {"predictions": top5(logits)}


@app.get("/health")
async def health() -> dict:
    return {"ok": True}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
