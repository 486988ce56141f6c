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


def test_the_readme_model_table_states_what_the_shipped_versions_record():
    """The README's table of published models, up to its speed columns, is each shipped model's
    newest version as its metadata.json records it (`quicknet adopt-gpu-run` prints the row for a
    version it publishes): a store changed without the table fails here, naming the cells."""
    from quicknet.build.adopt import model_table_cells
    from quicknet.testing import REPO

    section = (REPO / "README.md").read_text().split("\n## The published models\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    header = next(line for line in lines if line.startswith("| model |")).strip(" |").split(" | ")
    rows = [line.strip(" |").split(" | ") for line in lines if line.startswith("| `")]
    readme = {row[0].split("`")[1]: row for row in rows}
    models = store.list_models(SHIPPED_STORE)
    assert sorted(readme) == models and len(rows) == len(models), "one row per shipped model"
    for row in rows:  # adopt prints `?` where the speed columns are still to be measured
        assert len(row) == len(header) and "?" not in row, row
    default = store.default_model(SHIPPED_STORE)
    for name in models:
        cells = model_table_cells(store.get_version(SHIPPED_STORE, name), default=default)
        assert readme[name][: len(cells)] == cells, (name, readme[name][: len(cells)], cells)
    assert f"`DEFAULT` names `{default}`" in section
