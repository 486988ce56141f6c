"""PyTriton: Triton's core with its dynamic batcher (max batch 64), the model in a Python callable;
clients send KServe v2 JSON with a UINT8 [1,32,32,3] tensor.

    python -m benchmarks.peer_servers.pytriton_app MODEL.onnx HTTP_PORT GRPC_PORT
"""

from __future__ import annotations

import sys

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from benchmarks.peer_servers.common import session

sess = session(sys.argv[1])


@batch
def infer(images: np.ndarray) -> dict:
    return {"logits": sess.run(None, {"images": images})[0]}


if __name__ == "__main__":
    config = TritonConfig(http_port=int(sys.argv[2]), grpc_port=int(sys.argv[3]), metrics_port=0, log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="quicknet",
            infer_func=infer,
            inputs=[Tensor(name="images", dtype=np.uint8, shape=(32, 32, 3))],
            outputs=[Tensor(name="logits", dtype=np.float32, shape=(10,))],
            config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=0)),
        )
        triton.serve()
