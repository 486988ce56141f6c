from __future__ import annotations

import subprocess
import sys

import pytest

from quicknet.errors import QuickNetError
from quicknet.testing import REPO


def quicknet(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quicknet", *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )


def test_info_prints_params_and_macs():
    out = quicknet("info")
    assert out.returncode == 0
    assert "quicknet " in out.stdout and "3.480 M params" in out.stdout and "quicknet-xs" in out.stdout


def test_missing_data_is_one_line_exit_2(tmp_path):
    out = quicknet("eval", "--data", str(tmp_path / "none.npz"), "--store-model", "quicknet-xs")
    assert out.returncode == 2
    assert out.stderr.startswith("error: dataset not found") and out.stderr.count("\n") == 1


def test_stage_without_input_is_one_line(tmp_path):
    out = quicknet("export", "--run-dir", str(tmp_path))
    assert out.returncode == 2
    assert "run `quicknet train`" in out.stderr and "Traceback" not in out.stderr
    out = quicknet("eval", "--run-dir", str(tmp_path), "--data", str(tmp_path / "none.npz"))  # said before the data
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.rstrip().endswith("or re-score a published model with `quicknet eval --store-model NAME`")


def test_a_misspelt_flag_is_answered_with_its_commands_usage():
    out = quicknet("classify", "examples/cat.png", "--formt", "csv")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("usage: quicknet classify ") and "{data,train" not in out.stderr, out.stderr
    assert out.stderr.endswith(
        "quicknet classify: error: unrecognized arguments: --formt csv (did you mean --format?)\n"
    )
    before = quicknet("--json", "classify", "examples/cat.png")  # classify's flag, before its name
    assert before.returncode == 2 and before.stderr.endswith("quicknet: error: unrecognized arguments: --json\n")
    nested = quicknet("data", "fetch", "--dset", "x")
    assert nested.returncode == 2 and nested.stderr.startswith("usage: quicknet data fetch "), nested.stderr


def test_the_batch_tools_mistakes_are_one_line_and_leave_no_half_output(tmp_path):
    """What a newcomer gets wrong first: a misspelt command, two formats at once, a folder with no
    images, probing the gRPC port; and a CSV whose server is not there writes nothing to stdout
    (before: the header alone, a one-line labels.csv)."""
    from quicknet.testing import free_port

    out = quicknet("clasify", "examples/cat.png")
    assert out.returncode == 2 and out.stderr.rstrip().endswith("(did you mean 'classify'?)"), out.stderr
    out = quicknet("classify", "examples/cat.png", "--json", "--format", "csv")
    assert (out.returncode, out.stderr) == (2, "error: --json is --format jsonl: give one of --json and --format csv\n")
    (tmp_path / "notes.txt").write_text("no image here")
    out = quicknet("classify", str(tmp_path))
    assert out.returncode == 1 and out.stderr.endswith(
        f"{tmp_path}: this folder holds no image files (.bmp, .dib, .gif, .jfif, .jpe, .jpeg, .jpg, .png, .webp)\n"
    )
    out = quicknet("probe", "--url", "grpc://127.0.0.1:8001")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "grpc_health_probe" in out.stderr, out.stderr
    nobody = f"http://127.0.0.1:{free_port()}"
    out = quicknet("classify", "examples/cat.png", "--format", "csv", "--url", nobody, "--retries", "0")
    assert out.returncode == 2 and out.stdout == "" and "cannot reach" in out.stderr, (out.stdout, out.stderr)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["train", "--batch-size", "0"], "argument --batch-size: must be greater than 0, got 0"),
        (["train", "--train-subset", "0"], "argument --train-subset: must be greater than 0, got 0"),
        (["build", "--epochs", "-1"], "argument --epochs: must be greater than 0, got -1"),
        (["train", "--momentum", "1"], "argument --momentum: must be from 0 up to (not including) 1, got 1"),
        (["eval", "--limit", "-5"], "argument --limit: must be greater than 0, got -5"),
        (["train", "--device", "gpu"], "argument --device: invalid choice: 'gpu' (choose from 'auto', 'cuda', 'cpu')"),
        (["train", "--train-subst", "256"], "unrecognized arguments: --train-subst 256 (did you mean --train-subset?)"),
    ],
)
def test_a_flag_value_that_cannot_work_is_refused_before_anything_runs(args, says):
    """`--batch-size 0` was a ZeroDivisionError traceback, `--train-subset 0` trained on all 50k
    images, `--epochs 0` trained nothing and exited 0, `--limit -5` scored 9,995 images."""
    out = quicknet(*args)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.rstrip().splitlines()[-1] == f"quicknet {args[0]}: error: {says}", out.stderr


