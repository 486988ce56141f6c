"""The fused GPU engine, TensorRT's role built with Triton: its kernels (`kernels`) and its file
format and runtime (`engine`: pack a folded model for the kernels, run them, write and read the
engine file, say whether it fits this machine).

Shared by the build, which compiles, gates and writes an engine (`quicknet.build.gpu_engine`), and
the service, which loads one (`quicknet.serve.backends.fused`), as `quicknet.store` and
`quicknet.ort_graph` are: the service imports no build code. Imports only `quicknet.errors`,
`quicknet.fsutil`, `quicknet.nvml` and `quicknet.store`; torch and triton only inside functions
(the kernels module at its top: it is imported only where Triton runs)."""
