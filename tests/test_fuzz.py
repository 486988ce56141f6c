"""Fuzzing every parser a client reaches (see benchmarks/fuzzing.py): structured hostile inputs from
hypothesis, a short deterministic run on each CI, then every input that ever failed
(`tests/fuzz_corpus/`) replayed. The long coverage-guided run is `python -m benchmarks.fuzz`.

A failure prints the input; `benchmarks.fuzzing.save_finding(target, data)` keeps it in the corpus."""

from __future__ import annotations

import base64
import json
import logging
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzzing import CORPUS, GRPC_METHODS, MODEL, SEEDS, Harness

EXAMPLES = 800
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # CI is reproducible; the long random search is benchmarks/fuzz.py
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def harness():
    # python-multipart logs every malformed part at warning level: thousands of lines here
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    h = Harness()
    yield h
    h.close()


IMAGE_SEEDS = SEEDS["image"]()


# --- strategies --------------------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),  # NaN and ±Infinity too: Python's json reads them
    st.text(max_size=8),
)
json_value = st.recursive(
    json_leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)


# where each format's header declares the image size (decompression bombs live there)
SIZE_FIELDS = {
    b"\x89PNG": (16, ">I", 0, 2**32 - 1),
    b"BM": (18, "<i", -(2**31), 2**31 - 1),
    b"GIF8": (6, "<H", 0, 2**16 - 1),
}


@st.composite
def mutated_image(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(IMAGE_SEEDS)))
    field = next((f for magic, f in SIZE_FIELDS.items() if data.startswith(magic)), None)
    if field is not None and draw(st.booleans()):
        offset, code, lo, hi = field
        size = struct.calcsize(code)
        for k in range(2):  # width and height
            data[offset + k * size : offset + (k + 1) * size] = struct.pack(code, draw(st.integers(lo, hi)))
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


b64_image = mutated_image().map(lambda b: base64.b64encode(b).decode())


@st.composite
def classify_input(draw) -> bytes:
    kind = draw(st.sampled_from(["json", "multipart", "image", "pixels", "other"]))
    query = draw(st.sampled_from([b"", b"top_k=3", b"top_k=0", b"top_k=abc", b"top_k=99999999999999999999"]))
    timeout = draw(st.sampled_from([b"", b"1000", b"0", b"-1", b"nan", b"inf", b"1e400", b"x"]))
    if kind == "json":
        doc = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "image": b64_image | json_value,
                    "images": st.lists(b64_image | json_value, max_size=20) | json_value,
                    "top_k": st.integers(-5, 15) | json_value,
                },
            )
            | json_value
        )
        return b"application/json\n" + query + b"\n" + timeout + b"\n" + json.dumps(doc).encode()
    if kind == "multipart":
        boundary = draw(st.sampled_from([b"b0undary", b"x" * 70, b""]))
        parts = []
        for _ in range(draw(st.integers(0, 18))):
            name = draw(st.sampled_from([b"image", b"images", b"other", b'"', b""]))
            filename = draw(st.sampled_from([b'; filename="a.png"', b"", b'; filename="\xff"']))
            ctype = draw(st.sampled_from([b"Content-Type: image/png\r\n", b"", b"Content-Type: \x00\r\n"]))
            body = draw(mutated_image()) if draw(st.booleans()) else draw(st.binary(max_size=64))
            parts.append(
                b"--"
                + boundary
                + b'\r\nContent-Disposition: form-data; name="'
                + name
                + b'"'
                + filename
                + b"\r\n"
                + ctype
                + b"\r\n"
                + body
                + b"\r\n"
            )
        tail = b"--" + boundary + b"--\r\n" if draw(st.booleans()) else draw(st.binary(max_size=16))
        header = b"multipart/form-data; boundary=" + boundary + draw(st.sampled_from([b"", b"; charset=utf-8", b";"]))
        return header + b"\n" + query + b"\n" + timeout + b"\n" + b"".join(parts) + tail
    if kind == "image":
        ctype = draw(st.sampled_from([b"image/png", b"image/jpeg", b"image/anything", b"image/"]))
        return ctype + b"\n" + query + b"\n" + timeout + b"\n" + draw(mutated_image())
    if kind == "pixels":
        n = draw(st.sampled_from([0, 1, 3071, 3072, 3073, 6144, 3072 * 17]))
        return b"application/octet-stream\n" + query + b"\n" + timeout + b"\n" + bytes(n)
    return draw(st.binary(max_size=32)) + b"\n" + query + b"\n" + timeout + b"\n" + draw(st.binary(max_size=256))


