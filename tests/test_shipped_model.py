"""The model that `make serve` serves is what its metadata says it is."""

from __future__ import annotations

from quicknet import store
from quicknet.build.evaluate import evaluate_artifact
from quicknet.testing import SHIPPED_STORE


def test_shipped_model_accuracy_matches_its_metadata(cifar):
    mv = store.get_version(SHIPPED_STORE, store.default_model(SHIPPED_STORE))
    store.verify_files(mv)
    assert "JPEG-q75" in mv.metadata["dataset"]
    split = cifar.test.sample(2000, seed=2)
    for kind in ("onnx", "onnx-int8"):
        fname = mv.metadata["artifacts"].get(kind)
        if fname is None:
            continue
        report = evaluate_artifact(kind, mv.file(fname), split)
        published = mv.metadata["accuracy"][kind]["top1"]
        assert abs(report.top1 - published) <= 0.01, f"{kind}: {report.top1:.4f} on 2,000 vs {published:.4f} published"