def test_build_refuses_a_store_it_cannot_publish_into_before_it_trains(tmp_path):
    """Said before the data is even read (the data path here does not exist), not after the training:
    a store path through a file, and a file where the model's folder goes."""
    (tmp_path / "store").write_text("a file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "quicknet-xs").write_text("a file")
    for store_path, file in ((tmp_path / "store" / "sub", tmp_path / "store"), (tmp_path / "other", None)):
        out = quicknet(
            "build", "--model", "quicknet-xs", "--model-store", str(store_path), "--data", str(tmp_path / "none.npz"),
        )  # fmt: skip
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        file = file or store_path / "quicknet-xs"
        assert out.stderr == f"error: cannot publish into model store {store_path}: {file} is a file, not a folder\n"


def test_a_build_whose_training_stopped_publishes_nothing(tmp_path, monkeypatch, capsys):
    """A time limit stopped the training: the build stops there (it went on to export and publish the
    half-trained weights) and says how to finish it."""
    import quicknet.build.cli as build_cli
    import quicknet.build.pipeline as pipeline
    from quicknet.cli import main

    def nothing_after_training(*args, **kwargs):
        raise AssertionError("a stage ran after a stopped training")

    monkeypatch.setattr(build_cli, "_dataset", lambda args: None)
    monkeypatch.setattr(
        pipeline, "stage_train", lambda *a, **k: dict(stopped_early=True, epochs_run=1, planned_epochs=4)
    )
    for stage in ("stage_export", "stage_compile", "stage_eval", "stage_publish"):
        monkeypatch.setattr(pipeline, stage, nothing_after_training)
    args = ["build", "--model", "quicknet-xs", "--run-dir", str(tmp_path), "--model-store", str(tmp_path / "store")]
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: training stopped after 1 of 4 epochs: the same command with --resume finishes it, then exports, "
        "compiles, scores and publishes"
    )
    assert not (tmp_path / "store").exists()


def test_a_stage_refuses_a_model_its_run_folder_did_not_train(tmp_path):
    """`--model` names the run folder (runs/<model>); with --run-dir, a model the run contradicts is an
    error, not silently exported or published as the run's own."""
    (tmp_path / "build.json").write_text('{"stages": {"train": {"config": {"model": "quicknet-xs"}}}}')
    for stage in ("export", "compile", "eval", "publish"):
        out = quicknet(stage, "--model", "quicknet", "--run-dir", str(tmp_path))
        assert out.returncode == 2 and out.stderr.count("\n") == 1, (stage, out.stderr)
        want = f"error: {tmp_path} holds a quicknet-xs run, not quicknet: drop --model, or give --model quicknet-xs\n"
        assert out.stderr == want, (stage, out.stderr)


def test_a_data_folder_is_named_as_one():
    out = quicknet("eval", "--store-model", "quicknet-xs", "--data", "examples")
    assert out.returncode == 2
    assert out.stderr.startswith(
        "error: examples is a folder: pass --data the .npz or cifar-10-python.tar.gz inside it"
    )


def test_unknown_store_model(tmp_path):
    out = quicknet("eval", "--store-model", "nope", "--store", str(tmp_path))
    assert out.returncode == 2 and "model 'nope' not found" in out.stderr


def test_classify_against_no_server_is_clear(tmp_path):
    img = tmp_path / "x.png"
    img.write_bytes(b"x")
    out = quicknet("classify", str(img), "--url", "http://127.0.0.1:9")
    assert out.returncode == 2 and out.stderr.startswith("error: cannot reach")