@st.composite
def kserve_input(draw) -> bytes:
    n = draw(st.sampled_from([1, 2, 0, -1, 17]))
    datatype = draw(st.sampled_from(["UINT8", "BYTES", "FP32"]) | json_value)
    shape = draw(
        st.sampled_from([[n, 32, 32, 3], [n], [n, 1], [n, 32, 32], [2**63, 32, 32, 3]])
        | st.lists(st.integers(-3, 40) | json_leaf, max_size=5)
        | json_value
    )
    size = draw(st.sampled_from([3072, 3071, 6144, 0]))
    data = draw(
        st.builds(lambda v, k: [v] * k, st.integers(0, 255) | json_leaf, st.just(size))
        | st.lists(b64_image, min_size=1, max_size=3)
        | st.lists(json_value, max_size=4)
        | json_value
    )
    params = draw(
        st.dictionaries(
            st.sampled_from(["binary_data_size", "classification", "binary_data", "binary_data_output"]),
            st.integers(-2, 4000) | json_leaf,
            max_size=2,
        )
        | json_value
    )
    tensor = draw(
        st.fixed_dictionaries(
            {"name": st.just("images") | json_leaf, "datatype": st.just(datatype), "shape": st.just(shape)},
            optional={"data": st.just(data), "parameters": st.just(params)},
        )
        | json_value
    )
    output = st.fixed_dictionaries(
        {"name": st.just("logits") | json_leaf},
        optional={
            "parameters": st.dictionaries(st.sampled_from(["classification", "binary_data"]), json_leaf) | json_value
        },
    )
    doc = draw(
        st.fixed_dictionaries(
            {"inputs": st.lists(st.just(tensor), min_size=1, max_size=2) | json_value},
            optional={"outputs": st.lists(output, max_size=2) | json_value, "parameters": json_value, "id": json_value},
        )
        | json_value
    )
    head = json.dumps(doc).encode()
    tail = draw(st.sampled_from([b"", bytes(3072), bytes(3071)]) | st.binary(max_size=64))
    length = draw(st.sampled_from([b"", str(len(head)).encode(), b"0", b"-1", b"x", b"99999999999999999999999"]))
    return length + b"\n" + head + tail


def _grpc_messages():
    from quicknet.api._generated import classifier_pb2 as cpb
    from quicknet.api._generated import grpc_predict_v2_pb2 as kpb

    int64, uint32 = st.integers(-(2**63), 2**63 - 1), st.integers(0, 2**32 - 1)
    image = st.builds(
        lambda encoded, pixels, pick: cpb.Image(encoded=encoded) if pick else cpb.Image(pixels=pixels),
        mutated_image(),
        st.sampled_from([0, 3071, 3072, 3073]).map(bytes) | st.binary(max_size=64),
        st.booleans(),
    )
    classify = st.builds(cpb.ClassifyRequest, image=image | st.just(cpb.Image()), top_k=uint32, request_id=st.text())
    batch = st.builds(cpb.ClassifyBatchRequest, images=st.lists(image, max_size=18), top_k=uint32)

    def tensor(name, datatype, shape, uints, blobs, ints):
        t = kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
        t.contents.uint_contents.extend(uints)
        t.contents.bytes_contents.extend(blobs)
        t.contents.int64_contents.extend(ints)
        return t

    tensors = st.builds(
        tensor,
        st.sampled_from(["images", "", "x"]),
        st.sampled_from(["UINT8", "BYTES", "FP32", "INT64", ""]),
        st.sampled_from([[1, 32, 32, 3], [1], [2, 1], [0], [-1, 32, 32, 3], [2**62, 32, 32, 3]])
        | st.lists(int64, max_size=5),
        st.builds(lambda v, k: [v] * k, uint32, st.sampled_from([0, 1, 3072, 3071])),
        st.lists(mutated_image(), max_size=3),
        st.lists(int64, max_size=3),
    )

    def parameter(choice, value):
        p = kpb.InferParameter()
        setattr(p, choice, value) if choice != "none" else None
        return p

    parameters = st.one_of(
        st.builds(parameter, st.just("int64_param"), int64),
        st.builds(parameter, st.just("bool_param"), st.booleans()),
        st.builds(parameter, st.just("string_param"), st.text(max_size=4)),
        st.builds(parameter, st.just("none"), st.none()),
    )

    def infer(model, version, inputs, raw, outputs):
        request = kpb.ModelInferRequest(model_name=model, model_version=version)
        request.inputs.extend(inputs)
        request.raw_input_contents.extend(raw)
        for name, params in outputs:
            out = request.outputs.add(name=name)
            for key, value in params.items():
                out.parameters[key].CopyFrom(value)
        return request

    infer_request = st.builds(
        infer,
        st.sampled_from([MODEL, "", "nope"]),
        st.sampled_from(["", "1", "2", "x", "99999999999999999999"]),
        st.lists(tensors, max_size=2),
        st.lists(st.sampled_from([bytes(3072), bytes(3071), b""]) | st.binary(max_size=32), max_size=2),
        st.lists(
            st.tuples(
                st.sampled_from(["logits", "x"]),
                st.dictionaries(st.sampled_from(["classification", "binary_data"]), parameters, max_size=2),
            ),
            max_size=2,
        ),
    )
    named = st.sampled_from([MODEL, "", "nope"])
    version = st.sampled_from(["", "1", "x", "-1"])
    return {
        0: classify,
        1: batch,
        2: classify,
        3: infer_request,
        4: infer_request,
        5: st.builds(kpb.ModelMetadataRequest, name=named, version=version),
        6: st.builds(kpb.ModelReadyRequest, name=named, version=version),
        7: st.builds(kpb.ModelStatisticsRequest, name=named, version=version),
    }


