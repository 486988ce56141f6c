"""The fused GPU engine (`quicknet.fused`): QuickNet in Triton kernels compiled for this GPU.

A version lists it as the artifact `fused-gpu` (hashed like every artifact). It loads only on the
machine it was built for: same GPU, compute capability, driver, torch, CUDA, Triton and kernel
source, and only beside the model file it was built from (the engine names it and its SHA-256; the
weights are packed from it at load). Anywhere else `choose()` logs one line saying what differs
and serves the eager torch engine. Loaded, it runs inside the torch engine's machinery (lanes,
pinned buffers, one CUDA graph per batch bucket): only the module differs, ~10 kernels a batch
instead of ~31.

torch, triton and `quicknet.fused.engine` are imported here only, and only on a GPU machine that has
them: the CPU service never imports this module.
"""

from __future__ import annotations

from pathlib import Path

from quicknet.serve.backends.base import BackendError
from quicknet.serve.backends.pytorch import TorchBackend, load_spec
from quicknet.serve.config import Settings
from quicknet.store import ModelVersion

KIND = "fused-gpu"


def engine_fits(version: ModelVersion) -> tuple[Path | None, str | None]:
    """(the engine's path, None) when the version has one built for this machine; (None, why not)
    when it has one built for another; (None, None) when it has none."""
    fname = version.metadata.get("artifacts", {}).get(KIND)
    if not fname:
        return None, None
    path = version.file(fname)
    where = f"{version.name} v{version.version}: fused engine {fname}"
    try:
        from quicknet.fused import engine as fe

        doc = fe.read_doc(path)
        differs = fe.mismatch(doc.get("built_for", {}), fe.current_identity())
    except Exception as e:  # no triton, an unreadable file: the eager engine serves either way
        return None, f"{where} cannot be used here ({type(e).__name__}: {e})"
    if differs:
        return None, f"{where} was built for another machine: {'; '.join(differs)}"
    if why := fe.not_built_from(doc, version.metadata["files"]):
        return None, f"{where} {why}"
    return path, None


def batch_too_big(settings: Settings) -> str | None:
    """Why the fused engine cannot serve batches this large, or None (`quicknet.fused.engine.MAX_BATCH`)."""
    from quicknet.fused.engine import MAX_BATCH

    if settings.max_batch_size > MAX_BATCH:
        asked = settings.max_batch_size
        return f"the fused engine runs batches of up to {MAX_BATCH} images, and --max-batch-size is {asked}"
    return None


class FusedBackend(TorchBackend):
    name = "fused"

    @classmethod
    def load(cls, version: ModelVersion, settings: Settings) -> FusedBackend:
        try:
            import torch

            from quicknet.fused import engine as fe
        except ImportError as e:
            raise BackendError(f"the fused engine needs torch and triton ({e}); serve with --backend torch") from None
        path, refused = engine_fits(version)
        if path is None:
            raise BackendError(f"{refused or 'this version has no fused engine'}; serve with --backend torch")
        if why := batch_too_big(settings):
            raise BackendError(f"{why}: lower it, or serve with --backend torch")
        try:
            doc = fe.read_artifact(path, fe.triton_cache_dir())
            arrays = fe.weights_for(doc, load_spec(str(version.file(doc["source"]["file"]))))
        except Exception as e:  # a damaged zip passes no hash check in the first place; say what it was
            raise BackendError(f"cannot read {path.name} ({type(e).__name__}: {e}); rebuild the engine") from None
        device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: Triton's interpreter (tests)
        if device == "cpu":
            torch.set_num_threads(settings.threads)
        backend = cls(fe.FusedNet(doc["layers"], arrays, doc["configs"], device), device, settings, str(path), True)
        backend.built_for = doc["built_for"]
        return backend

    def describe(self) -> dict:
        return super().describe() | {"backend": self.name, "engine": "fused triton", "built_for": self.built_for}
