"""The offline build: data, the model, training, folding, ONNX export, compiling (ONNX Runtime
INT8, TensorRT, the fused Triton engine), evaluation, the pipeline that publishes to the model
store, and the GPU jobs. Needs torch (the `build` extra); the server never imports it at start.

Imports only downward: `quicknet.errors`, `quicknet.fsutil`, `quicknet.store`, `quicknet.ort_graph`.
"""