@st.composite
def grpc_input(draw) -> bytes:
    index = draw(st.integers(0, len(GRPC_METHODS) - 1))
    if draw(st.integers(0, 9)) == 0:  # bytes that may not be a message at all
        return bytes([index]) + draw(st.binary(max_size=64))
    return bytes([index]) + draw(_grpc_messages()[index]).SerializeToString()


# --- the properties ----------------------------------------------------------------------------


@FUZZ
@given(data=mutated_image() | st.binary(max_size=256))
def test_fuzz_image_decoding(harness, data):
    harness.image(data)


@FUZZ
@given(data=classify_input())
def test_fuzz_rest_classify(harness, data):
    harness.classify(data)


@FUZZ
@given(data=kserve_input())
def test_fuzz_kserve_rest(harness, data):
    harness.kserve_rest(data)


@FUZZ
@given(data=grpc_input())
def test_fuzz_grpc_services(harness, data):
    harness.grpc_call(data)


# Seeds meant to be refused: the image seeds' unaccepted format (TIFF) and bomb-sized header.
REFUSED_SEEDS = {"image": 2}


@pytest.mark.parametrize("target", sorted(SEEDS))
def test_seeds_are_served(harness, target):
    """The starting points are valid requests: the harness reaches the model (200 / OK), not just
    the parsers, so the fuzzers start from inputs that go all the way through."""
    outcomes = []
    for data in SEEDS[target]():
        harness.targets[target](data)
        outcomes.append(harness.last)
    assert outcomes.count("refused") == REFUSED_SEEDS.get(target, 0), outcomes


CASES = [(p.parent.name, p) for p in sorted(CORPUS.glob("*/*.bin"))]


@pytest.mark.parametrize(("target", "path"), CASES, ids=[f"{t}/{p.stem}" for t, p in CASES])
def test_every_input_that_ever_failed(harness, target, path):
    harness.targets[target](path.read_bytes())


def test_the_corpus_holds_every_target():
    assert {t for t, _ in CASES} <= set(SEEDS), "corpus folders are named after targets"
    assert all(p.stat().st_size > 0 for _, p in CASES), "an empty input replays nothing"


def test_the_long_run_script_runs_and_reports(tmp_path):
    """`python -m benchmarks.fuzz` in miniature: libFuzzer starts, inputs are counted, none fails."""
    import subprocess
    import sys

    from quicknet.testing import REPO

    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.fuzz", "--seconds", "2", "--targets", "grpc", "--no-save"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("grpc"))
    inputs = int(row.split("|")[2])
    assert inputs > 100, row
