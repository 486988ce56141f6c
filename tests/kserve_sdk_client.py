"""Runs the kserve SDK's REST client against a server; prints top-1 per image as JSON.

Run in its own process: the SDK and tritonclient both register `inference.*` protobuf names.
    python tests/kserve_sdk_client.py URL MODEL PIXELS.npy BINARY(0|1)
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(url: str, model: str, pixels: np.ndarray, binary: bool) -> dict:
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=1, timeout=30))
    live = await client.is_server_live(url)
    ready = await client.is_server_ready(url)
    model_ready = await client.is_model_ready(url, model)
    inp = InferInput("images", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=binary)
    response = await client.infer(url, InferRequest(model, [inp]), model_name=model)
    logits = response.outputs[0].as_numpy()
    await client.close()
    return {"live": live, "ready": ready, "model_ready": model_ready, "top1": logits.argmax(1).tolist()}


if __name__ == "__main__":
    url, model, path, binary = sys.argv[1:5]
    print(json.dumps(asyncio.run(main(url, model, np.load(path), binary == "1"))))
