"""The model store: `<root>/<model>/<version>/{model.onnx, metadata.json, ...}`.

Versions are positive integers. A version is published by filling a hidden staging folder and
renaming it into place, so readers never see half a version, and an existing version is never
overwritten. `<root>/DEFAULT` names the model served when none is asked for.
This module is the only part of the build the service imports: standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from quicknet import nvml
from quicknet.errors import StoreError
from quicknet.fsutil import write_text_atomic

METADATA = "metadata.json"
DEFAULT_FILE = "DEFAULT"
MODEL_CONFIG = "config.json"
REPO_STORE = Path(__file__).resolve().parents[1] / "model_store"
# A model name is one folder name in the store, never a path: no '/', no '..', not hidden, and short
# enough for any file system (a 300-character name is ENAMETOOLONG, not "not found").
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "1-64 ASCII letters, digits, '_', '.' or '-', starting with a letter or digit, no '..'"
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,17}")  # ASCII digits only: '²'.isdigit() is True, int('²') fails
ECHO_CHARS = 64  # at most this much of a name a client sent comes back in an error


def default_root() -> Path:
    return Path(os.environ.get("QUICKNET_MODEL_STORE", REPO_STORE))


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path
    metadata: dict

    def file(self, name: str) -> Path:
        """A file of this version: a plain name inside its folder, never a path out of it."""
        if not plain_file_name(name):
            raise StoreError(f"{self.name} v{self.version}: {shown(name)} is not a file name in the version folder")
        return self.path / name

    @property
    def labels(self) -> list[str]:
        return list(self.metadata["labels"])

    @property
    def weights_file(self) -> str | None:
        """The file the torch engine and the fused GPU engine read the folded model from."""
        artifacts = self.metadata.get("artifacts", {})
        return artifacts.get("torch") or artifacts.get("onnx")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shown(text: object) -> str:
    """`text` as an error message may echo it: repr'd, and cut at ECHO_CHARS."""
    text = str(text)
    return repr(text) if len(text) <= ECHO_CHARS else repr(text[:ECHO_CHARS]) + f"... ({len(text)} characters)"


def valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None and ".." not in name


def check_name(name: object) -> str:
    """`name` if it is a model name (one store folder), else StoreError in one line."""
    if not valid_name(name):
        raise InvalidName(f"{shown(name)} is not a model name: {NAME_RULE}")
    return name  # type: ignore[return-value]


def plain_file_name(name: object) -> bool:
    """A file name inside a version folder: no path separators, not '.' or '..', not empty."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
        and len(name.encode(errors="surrogateescape")) <= 255
    )


class InvalidName(StoreError):
    """A model name that is not one store folder's name (a path, too long, odd characters)."""


def list_models(root: Path) -> list[str]:
    """The models with at least one published version; folders whose names are not model names
    (hidden, staging, odd characters) are not models."""
    try:
        entries = [p for p in root.iterdir() if valid_name(p.name) and p.is_dir()] if root.is_dir() else []
    except OSError:
        return []
    return sorted(p.name for p in entries if list_versions(root, p.name))


def list_versions(root: Path, name: str) -> list[int]:
    """Published versions of `name` (folders named by a positive integer holding metadata.json);
    none for a name that is not a model name, or a store that cannot be read."""
    if not valid_name(name):
        return []
    model_dir = root / name
    try:
        if not model_dir.is_dir():
            return []
        return sorted(
            int(p.name) for p in model_dir.iterdir() if VERSION_PATTERN.fullmatch(p.name) and (p / METADATA).is_file()
        )
    except OSError:
        return []


