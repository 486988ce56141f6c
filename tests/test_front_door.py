"""What a new user meets first (issue 25): the ready line, `/docs` "Try it out", model and version
choice (query, TorchServe's path, client, CLI), one stable answer shape, unknown query parameters,
bodies as people send them (data URIs, no Content-Type, a `file` field), errors that name the file
and count from 1, large JPEGs decoded at a reduced scale, client-side resize, the batch tool in a
pipe, and a client pointed at the wrong port or path.

One real server per module: quicknet-xs as shipped and its next version (the shipped one published again) and `twin`,
every version served, images over 1 MiB refused (so a "photo" is small enough to make here)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from quicknet.cli import main as cli_main
from quicknet.client import AsyncClient, Client, QuickNetClientError
from quicknet.client.rest import transport_error
from quicknet.serve.images import Limits, decode_image
from quicknet.testing import FAST_MODEL, FAST_VERSION, REPO, STORE, publish_shipped, start_server

FAST_V = str(FAST_VERSION)  # the shipped quicknet-xs version, as answers spell it

CAT = (REPO / "examples" / "cat.png").read_bytes()
AIRPLANE = (REPO / "examples" / "airplane.jpg").read_bytes()
TWIN = "twin"
LIMIT = 1 << 20  # the server's --max-image-bytes here


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    store = root / "store"
    shutil.copytree(STORE, store)
    publish_shipped(store, FAST_MODEL)  # the next version beside the shipped one
    publish_shipped(store, TWIN)
    srv = start_server(root, store=store, version_policy="all", max_image_bytes=LIMIT)
    yield srv
    assert srv.stop() == 0, srv.log()


def post(server, path: str = "/classify", **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, timeout=30, **kwargs)


def photo(width: int = 2000, height: int = 1500, quality: int = 95) -> bytes:
    """A JPEG of a real size with the cat's content: the cat, upscaled, plus grain (so it is large)."""
    rng = np.random.default_rng(0)
    big = np.asarray(Image.open(io.BytesIO(CAT)).convert("RGB").resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.integers(-12, 13, big.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(big + grain, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


# --- start-up -------------------------------------------------------------------------------------


def test_start_up_ends_with_one_line_a_person_reads(server):
    line = next(x for x in server.log().splitlines() if "quicknet.service: ready: " in x)
    ready = line.split("quicknet.service: ready: ", 1)[1]
    assert re.fullmatch(
        rf"http://127\.0\.0\.1:{server.http_port}/ \(web\), /docs \(API\), gRPC :{server.grpc_port}, "
        rf"model {FAST_MODEL} v{FAST_VERSION + 1} \(onnxruntime, cpu, (int8|fp32)\); "
        rf"also {FAST_MODEL} v{FAST_V} \(.*\), {TWIN} v1 \(.*\)",
        ready,
    ), ready
    assert "{" not in ready, "no dict of backend details"


def test_the_ready_line_names_a_host_a_browser_opens():
    from quicknet.serve.config import Settings
    from quicknet.serve.main import ready_line
    from quicknet.serve.runtime import Runtime

    runtime = Runtime(Settings(http_host="0.0.0.0", http_port=8000))
    assert ready_line(runtime.settings, 8001, runtime) == "ready: http://localhost:8000/ (web), /docs (API), gRPC :8001"


# --- /docs "Try it out" ---------------------------------------------------------------------------


def swagger_form(spec: dict, picked: dict[str, bytes]) -> list[tuple[str, tuple]]:
    """The multipart body Swagger UI 5 sends from "Try it out" on /classify: a file for each field
    the user picked, and for every other field its generated sample (an array of strings starts as
    `["string"]`, unless the schema gives an example), sent as text fields."""
    schema = spec["paths"]["/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form: list[tuple[str, tuple]] = []
    for name, prop in schema["properties"].items():
        if name in picked:
            form.append((name, ("cat.png", picked[name], "image/png")))
            continue
        sample = prop.get("example", prop.get("default"))
        if sample is None and prop.get("type") == "array":
            sample = ["string"]
        for value in sample or []:
            form.append((name, (None, str(value))))
    return form


def test_docs_try_it_out_on_classify_works_as_swagger_sends_it(server):
    """The browser version is tests/test_web.py::test_docs_try_it_out_classifies_in_a_browser."""
    spec = httpx.get(server.url + "/openapi.json").json()
    answer = post(server, files=swagger_form(spec, {"image": CAT}))
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][0]["label"] == "cat"


# --- query parameters, model and version choice, answer shapes ------------------------------------


def test_unknown_query_parameters_are_a_400_naming_them(server):
    answer = post(server, "/classify?modle=twin&top_k=2&x=1", files={"image": CAT})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert "'modle'" in error and "'x'" in error and "top_k, model, version" in error, error
    answer = post(server, f"/predictions/{TWIN}?model=x", files={"image": CAT})
    assert answer.status_code == 400 and "'model'" in answer.json()["error"]


def test_model_and_version_are_chosen_by_query(server):
    def ask(query: str) -> httpx.Response:
        return post(server, f"/classify?{query}", files={"image": CAT})

    assert ask("top_k=2").json()["model"] == FAST_MODEL  # the default: the store's DEFAULT
    twin = ask(f"model={TWIN}").json()
    assert (twin["model"], twin["version"], twin["predictions"][0]["label"]) == (TWIN, "1", "cat")
    assert ask(f"model={FAST_MODEL}&version={FAST_V}").json()["version"] == FAST_V
    expected = {"model": FAST_MODEL, "version": FAST_V, "predictions": None}
    assert ask(f"version={FAST_V}").json() | {"predictions": None} == expected
    missing = ask("model=nope")
    assert missing.status_code == 404 and "'nope' is not served" in missing.json()["error"]
    assert ask(f"model={FAST_MODEL}&version=9").status_code == 404
    for bad in ("model=../etc", "model=a/b", "version=abc", "version=-1"):
        answer = ask(bad)
        assert answer.status_code == 400, (bad, answer.text)


def test_predictions_path_answers_a_list_per_image_whatever_the_form(server):
    b64 = base64.b64encode(CAT).decode()
    bodies = {
        "image field": {"files": {"image": CAT}},
        "file field": {"files": {"file": CAT}},
        "image bytes": {"content": CAT, "headers": {"Content-Type": "image/png"}},
        "JSON image": {"json": {"image": b64}},
        "JSON images, one": {"json": {"images": [b64]}},
        "raw pixels, one": {"content": bytes(3072), "headers": {"Content-Type": "application/octet-stream"}},
    }
    for form, body in bodies.items():
        for path in (f"/predictions/{TWIN}", f"/predictions/{FAST_MODEL}/{FAST_V}"):
            answer = post(server, path, **body)
            assert answer.status_code == 200, (form, answer.text)
            doc = answer.json()
            assert isinstance(doc["predictions"], list) and len(doc["predictions"]) == 1, form
            assert isinstance(doc["predictions"][0], list) and len(doc["predictions"][0]) == 5, form
        assert doc["model"] == FAST_MODEL and doc["version"] == FAST_V
    two = post(server, f"/predictions/{TWIN}?top_k=2", json={"images": [b64, b64]}).json()
    assert [len(row) for row in two["predictions"]] == [2, 2]
    assert post(server, "/predictions/nope", files={"image": CAT}).status_code == 404
    assert post(server, "/predictions/..%2Fx", files={"image": CAT}).status_code in (400, 404)


def test_classify_keeps_its_v1_shapes_by_the_requests_form(server):
    """Never by the count: `images` with one image is still a list per image."""
    assert isinstance(post(server, files={"image": CAT}).json()["predictions"][0], dict)
    assert isinstance(post(server, files={"file": CAT}).json()["predictions"][0], dict)
    assert isinstance(post(server, files=[("images", ("a.png", CAT))]).json()["predictions"][0], list)


# --- bodies as people send them -------------------------------------------------------------------


def test_json_takes_data_uris_and_wrapped_base64(server):
    uri = "data:image/png;base64," + base64.b64encode(CAT).decode()
    for body in ({"image": uri}, {"images": [uri, uri]}):
        answer = post(server, json=body)
        assert answer.status_code == 200, answer.text
    wrapped = base64.encodebytes(CAT).decode()  # 76 characters a line, as `base64` writes
    assert post(server, json={"image": wrapped}).json()["predictions"][0]["label"] == "cat"
    answer = post(server, json={"image": "data:text/plain,hello"})
    assert answer.status_code == 400 and "data URI" in answer.json()["error"]


def test_an_untyped_or_generic_body_holding_an_image_is_sniffed(server):
    for headers in (
        {},
        {"Content-Type": "application/octet-stream"},
        {"Content-Type": "application/x-www-form-urlencoded"},
    ):
        for data in (CAT, AIRPLANE):
            answer = post(server, content=data, headers=headers)
            assert answer.status_code == 200, (headers, answer.text)
            assert isinstance(answer.json()["predictions"][0], dict), "one image: one list"
    raw = post(server, content=bytes(3072 * 2), headers={"Content-Type": "application/octet-stream"})
    assert [len(r) for r in raw.json()["predictions"]] == [5, 5], "raw pixels stay raw pixels"
    jpeg_like = b"\xff\xd8\xff" + bytes(3072 - 3)  # a first pixel that reads like a JPEG signature
    raw = post(server, content=jpeg_like, headers={"Content-Type": "application/octet-stream"})
    assert raw.status_code == 200 and len(raw.json()["predictions"]) == 1, raw.text
    answer = post(server, content=b"hello", headers={})
    assert answer.status_code == 415 and "no Content-Type" in answer.json()["error"]


def test_a_body_that_is_neither_pixels_nor_json_says_what_it_is_not(server):
    """A BMP sent as application/octet-stream is classified (no raw pixel body has its length);
    a text file sent so, or an image sent as JSON, is a 400 that says so in the service's words."""
    bmp = io.BytesIO()
    Image.open(io.BytesIO(CAT)).convert("RGB").save(bmp, "BMP")
    answer = post(server, content=bmp.getvalue(), headers={"Content-Type": "application/octet-stream"})
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == "cat", answer.text
    text = (REPO / "README.md").read_bytes()[:5000]
    answer = post(server, content=text, headers={"Content-Type": "application/octet-stream"})
    assert answer.status_code == 400 and answer.json()["error"] == (
        "the application/octet-stream body is 5000 bytes: neither raw pixels (a multiple of 3072: "
        "N x 32 x 32 x 3 uint8) nor a PNG, JPEG, GIF, WebP or BMP file"
    )
    for path in ("/classify", "/v2/models/quicknet-xs/infer"):
        answer = post(server, path, content=CAT, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and "codec" not in answer.text, answer.text
        assert answer.json()["error"].endswith(
            "is not valid JSON: it is not UTF-8 text (binary data, such as an image?)"
        )
    answer = post(server, "/v2/models/quicknet-xs/infer", content=CAT, headers={"Content-Type": "image/png"})
    assert answer.status_code == 415 and answer.json()["error"] == (
        "infer takes a JSON body (application/json) or the binary-data extension, not image/png: "
        "send an image as a BYTES tensor, or to /classify"
    )


def test_curl_data_binary_with_no_type_is_classified(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    done = subprocess.run(
        ["curl", "-s", "--data-binary", "@examples/cat.png", f"{server.url}/classify"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(done.stdout)["predictions"][0]["label"] == "cat", done.stdout


# --- errors ---------------------------------------------------------------------------------------

LEAKS = ("Error", "Exception", "Plugin", "PIL", "MAX_TEXT", "Traceback", "OSError")


def test_errors_name_the_file_and_count_from_one(server):
    truncated = CAT[: len(CAT) // 2]
    files = [("images", ("a.png", CAT)), ("images", ("holiday/b.png", truncated))]
    error = post(server, files=files).json()["error"]
    assert error == "image 2 (b.png) is damaged or truncated", error
    b64 = base64.b64encode
    error = post(server, json={"images": [b64(CAT).decode(), b64(truncated).decode()]}).json()["error"]
    assert error == "image 2 is damaged or truncated", error
    error = post(server, json={"images": [b64(CAT).decode(), "!!"]}).json()["error"]
    assert error == "image 2 is not valid base64", error
    for message in (error, post(server, files={"image": ("x.gif", b"GIF89a" + bytes(20))}).json()["error"]):
        assert not any(leak in message for leak in LEAKS), message


def test_too_large_is_said_in_mib_with_what_to_do(server):
    big = photo()
    assert len(big) > LIMIT
    error = post(server, files={"image": ("IMG_0042.jpg", big)}).json()["error"]
    size = f"{len(big) / (1 << 20):.1f} MiB"
    assert error.startswith(f"image 1 (IMG_0042.jpg) is {size}; the limit for one image is 1 MiB: resize it"), error


# --- large JPEGs ----------------------------------------------------------------------------------


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(monkeypatch):
    from PIL import JpegImagePlugin

    loaded = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def load(self):
        loaded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", load)
    pixels = decode_image(photo(4000, 3000, 80), Limits(64 << 20, 40_000_000, 1))
    assert pixels.shape == (32, 32, 3)
    assert loaded[-1] == (500, 375), "decoded at 1/8 scale, not 4000x3000"
    small = decode_image(AIRPLANE, Limits(64 << 20, 40_000_000, 1))
    assert small.shape == (32, 32, 3)


# --- the client -----------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_the_client_chooses_model_and_version(server, transport):
    url = server.url if transport == "rest" else f"grpc://{server.grpc_target}"
    with Client(url, model=TWIN) as client:
        result = client.classify(CAT)
    assert (result.model, result.version, result.label) == (TWIN, "1", "cat")
    with Client(url, model=FAST_MODEL, version=FAST_VERSION) as client:
        assert [(r.model, r.version) for r in client.classify_batch([CAT, CAT])] == [(FAST_MODEL, FAST_V)] * 2
    with Client(url, version=FAST_V) as client:
        assert client.classify(CAT).version == FAST_V
    with Client(url, model="nope") as client, pytest.raises(QuickNetClientError) as err:
        client.classify(CAT)
    assert err.value.status == 404 and "'nope' is not served" in err.value.message
    for bad in ({"model": "../x"}, {"model": "a b"}, {"version": "v1"}, {"version": 0}):
        with pytest.raises(ValueError):
            Client(url, **bad)


def test_a_server_answering_with_another_model_is_an_error_not_an_answer():
    """A server too old to know `?model=` answers with its default: the client refuses that answer."""
    from quicknet.client.plan import Send, check_choice

    check_choice(Send([], None, 1.0, TWIN, "1"), TWIN, "1")
    check_choice(Send([], None, 1.0), FAST_MODEL, FAST_V)
    for model, version in ((FAST_MODEL, "1"), (TWIN, "2")):
        with pytest.raises(QuickNetClientError, match="upgrade the server"):
            check_choice(Send([], None, 1.0, TWIN, "1"), model, version)


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_the_client_resizes_a_large_photo_instead_of_a_413(server, transport, tmp_path):
    url = server.url if transport == "rest" else f"grpc://{server.grpc_target}"
    path = tmp_path / "IMG_0042.jpg"
    path.write_bytes(photo())
    with Client(url) as client, pytest.raises(QuickNetClientError) as err:
        client.classify(path)
    assert err.value.status == (413 if transport == "rest" else 400)  # gRPC: INVALID_ARGUMENT
    assert "limit for one image is 1 MiB" in err.value.message
    with Client(url, resize=True) as client:
        assert client.classify(path).label == "cat"
        assert [r.label for r in client.classify_batch([path, CAT, np.asarray(Image.open(path))])] == ["cat"] * 3


def test_the_clients_resize_gives_the_servers_pixels():
    """resize=True sends exactly what the server would have computed from the file."""
    rng = np.random.default_rng(1)
    samples = {"large JPEG": photo(4000, 3000, 80), "small JPEG": AIRPLANE, "PNG": CAT}
    rgba = Image.fromarray(rng.integers(0, 256, (70, 90, 4), dtype=np.uint8), "RGBA")
    wide16 = Image.fromarray(rng.integers(0, 65536, (40, 50), dtype=np.uint16))
    palette = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).convert("P")
    for name, im, fmt in (("RGBA PNG", rgba, "PNG"), ("16-bit PNG", wide16, "PNG"), ("GIF", palette, "GIF")):
        out = io.BytesIO()
        im.save(out, fmt)
        samples[name] = out.getvalue()
    from quicknet.client.inputs import to_item, to_model_pixels

    limits = Limits(64 << 20, 40_000_000, 1)
    for name, data in samples.items():
        sent = np.frombuffer(to_item(data, resize=True).load().data, np.uint8).reshape(32, 32, 3)
        assert np.array_equal(sent, decode_image(data, limits)), name
    assert to_model_pixels(Image.open(io.BytesIO(CAT))).shape == (32, 32, 3)


def test_the_client_at_the_grpc_port_says_so(server, capsys):
    """Sync, async and the CLI alike: the gRPC server closes after its HTTP/2 answer, and whether the
    client reads garbage (RemoteProtocolError) or the close (an empty ReadError) is a race."""
    url = f"http://127.0.0.1:{server.grpc_port}"

    def says_so(message: str) -> None:
        assert "gRPC port" in message and "grpc://" in message and not message.rstrip().endswith(":"), message

    with Client(url, timeout=5) as client, pytest.raises(QuickNetClientError) as e:
        client.classify(CAT)
    says_so(str(e.value))

    async def from_async() -> str:
        async with AsyncClient(url, timeout=5) as client:
            with pytest.raises(QuickNetClientError) as e:
                await client.classify(CAT)
        return str(e.value)

    for _ in range(3):
        says_so(asyncio.run(from_async()))
    assert cli_main(["classify", str(REPO / "examples" / "cat.png"), "--url", url]) == 2
    says_so(capsys.readouterr().err)
    for error in (httpx.ReadError(""), httpx.RemoteProtocolError("illegal request line")):
        says_so(str(transport_error(url, error, 5.0)))
    assert "gRPC port" not in str(transport_error(url, httpx.ReadError("connection reset by peer"), 5.0))


def test_the_grpc_client_at_the_rest_port_says_so(server, capsys):
    """The mistake the other way round: grpc-core's own words for an HTTP/1.1 answer ("Failed
    parsing HTTP/2 ... http1.x server") end with what to do instead."""
    target = f"grpc://127.0.0.1:{server.http_port}"
    with Client(target, timeout=5) as client, pytest.raises(QuickNetClientError) as e:
        client.classify(CAT)
    assert "it answers HTTP/1.1, not gRPC" in str(e.value) and "gRPC port (8001" in str(e.value), str(e.value)
    assert cli_main(["classify", str(REPO / "examples" / "cat.png"), "--grpc", f"127.0.0.1:{server.http_port}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and line.endswith("or http://host:port for REST"), line


def test_an_endpoint_url_or_a_wrong_path_says_what_to_give(server):
    with pytest.raises(ValueError, match=rf"give the server's, http://127\.0\.0\.1:{server.http_port} "):
        Client(f"{server.url}/classify")
    with Client(f"{server.url}/quicknet") as client, pytest.raises(QuickNetClientError) as err:
        client.classify(CAT)
    assert err.value.status == 404 and "QuickNet server's REST address" in err.value.message, err.value.message


# --- the batch tool -------------------------------------------------------------------------------


def cli(server, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quicknet", "classify", "--url", server.url, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "QUICKNET_PROGRESS": "0"},
        **kwargs,
    )


def test_the_batch_tool_in_a_pipe_that_closes_early_is_quiet(server, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(400):  # ~90 KB of CSV: more than a pipe holds, so the writer meets the closed end
        (folder / f"{i:03}.png").write_bytes(CAT)
    command = (
        f"{sys.executable} -m quicknet classify {folder} --url {server.url} --format csv | head -2; "
        'echo "exit ${PIPESTATUS[0]}" >&2'
    )
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "QUICKNET_PROGRESS": "0"},
    )
    assert done.stdout.splitlines()[0] == "image,rank,label,index,score,model,version"
    assert len(done.stdout.splitlines()) == 2
    assert done.stderr == "exit 141\n", "quiet, and the status a tool ended by SIGPIPE has"


def test_the_batch_tool_uses_the_servers_top_k_and_takes_model_version_resize(server, tmp_path):
    done = cli(server, "examples/cat.png", "--format", "jsonl")
    assert len(json.loads(done.stdout)["predictions"]) == 5, "the same default as REST and the page"
    done = cli(server, "examples/cat.png", "--json", "--model", FAST_MODEL, "--version", FAST_V)
    assert (json.loads(done.stdout)["model"], json.loads(done.stdout)["version"]) == (FAST_MODEL, FAST_V)
    done = cli(server, "examples/cat.png", "--json", "--model", "../x")
    assert done.returncode == 2 and "is not a model name" in done.stderr, done.stderr
    big = tmp_path / "IMG_0042.jpg"
    big.write_bytes(photo())
    done = cli(server, str(big))
    assert done.returncode == 1 and "--resize" in done.stderr and "1 MiB" in done.stderr, done.stderr
    assert "image 1" not in done.stderr, "the path is already said; no request-relative number"
    done = cli(server, str(big), "--resize", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["predictions"][0]["label"] == "cat", done.stderr


# --- the README's quickstart ----------------------------------------------------------------------


def test_the_readme_opens_with_the_quickstart_and_its_python_runs(server):
    text = (REPO / "README.md").read_text()
    quickstart = text.index("## Quickstart")
    assert re.search(r"^## (.*)$", text, re.M).group(1) == "Quickstart", "the first section"
    assert quickstart < text.index("## The published models") < text.index("## Online service")
    section = text[quickstart : text.index("\n## ", quickstart + 1)]
    for needed in ("make serve", "QUICKNET_HTTP_PORT", "curl -F image=@examples/cat.png", "localhost:8000/docs"):
        assert needed in section, needed
    assert "quicknet classify examples/" in section and "ready: http://localhost:8000/ (web)" in section
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(code.strip().splitlines()) <= 5, "the client in five lines"
    code = code.replace("localhost:8000", f"127.0.0.1:{server.http_port}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUICKNET_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["cat", "['ship', 'airplane']"], done.stdout
