"""CIFAR-10 readers (our JPEG-q75 npz copy and the official python tarball) and a tensor loader.

Both readers return uint8 NHWC arrays plus uint8 labels, so everything downstream sees one shape.
Decoding the npz takes seconds, so decoded arrays are cached on disk keyed by the file's SHA-256.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import pickle
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quicknet.build.progress import steps
from quicknet.errors import DataError
from quicknet.fsutil import atomic_write

LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (125.27, 122.93, 113.86)  # train per-channel means of the JPEG copy (its README)
STD = (62.53, 61.91, 66.46)  # train per-channel standard deviations of the JPEG copy, 0..255 scale

NPZ_SHA256 = "a04e5bfc645b3eb3b4fd8ddbd152438b2f41e8d178c4a1ff27682bbfa52b21a8"
NPZ_DEFAULT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10" / "cifar10_jpeg.npz"
NPZ_IN_REPO = Path(__file__).resolve().parents[2] / "data" / "cifar10_jpeg.npz"  # `make gpu-data` copies it here
NPZ_DESCRIPTION = "CIFAR-10 (JPEG-q75 copy), standard 10k test split"
# The same copy's 10k test split alone (`write_test_split`), for a GPU serve run that gates engines
# on it and carries ~3 MiB instead of 18 (the run carries at most 64 MiB, the repo included). Its
# digest is of its content (JPEG bytes, offsets, labels), not of the file, which numpy's zip writes
# with a time stamp.
TEST_SPLIT_SHA256 = "8226f779e2979fb223c3be244b3fc9fc7c23a0f019d264ed8acc2a4c6b20392a"
TEST_SPLIT_KEYS = ("test_jpeg", "test_offsets", "test_labels")

TARBALL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TARBALL_MD5 = "c58f30108f718f92721af3b95e74349a"
TARBALL_DESCRIPTION = "CIFAR-10 (official python batches), standard 10k test split"


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    labels: np.ndarray  # uint8 [N]

    def sample(self, n: int, seed: int = 0) -> Split:
        """A fixed random subset (splits are sorted by class, so a prefix would be one class)."""
        idx = np.sort(np.random.default_rng(seed).permutation(len(self.labels))[:n])
        return Split(self.images[idx], self.labels[idx])


@dataclass(frozen=True)
class Dataset:
    train: Split
    test: Split
    source: str  # which copy of CIFAR-10, for reports
    checksum: str


def default_data_path() -> Path:
    """QUICKNET_DATA, else the shared copy beside the repo, else the copy inside it (a GPU machine
    receives only the repo)."""
    if "QUICKNET_DATA" in os.environ:
        return Path(os.environ["QUICKNET_DATA"])
    return NPZ_IN_REPO if not NPZ_DEFAULT.is_file() and NPZ_IN_REPO.is_file() else NPZ_DEFAULT


def _file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_exists(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"{path} is a folder: pass --data the .npz or cifar-10-python.tar.gz inside it")
    if not path.is_file():
        raise DataError(
            f"dataset not found at {path}: pass --data PATH (or set QUICKNET_DATA), "
            "or run `quicknet data fetch` to download the official CIFAR-10 archive"
        )


def _cache_dir() -> Path:
    return Path(os.environ.get("QUICKNET_CACHE", Path.home() / ".cache" / "quicknet"))


def load(path: Path | None = None, *, expected_digest: str | None = None, test_only: bool = False) -> Dataset:
    """Load CIFAR-10 from the npz copy or the official tarball, chosen by file name. The copy's
    test split alone (`write_test_split`) is read only where `test_only` says the caller needs no
    training images (a gate); elsewhere it is refused in one line."""
    path = Path(path) if path else default_data_path()
    _check_exists(path)
    if path.name.endswith((".tar.gz", ".tgz")):
        return load_tarball(path, expected_md5=TARBALL_MD5 if expected_digest is None else expected_digest)
    if _is_test_split(path):
        if not test_only:
            raise DataError(
                f"{path} holds the test split alone (for a GPU serve run's gate); training and the build "
                f"need the whole copy: {NPZ_IN_REPO} or {NPZ_DEFAULT}"
            )
        return _load_test_split(path)
    return load_npz(path, expected_sha256=NPZ_SHA256 if expected_digest is None else expected_digest)


def _split_digest(jpeg: np.ndarray, offsets: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    for array, dtype in ((jpeg, np.uint8), (offsets, "<i8"), (labels, np.uint8)):
        h.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    return h.hexdigest()


def _read_test_split(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """The test split's arrays from `path` (the whole copy, or the split alone) and their digest,
    checked against `TEST_SPLIT_SHA256`: a one-line `DataError` for anything else."""
    try:
        with np.load(path) as z:
            jpeg, offsets, labels = (z[key] for key in TEST_SPLIT_KEYS)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable CIFAR-10 test split ({e}); make it again: make gpu-data") from None
    # the digest is of the arrays' bytes, so their form is checked first
    shapes_ok = jpeg.ndim == 1 and offsets.shape == (10001,) and labels.shape == (10000,)
    types_ok = (jpeg.dtype, offsets.dtype, labels.dtype) == (np.uint8, np.int64, np.uint8)
    digest = _split_digest(jpeg, offsets, labels) if shapes_ok and types_ok else ""
    if digest != TEST_SPLIT_SHA256:
        found = f"SHA-256 {digest[:12]}…" if digest else "arrays of another shape or type"
        raise DataError(
            f"{path} holds a test split with {found}, expected SHA-256 {TEST_SPLIT_SHA256[:12]}…: "
            "it is not the CIFAR-10 JPEG copy's; make it again: make gpu-data"
        )
    return jpeg, offsets, labels, digest


def write_test_split(src: Path, dest: Path) -> Path:
    """`src`'s test split alone into `dest` (a compressed npz of `TEST_SPLIT_KEYS`), checked
    against `TEST_SPLIT_SHA256`: what `load(test_only=True)` reads as a dataset with an empty
    train split."""
    src, dest = Path(src), Path(dest)
    _check_exists(src)
    arrays = dict(zip(TEST_SPLIT_KEYS, _read_test_split(src)[:3], strict=True))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dest) as f:
        np.savez_compressed(f, **arrays)
    return dest


def _is_test_split(path: Path) -> bool:
    """A zip holding exactly the test split's arrays (anything else: the whole copy's own checks)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return sorted(zf.namelist()) == sorted(f"{key}.npy" for key in TEST_SPLIT_KEYS)
    except (OSError, zipfile.BadZipFile):
        return False