def model_config(root: Path, name: str) -> dict:
    """`<root>/<name>/config.json`: how the service runs this model (its batch policy, instances,
    precision, version policy), as Triton's `config.pbtxt`; `{}` where there is none. One file per
    model, not per version: it tunes the serving of every version and changes without a republish."""
    path = root / name / MODEL_CONFIG
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise StoreError(f"{name}/{MODEL_CONFIG} is unreadable ({e.strerror})") from None
    try:
        config = json.loads(text)
    except ValueError as e:
        raise StoreError(f"{name}/{MODEL_CONFIG} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise StoreError(f"{name}/{MODEL_CONFIG} must be a JSON object")
    return config


def _why_no_models(root: Path) -> str:
    where = "point --model-store (or QUICKNET_MODEL_STORE) at a store `quicknet publish` wrote"
    try:
        with os.scandir(root):
            pass
    except FileNotFoundError:
        return f"does not exist: {where}"
    except NotADirectoryError:
        return f"is a file, not a folder: {where}"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return "holds no published model: publish one into it with `quicknet publish`"


def version_stamp(root: Path, name: str, version: int) -> tuple:
    """What a version's folder holds now: each file's name, size and modification time. A published
    version's never changes (publishing renames a complete folder into place); a copy still arriving
    (`kubectl cp`, rsync) changes it. Empty where the folder cannot be read."""
    try:
        with os.scandir(root / name / str(version)) as entries:
            files = [(e.name, e.stat()) for e in entries]
    except OSError:
        return ()
    return tuple(sorted((n, st.st_size, st.st_mtime_ns) for n, st in files))


def default_model(root: Path) -> str:
    marker = root / DEFAULT_FILE
    if marker.is_file():
        return marker.read_text().strip()
    models = list_models(root)
    if len(models) == 1:
        return models[0]
    if not models:
        raise StoreError(f"model store {root} {_why_no_models(root)}")
    raise StoreError(f"no default model in {root}: name one with --model (have: {', '.join(models)})")


def set_default(root: Path, name: str) -> None:
    check_name(name)
    if not list_versions(root, name):
        raise StoreError(f"cannot make {name!r} the default: it has no published version in {root}")
    write_text_atomic(root / DEFAULT_FILE, name + "\n")


def get_version(root: Path, name: str, version: int | None = None) -> ModelVersion:
    check_name(name)
    versions = list_versions(root, name)
    if not versions:
        have = ", ".join(list_models(root)) or "none"
        raise StoreError(f"model {name!r} not found in {root} (have: {have}); run `quicknet build` to publish one")
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise StoreError(f"model {name!r} has no version {version} (have: {', '.join(map(str, versions))})")
    path = root / name / str(version)
    # messages name the version and the file in it, not where the store lives: they reach clients
    where = f"{name} v{version}: {METADATA}"
    try:
        metadata = json.loads((path / METADATA).read_text())
    except OSError as e:
        raise StoreError(f"{where} is unreadable ({e.strerror or type(e).__name__}); republish this version") from None
    except ValueError as e:
        raise StoreError(f"{where} is unreadable ({str(e)[:200]}); republish this version") from None
    _check_metadata(where, metadata)
    return ModelVersion(name, version, path, metadata)


def _check_metadata(where: str, metadata: object) -> None:
    """The shape the service relies on, so a hand-edited or damaged file is one line, not a traceback.
    Every artifact the service can load is a file of the version folder listed in `files` with its
    SHA-256, so `verify_files` has checked whatever loads."""

    def bad(what: str) -> StoreError:
        return StoreError(f"{where} is malformed: {what}; republish this version")

    if not isinstance(metadata, dict):
        raise bad("not a JSON object")
    files = metadata.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("sha256"), str) for k, v in files.items()
    ):
        raise bad('"files" must map file names to {"sha256": ...}')
    for fname in files:
        if not plain_file_name(fname):
            raise bad(f'"files" names {shown(fname)}: a file of the version folder, not a path')
    labels = metadata.get("labels")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise bad('"labels" must be a list of strings')
    artifacts = metadata.get("artifacts", {})
    if not isinstance(artifacts, dict) or not all(v is None or isinstance(v, str) for v in artifacts.values()):
        raise bad('"artifacts" must map kinds to file names')
    for kind, fname in artifacts.items():
        if fname is None:
            continue
        if not plain_file_name(fname):
            raise bad(f"artifact {shown(kind)} is {shown(fname)}: a file of the version folder, not a path")
        if fname not in files:
            raise bad(f'artifact {shown(kind)} ({shown(fname)}) is not listed with its SHA-256 in "files"')