@pytest.mark.parametrize("workers", ["1", "2"])  # 1: the server binds itself; 2: the supervisor checks first
@pytest.mark.parametrize("busy", ["http", "grpc"])
def test_busy_port_is_one_line(busy, workers):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        ports = {"http": "0", "grpc": "0", busy: str(port)}
        out = quicknet(
            "serve", "--http-host", "127.0.0.1", "--grpc-host", "127.0.0.1", "--workers", workers,
            "--http-port", ports["http"], "--grpc-port", ports["grpc"],
        )  # fmt: skip
    assert out.returncode == 2
    what = {"http": "REST", "grpc": "gRPC"}[busy]
    assert f"cannot listen on 127.0.0.1:{port} for {what}" in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    # `make serve` takes no flags: the hint names the variable too
    assert out.stderr.rstrip().endswith(f"pick another with --{busy}-port or QUICKNET_{busy.upper()}_PORT"), out.stderr


def test_unknown_variant_is_one_line(tmp_path):
    out = quicknet("train", "--model", "resnet", "--run-dir", str(tmp_path))
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: unknown model 'resnet'; choose one of quicknet, quicknet-s, quicknet-xs, quicknet-res"
    )


def test_eval_of_the_shipped_model_without_torch_artifacts(tmp_path):
    out = quicknet("eval", "--store-model", "quicknet-xs", "--limit", "500")
    assert out.returncode == 0, out.stderr
    import json

    result = json.loads(out.stdout)
    assert set(result["artifacts"]) == {"onnx", "onnx-int8"}
    from quicknet import store
    from quicknet.build import data
    from quicknet.build.ortrun import onnx_logits

    split = data.load().test.sample(500)  # what --limit 500 scores
    mv = store.get_version(store.default_root(), "quicknet-xs")
    for kind, scores in result["artifacts"].items():
        logits = onnx_logits(mv.file(mv.metadata["artifacts"][kind]), split.images)
        assert scores["top1"] == round(float((logits.argmax(1) == split.labels).mean()), 5), kind
        assert scores["published_top1"] == mv.metadata["accuracy"][kind]["top1"]


def test_classify_against_a_live_server_over_rest_and_grpc(tmp_path, cifar):
    from PIL import Image

    from quicknet.testing import start_server

    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(cifar.test.images[i]).save(path)
        paths.append(str(path))
    srv = start_server(tmp_path)
    try:
        rest = quicknet("classify", *paths, "--url", srv.url, "--json")
        grpc = quicknet("classify", *paths, "--grpc", srv.grpc_target, "--json")
    finally:
        assert srv.stop() == 0
    assert rest.returncode == 0 and grpc.returncode == 0, rest.stderr + grpc.stderr
    import json

    by_rest = [json.loads(line) for line in rest.stdout.splitlines()]
    by_grpc = [json.loads(line) for line in grpc.stdout.splitlines()]
    assert [r["image"] for r in by_rest] == paths
    assert [r["predictions"][0]["label"] for r in by_rest] == [r["predictions"][0]["label"] for r in by_grpc]
    assert all(len(r["predictions"]) == 5 for r in by_rest), "the server's default top-k, as on REST"