def _load_test_split(path: Path) -> Dataset:
    jpeg, offsets, labels, digest = _read_test_split(path)
    empty = Split(np.empty((0, 32, 32, 3), np.uint8), np.empty(0, np.uint8))
    return Dataset(empty, Split(_decode_jpegs(jpeg, offsets), labels.astype(np.uint8)), NPZ_DESCRIPTION, digest)


def load_npz(path: Path, *, expected_sha256: str | None = NPZ_SHA256) -> Dataset:
    path = Path(path)
    _check_exists(path)
    digest = _file_digest(path, "sha256")
    if expected_sha256 and digest != expected_sha256:
        raise DataError(
            f"{path} has SHA-256 {digest[:12]}…, expected {expected_sha256[:12]}…: "
            f"the file is truncated or not the CIFAR-10 JPEG copy; restore it from {NPZ_DEFAULT}"
        )
    cache = _cache_dir() / f"cifar10-jpeg-{digest[:16]}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as z:
                return Dataset(
                    Split(z["train_x"], z["train_y"]), Split(z["test_x"], z["test_y"]), NPZ_DESCRIPTION, digest
                )
        except (OSError, ValueError, KeyError):
            cache.unlink(missing_ok=True)  # a damaged cache is rebuilt, never trusted
    try:
        with np.load(path) as z:
            train = Split(_decode_jpegs(z["train_jpeg"], z["train_offsets"]), z["train_labels"].astype(np.uint8))
            test = Split(_decode_jpegs(z["test_jpeg"], z["test_offsets"]), z["test_labels"].astype(np.uint8))
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise DataError(f"{path} is not a readable CIFAR-10 npz ({e}); restore it from {NPZ_DEFAULT}") from None
    with atomic_write(cache) as f:
        np.savez(f, train_x=train.images, train_y=train.labels, test_x=test.images, test_y=test.labels)
    return Dataset(train, test, NPZ_DESCRIPTION, digest)


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray, jobs: int | None = None) -> np.ndarray:
    """Decode every JPEG; in parallel processes where there are cores to spare (a GPU machine
    has 16, and each of its seconds is precious). Pillow's per-image Python work holds the GIL,
    so threads would not help."""
    raw = blob.tobytes()
    if jobs is None:
        jobs = max(1, min(16, len(os.sched_getaffinity(0)) - 1)) if len(offsets) > 20_000 else 1
    if jobs == 1:
        return _decode_range(raw, offsets)
    import multiprocessing

    bounds = np.linspace(0, len(offsets) - 1, jobs + 1, dtype=np.int64)
    chunks = [(raw[offsets[a] : offsets[b]], offsets[a : b + 1] - offsets[a]) for a, b in itertools.pairwise(bounds)]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:  # one bar per worker would garble: chunks
        parts = pool.imap(_decode_chunk, chunks)
        return np.concatenate(list(steps(parts, len(chunks), f"decoding JPEGs ({jobs} processes)", unit="chunk")))


