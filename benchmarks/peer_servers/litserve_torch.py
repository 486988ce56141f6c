"""LitServe with its dynamic batching + the same torch model: the second GPU peer of `benchmarks.gpu_serve`.

    python -m benchmarks.peer_servers.litserve_torch STORE PORT

LitServe reads JSON or form bodies only, so its clients send `{"pixels": "<base64 of 32x32x3
uint8>"}` (`benchmarks.gpu_serve.peer_sweep` builds it); one image a request, batched by LitServe
(up to 64, 2 ms timeout) onto the service's own torch engine for the store's default version, as
`torch_fastapi` uses it.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import litserve as ls
import numpy as np

from benchmarks.peer_servers.common import top5


class QuickNetAPI(ls.LitAPI):
    def setup(self, device):
        from quicknet import store
        from quicknet.serve.backends.pytorch import TorchBackend
        from quicknet.serve.config import Settings

        root = Path(sys.argv[1])
        version = store.get_version(root, store.default_model(root))
        self.engine = TorchBackend.load(version, Settings(backend="torch", max_batch_size=64, instances=1))
        self.engine.warmup()

    def decode_request(self, request):
        return np.frombuffer(base64.b64decode(request["pixels"]), dtype=np.uint8).reshape(32, 32, 3)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        return self.engine.infer(x)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"predictions": top5(output)}


if __name__ == "__main__":
    import torch

    api = QuickNetAPI(max_batch_size=64, batch_timeout=0.002, api_path="/classify")
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=1)
    server.run(port=int(sys.argv[2]), host="127.0.0.1", log_level="warning", generate_client_file=False)