def test_serve_checks_models_and_store_before_loading_anything(tmp_path):
    from quicknet.testing import free_port

    port = free_port()
    env = {"QUICKNET_HTTP_PORT": str(port), "QUICKNET_GRPC_PORT": str(free_port())}
    unknown = quicknet("serve", "--models", "nope", env=env)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().startswith("error: model 'nope' not found"), unknown.stderr
    assert "loaded" not in unknown.stderr and "REST on" not in unknown.stderr, "nothing loads or binds first"
    missing = quicknet("serve", "--model-store", str(tmp_path / "absent"), env=env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert missing.stderr.startswith(f"error: model store {tmp_path / 'absent'} does not exist"), missing.stderr
    (tmp_path / "a-file").write_text("")
    a_file = quicknet("serve", "--model-store", str(tmp_path / "a-file"), env=env)
    assert a_file.returncode == 2 and "is a file, not a folder" in a_file.stderr, a_file.stderr
    empty = quicknet("serve", "--model-store", str(tmp_path), env=env)
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1, empty.stderr
    assert "holds no published model" in empty.stderr, empty.stderr
    not_json = quicknet("serve", env=env | {"QUICKNET_MODELS": "[quicknet]"})
    assert not_json.returncode == 2 and not_json.stderr.count("\n") == 1, not_json.stderr
    assert 'error parsing value for field "models"' in not_json.stderr and "Traceback" not in not_json.stderr
    not_a_map = quicknet("serve", env=env | {"QUICKNET_VERSION_POLICIES": "{x: all}"})
    assert not_a_map.returncode == 2 and not_a_map.stderr.count("\n") == 1, not_a_map.stderr
    bad = quicknet("serve", "--fault-injection", "sometimes", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: invalid setting fault_injection")
    for args, fragment in ((["--model", "nope"], "model 'nope' not found"), (["--version", "99"], "has no version 99")):
        wrong = quicknet("serve", *args, env=env)
        assert wrong.returncode == 2 and fragment in wrong.stderr and wrong.stderr.count("\n") == 1, wrong.stderr


def test_version_and_one_spelling_of_the_store_flag(tmp_path):
    out = quicknet("--version")
    assert out.returncode == 0 and out.stdout.startswith("quicknet 0.")
    for command in ("eval", "publish", "build", "republish", "plan"):
        text = quicknet(command, "--help").stdout
        assert "--model-store DIR" in text, command  # as `serve` spells it
        assert ("--make-default" in text) == (command in ("publish", "build")), f"{command}: only where it acts"
    out = quicknet("eval", "--store-model", "nope", "--model-store", str(tmp_path))
    assert out.returncode == 2 and "model 'nope' not found" in out.stderr


def test_a_command_whose_extra_is_missing_names_it_in_one_line(tmp_path):
    """After `make serve` (no build extra), `quicknet train` needs torch (`info` does not:
    tests/test_operating.py)."""
    import os

    stubs = tmp_path / "stubs"
    (stubs / "torch").mkdir(parents=True)
    failing = "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
    (stubs / "torch" / "__init__.py").write_text(failing)
    env = {**os.environ, "PYTHONPATH": str(stubs)}
    for command in (["train", "--run-dir", str(tmp_path / "run"), "--epochs", "1"],):
        out = quicknet(*command, env=env)
        assert out.returncode == 2, out.stderr
        hint = "needs the build extra (torch is not installed): make venv-dev (README: Offline build)\n"
        assert out.stderr == f"error: `quicknet {command[0]}` {hint}"


def test_a_port_its_last_server_just_closed_is_free_again():
    """A restart finds the port's closed connections in TIME_WAIT: the check before binding must not
    take them for a listener (the servers themselves bind with SO_REUSEADDR), and must still see one."""
    import socket

    from quicknet.serve.ports import free_port

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    with pytest.raises(QuickNetError, match=f"cannot listen on 127.0.0.1:{port} for gRPC"):
        free_port("127.0.0.1", port, "gRPC", "grpc_port")  # still listening
    conn.close()  # the server's side closes first: its end of the connection waits in TIME_WAIT
    client.close()
    listener.close()
    assert free_port("127.0.0.1", port, "gRPC", "grpc_port") == port


@pytest.mark.parametrize("saved", [False, True])
def test_ctrl_c_in_training_says_how_to_go_on(tmp_path, monkeypatch, capsys, saved):
    """Ctrl-C was exit 130 and not a word: now a line says whether the run folder holds a save to
    continue from, and how."""
    import quicknet.build.cli as build_cli
    import quicknet.build.pipeline as pipeline
    from quicknet.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_cli, "_dataset", lambda args: None)  # no data needed to be interrupted
    monkeypatch.setattr(pipeline, "stage_train", interrupted)
    if saved:
        (tmp_path / "checkpoint.pt").write_bytes(b"a save")
    for command in ("train", "build"):
        args = [command, "--model", "quicknet-xs", "--run-dir", str(tmp_path)]
        assert main(args + (["--no-publish"] if command == "build" else [])) == 130
        said = capsys.readouterr().err
        if command == "build":  # with no terminal, a line says where a build is
            first, said = said.split("\n", 1)
            assert first == f"quicknet build: training quicknet-xs into {tmp_path}"
        if saved:
            assert said == f"interrupted: the same command with --resume continues from {tmp_path}'s last save\n"
        else:
            assert said == f"interrupted before the first save: nothing in {tmp_path} to resume\n"