def _decode_chunk(chunk: tuple[bytes, np.ndarray]) -> np.ndarray:
    os.environ["QUICKNET_PROGRESS"] = "0"  # a pool worker: the parent counts chunks
    return _decode_range(*chunk)


def _decode_range(raw: bytes, offsets: np.ndarray) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(offsets) - 1, 32, 32, 3), dtype=np.uint8)
    for i in steps(range(len(out)), len(out), "decoding JPEGs", unit="img"):
        with Image.open(io.BytesIO(raw[offsets[i] : offsets[i + 1]])) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out


def load_tarball(path: Path, *, expected_md5: str | None = TARBALL_MD5) -> Dataset:
    """Read the official `cifar-10-python.tar.gz` (pickled batches of CHW rows)."""
    path = Path(path)
    _check_exists(path)
    digest = _file_digest(path, "md5")
    if expected_md5 and digest != expected_md5:
        raise DataError(
            f"{path} has MD5 {digest}, expected {expected_md5}: the download is truncated or corrupt; "
            "delete it and run `quicknet data fetch` again"
        )
    batches: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                name = Path(member.name).name
                if member.isfile() and (name.startswith("data_batch_") or name == "test_batch"):
                    f = tar.extractfile(member)
                    assert f is not None
                    batches[name] = pickle.load(f, encoding="bytes")
    except (OSError, tarfile.TarError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"{path} is not a readable CIFAR-10 archive ({e}); run `quicknet data fetch` again") from None
    train_names = sorted(n for n in batches if n.startswith("data_batch_"))
    if not train_names or "test_batch" not in batches:
        raise DataError(f"{path} lacks data_batch_* or test_batch: not the CIFAR-10 python archive")

    def to_split(names: list[str]) -> Split:
        x = np.concatenate([np.asarray(batches[n][b"data"], dtype=np.uint8) for n in names])
        y = np.concatenate([np.asarray(batches[n][b"labels"], dtype=np.uint8) for n in names])
        return Split(np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), y)

    return Dataset(to_split(train_names), to_split(["test_batch"]), TARBALL_DESCRIPTION, digest)


