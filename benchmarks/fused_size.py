"""What a fused GPU engine file weighs (issue 27), measured without a GPU:

    python -m benchmarks.fused_size [--model quicknet]

Compiles the fused kernels of the model's layer plan for Hopper (sm_90) with Triton's own ptxas,
each layer with its largest candidate tiles for small batches and for large ones (the configuration
a GPU build keeps is tuned there; tile shapes change a cubin's size little), into a private Triton
cache, then writes the engine file exactly as the build does (`quicknet.fused.engine.write_artifact`: each
kernel's metadata and cubin, deflated) and prints its size beside the weights' in the kernels'
layouts, which the file does not carry (the service packs them from the version's `model.onnx`).
About 15 s for the full quicknet on 2 cores. Untrained weights: sizes do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

SEPARABLE = {"x_ptr": "*fp16", "dw_ptr": "*fp32", "pw_ptr": "*fp16", "bias_ptr": "*fp32", "slope_ptr": "*fp32"}
STEM = {"x_ptr": "*u8", "w_ptr": "*fp16", "scale_ptr": "*fp32", "shift_ptr": "*fp32", "bias_ptr": "*fp32"}


def compile_layer(layer: dict, cfg: dict, capability: int = 90):
    """One layer's kernel with `cfg`'s tiles, compiled for `capability` (into Triton's cache too)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from quicknet.fused import kernels as k

    tiles = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
    if layer["kind"] == "stem":
        fn, signature = k.stem_kernel, {**STEM, "slope_ptr": "*fp32", "out_ptr": "*fp16", "n_images": "i32"}
        consts = {"COUT": layer["cout"], "H": layer["h"], "W": layer["w"], "K": k.STEM_K, **tiles}
    else:
        out = "*fp32" if layer["mean"] else "*fp16"
        fn, signature = k.separable_kernel, {**SEPARABLE, "out_ptr": out, "n_images": "i32"}
        consts = {"CIN": layer["cin"], "COUT": layer["cout"], "H": layer["h"], "W": layer["w"]}
        consts |= {"POOL": layer["pool"], "MEAN": layer["mean"], "RESIDUAL": layer.get("residual", False)}
        consts |= {"BLOCK_K": cfg["BLOCK_K"], **tiles}
    source = triton.compiler.ASTSource(
        fn=fn, signature={**signature, **dict.fromkeys(consts, "constexpr")}, constexprs=consts
    )
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def measure(model: str) -> dict:
    from quicknet.build.export import folded_spec
    from quicknet.build.fold import fold
    from quicknet.build.model import build_model
    from quicknet.fused import engine as fe

    layers, arrays = fe.pack(folded_spec(fold(build_model(model).eval())))
    cache = Path(os.environ["TRITON_CACHE_DIR"])
    kernels = 0
    for small in (True, False):
        for layer in layers:
            if layer["kind"] != "head":
                compile_layer(layer, fe.candidate_configs(layer, small)[-1])
                kernels += 1
    keys = {p.name for p in cache.iterdir() if p.is_dir()}
    cubins = sum(f.stat().st_size for f in cache.rglob("*.cubin"))
    engine = fe.write_artifact(cache.parent / "engine.zip", {"layers": layers}, cache, keys)
    return {
        "model": model,
        "kernels": kernels,
        "cubin_bytes": cubins,
        "engine_file_bytes": engine.stat().st_size,
        "weights_bytes_not_carried": sum(a.nbytes for a in arrays.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="quicknet")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # before triton is imported: a private cache (every kernel compiled here, nothing reused),
        # and real compiles, not the interpreter
        os.environ["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")
        os.environ.pop("TRITON_INTERPRET", None)
        print(json.dumps(measure(args.model)))


if __name__ == "__main__":
    main()
