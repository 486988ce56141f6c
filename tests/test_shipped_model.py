"""The model that `make serve` serves is what its metadata says it is."""

from __future__ import annotations

from collections import Counter

from quicknet import store
from quicknet.build.evaluate import evaluate_artifact
from quicknet.testing import SHIPPED_STORE


def test_shipped_model_accuracy_matches_its_metadata(cifar):
    """Scored on 2,000 of the 10k test images: FP32 within 1 point of its published full-split
    score; INT8 by its difference to FP32 on the same images, within 0.5 point of the published
    difference (the publish gate's size: a paired difference strays far less than either score)."""
    mv = store.get_version(SHIPPED_STORE, store.default_model(SHIPPED_STORE))
    store.verify_files(mv)
    assert "JPEG-q75" in mv.metadata["dataset"]
    split = cifar.test.sample(2000, seed=2)
    published = {kind: mv.metadata["accuracy"][kind]["top1"] for kind in ("onnx", "onnx-int8")}
    scored = {kind: evaluate_artifact(kind, mv.file(mv.metadata["artifacts"][kind]), split).top1 for kind in published}
    assert abs(scored["onnx"] - published["onnx"]) <= 0.01, (scored, published)
    gap, published_gap = scored["onnx-int8"] - scored["onnx"], published["onnx-int8"] - published["onnx"]
    assert abs(gap - published_gap) <= 0.005, (scored, published)


def test_the_shipped_int8_models_are_quantized_from_orts_fast_prelu_form():
    """What republishing gave them (quicknet/ort_graph.py): int8 1x1 scalings, no float Min."""
    import onnx

    for name in store.list_models(SHIPPED_STORE):
        mv = store.get_version(SHIPPED_STORE, name)
        ops = Counter(n.op_type for n in onnx.load(mv.file(mv.metadata["artifacts"]["onnx-int8"])).graph.node)
        assert ops["Min"] == 0 and ops["Conv"] == 17 + 18, (name, ops)