def fetch(dest: Path, url: str = TARBALL_URL) -> Path:
    """Download the official archive with retries and a progress bar; verify its MD5 before keeping it."""
    import httpx
    from tqdm import tqdm

    dest = Path(dest)
    if dest.is_file() and _file_digest(dest, "md5") == TARBALL_MD5:
        return dest
    transport = httpx.HTTPTransport(retries=3)
    try:
        with (
            httpx.Client(transport=transport, follow_redirects=True, timeout=60) as client,
            client.stream("GET", url) as r,
        ):
            r.raise_for_status()
            total = int(r.headers.get("content-length", 0)) or None
            digest = hashlib.md5()
            with atomic_write(dest) as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                for chunk in r.iter_bytes(1 << 16):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                md5 = digest.hexdigest()
                if md5 != TARBALL_MD5:
                    raise DataError(f"downloaded archive has MD5 {md5}, expected {TARBALL_MD5}; try again")
    except httpx.HTTPError as e:
        raise DataError(f"could not download {url} ({e}); check the network or copy the file to {dest}") from None
    return dest


class TensorLoader:
    """Batches from tensors already on the target device; augmentation is batched tensor ops.

    Train mode: random translate by up to `translate` pixels (reflect padding), horizontal flip,
    and cutout of a `cutout`x`cutout` square. Works on CPU and CUDA alike.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        train: bool,
        device: str = "cpu",
        seed: int = 0,
        translate: int = 4,
        cutout: int = 8,
        drop_last: bool | None = None,
    ):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        x = torch.from_numpy(np.ascontiguousarray(split.images)).to(self.device)
        self.images = (x.permute(0, 3, 1, 2).float() - mean) / std
        self.labels = torch.from_numpy(split.labels.astype(np.int64)).to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.translate = translate
        self.cutout = cutout
        self.drop_last = train if drop_last is None else drop_last
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def epoch_order(self):
        """One epoch's shuffle (drawn from the loader's generator); None in eval mode."""
        if not self.train:
            return None
        return self.torch.randperm(len(self.labels), device=self.device, generator=self.generator)

    def batches(self, order=None, start: int = 0) -> Iterator[tuple]:
        """The epoch given by `order`, from batch `start` on (a resumed epoch continues mid-way)."""
        n = len(self.labels)
        for i in range(start, len(self)):
            sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, n))
            idx = order[sl] if order is not None else None
            x = self.images[idx] if idx is not None else self.images[sl]
            y = self.labels[idx] if idx is not None else self.labels[sl]
            if self.train:
                x = self._augment(x)
            yield x, y

    def __iter__(self) -> Iterator[tuple]:
        return self.batches(self.epoch_order())

    def _augment(self, x):
        torch = self.torch
        b, _, h, w = x.shape
        g, dev = self.generator, self.device
        if self.translate:
            p = self.translate
            padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
            dy = torch.randint(0, 2 * p + 1, (b,), device=dev, generator=g)
            dx = torch.randint(0, 2 * p + 1, (b,), device=dev, generator=g)
            rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])[:, None, :, None]
            cols = (torch.arange(w, device=dev)[None, :] + dx[:, None])[:, None, None, :]
            bi = torch.arange(b, device=dev)[:, None, None, None]
            ci = torch.arange(x.shape[1], device=dev)[None, :, None, None]
            x = padded[bi, ci, rows, cols]
        flip = torch.rand(b, device=dev, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.cutout:
            cy = torch.randint(0, h, (b,), device=dev, generator=g)[:, None, None]
            cx = torch.randint(0, w, (b,), device=dev, generator=g)[:, None, None]
            ys = torch.arange(h, device=dev)[None, :, None]
            xs = torch.arange(w, device=dev)[None, None, :]
            # rows cy - n//2 .. cy - n//2 + n - 1: exactly n x n inside the image, clipped at its edges
            # (`abs(d) < n // 2` was one short for even n: cutout 12 was 11x11)
            top, left = cy - self.cutout // 2, cx - self.cutout // 2
            hole = (ys >= top) & (ys < top + self.cutout) & (xs >= left) & (xs < left + self.cutout)
            x = x.masked_fill(hole[:, None], 0.0)
        return x.contiguous()