def verify_files(mv: ModelVersion) -> None:
    """Check every file against the SHA-256 recorded at publish time."""
    for fname, info in mv.metadata.get("files", {}).items():
        path = mv.file(fname)
        if not path.is_file() or sha256_file(path) != info["sha256"]:
            raise StoreError(
                f"{mv.name} v{mv.version}: {fname} is missing or altered since publish (SHA-256 mismatch); "
                "republish the model"
            )


def check_publishable(root: Path, name: str | None = None) -> None:
    """That a version (of model `name`) can be published under `root`: a folder, or one that can be
    made (the first part of the path that exists, the model's folder included, is a folder this
    process can write). `quicknet build` asks before it trains, so that a mistyped store costs no
    training run."""
    where = root / name if name else root
    existing = next((p for p in (where, *where.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise StoreError(f"cannot publish into model store {root}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise StoreError(f"cannot publish into model store {root}: {existing} is not writable")


def publish(root: Path, name: str, files: list[Path], metadata: dict) -> ModelVersion:
    """Copy `files` into the next version of `name`, with `metadata.json`; all or nothing."""
    check_name(name)
    check_publishable(root, name)
    model_dir = root / name
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where the model's folder goes, a read-only mount
        raise StoreError(f"cannot publish into model store {root}: {model_dir}: {e.strerror}") from None
    staging = model_dir / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        digests = {}
        for src in files:
            dst = staging / src.name
            shutil.copyfile(src, dst)
            digests[src.name] = {"sha256": sha256_file(dst), "bytes": dst.stat().st_size}
        versions = list_versions(root, name)
        version = (versions[-1] if versions else 0) + 1
        meta = {**metadata, "name": name, "version": version, "files": digests}
        with (staging / METADATA).open("w") as f:
            json.dump(meta, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        final = model_dir / str(version)
        if final.exists():
            raise StoreError(f"{final} already exists: published versions are never overwritten")
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ModelVersion(name, version, final, meta)


def plan_folder(plan_dir: Path | None, mv: ModelVersion) -> Path:
    """Where a version's TensorRT plans live: its own folder, or under `plan_dir` by model and
    version. A plan holds its weights: one folder for every version and model, as `--plan-dir`
    once was, served one model's weights under another's name, and a new version the old one's."""
    return mv.path if plan_dir is None else Path(plan_dir) / mv.name / str(mv.version)


def plan_filename(gpu_name: str, compute_capability: tuple[int, int], trt_version: str, precision: str) -> str:
    """TensorRT plans run only on the GPU model, compute capability and TensorRT version that built them."""
    return f"model.{_built_for(gpu_name, compute_capability, trt_version)}.{precision}.plan"


def plan_cache_filenames(gpu_name: str, compute_capability: tuple[int, int], trt_version: str) -> tuple[str, str]:
    """(timing cache, INT8 calibration cache) the build keeps beside a version's plans, named by what
    they are valid for as the plans are: a plan folder shared by pods on other GPUs or TensorRT
    versions (deploy/k8s/components/plan-cache) never hands one another's cache (the timing cache
    is loaded with `ignore_mismatch=False`; calibration depends on the TensorRT version)."""
    return (
        f"timing.{_built_for(gpu_name, compute_capability, trt_version)}.cache",
        f"int8-calibration.trt{trt_version}.cache",
    )


def _built_for(gpu_name: str, compute_capability: tuple[int, int], trt_version: str) -> str:
    major, minor = compute_capability
    return f"{slug(gpu_name)}.sm{major}{minor}.trt{trt_version}"


def slug(text: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `nvidia-h100-80gb-hbm3`: safe in file names."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def gpu_identity() -> tuple[str, tuple[int, int]]:
    """Name and compute capability of GPU 0, through NVML (no CUDA context needed)."""
    try:
        return nvml.gpu0()
    except Exception as e:  # NVML raises its own error family; any of them means no usable GPU
        raise StoreError(
            f"no NVIDIA GPU visible through NVML ({e}); TensorRT plans are built on the GPU they serve"
        ) from None
