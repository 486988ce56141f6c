"""LitServe with its dynamic batching (max 32 per batch, 5 ms timeout), multipart uploads.

python -m benchmarks.peer_servers.litserve_app MODEL.onnx PORT
"""

from __future__ import annotations

import sys

import litserve as ls
import numpy as np

from benchmarks.peer_servers.common import decode_png, session, top5


class QuickNetAPI(ls.LitAPI):
    def setup(self, device):
        self.sess = session(sys.argv[1])

    def decode_request(self, request):
        return decode_png(request["image"].file.read())

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        return self.sess.run(None, {"images": x})[0]

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"predictions": top5(output)}


if __name__ == "__main__":
    api = QuickNetAPI(max_batch_size=32, batch_timeout=0.005)
    server = ls.LitServer(api, accelerator="cpu", api_path="/classify", workers_per_device=1)
    server.run(port=int(sys.argv[2]), host="127.0.0.1", log_level="warning", generate_client_file=False)
