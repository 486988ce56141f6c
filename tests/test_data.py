from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from quicknet.build import data
from quicknet.errors import DataError

# From shared/data/cifar10/README.md: SHA-256 of the decoded test images and labels.
TEST_IMAGES_SHA256 = "5a6aa8185204d80b65d3dfb540696dadd5f10d185ded226a96665d3e0fc6259f"


def test_npz_decodes_to_the_documented_arrays(cifar):
    assert cifar.train.images.shape == (50000, 32, 32, 3)
    assert cifar.test.images.shape == (10000, 32, 32, 3)
    assert hashlib.sha256(cifar.test.images.tobytes()).hexdigest() == TEST_IMAGES_SHA256
    assert "JPEG-q75" in cifar.source


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="not found.*--data.*quicknet data fetch"):
        data.load(tmp_path / "nope.npz")


def test_truncated_npz_fails_its_checksum(tmp_path):
    src = data.default_data_path()
    cut = tmp_path / "cifar10_jpeg.npz"
    cut.write_bytes(src.read_bytes()[: 1 << 20])
    with pytest.raises(DataError, match="SHA-256.*truncated"):
        data.load(cut)


def test_corrupt_npz_with_matching_checksum_is_rejected(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all")
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="not a readable CIFAR-10 npz"):
        data.load_npz(bad, expected_sha256=digest)


def _small_copy(path: Path, n: int = 40) -> Path:
    """The first `n` train and test JPEGs of the real copy, in its format: decoding 60k twice would
    cost ~18 s, and the cache logic is the same for 40."""
    with np.load(data.default_data_path()) as z:
        parts = {}
        for split in ("train", "test"):
            offsets = z[f"{split}_offsets"][: n + 1]
            parts |= {
                f"{split}_jpeg": z[f"{split}_jpeg"][: offsets[-1]],
                f"{split}_offsets": offsets,
                f"{split}_labels": z[f"{split}_labels"][:n],
            }
    np.savez(path, **parts)
    return path


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("QUICKNET_CACHE", str(tmp_path / "cache"))
    small = _small_copy(tmp_path / "small.npz")
    first = data.load_npz(small, expected_sha256=None)
    (cache,) = (tmp_path / "cache").glob("cifar10-jpeg-*.npz")
    cache.write_bytes(b"garbage")
    again = data.load_npz(small, expected_sha256=None)
    assert first.test.images.shape == (40, 32, 32, 3) and np.array_equal(first.test.images, again.test.images)
    assert np.load(cache)["test_x"].shape == (40, 32, 32, 3), "the damaged cache was written again"


def _write_tarball(path: Path, rng: np.random.Generator, batches: dict[str, int]) -> dict[str, tuple]:
    made = {}
    with tarfile.open(path, "w:gz") as tar:
        for name, n in batches.items():
            chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
            labels = rng.integers(0, 10, n).tolist()
            blob = pickle.dumps({b"data": chw.reshape(n, -1), b"labels": labels, b"batch_label": name.encode()})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            made[name] = (chw, labels)
    return made


def test_official_tarball_format_is_read(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    made = _write_tarball(path, np.random.default_rng(0), {"data_batch_1": 6, "data_batch_2": 4, "test_batch": 5})
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    ds = data.load(path, expected_digest=md5)
    assert ds.train.images.shape == (10, 32, 32, 3) and ds.test.images.shape == (5, 32, 32, 3)
    chw, labels = made["test_batch"]
    assert np.array_equal(ds.test.images, chw.transpose(0, 2, 3, 1))  # CHW rows become NHWC pixels
    assert ds.test.labels.tolist() == labels
    assert np.array_equal(ds.train.images[6:], made["data_batch_2"][0].transpose(0, 2, 3, 1))


def test_tarball_with_wrong_md5_says_redownload(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    _write_tarball(path, np.random.default_rng(0), {"data_batch_1": 2, "test_batch": 2})
    with pytest.raises(DataError, match="MD5 .* expected c58f30108f718f92721af3b95e74349a.*quicknet data fetch"):
        data.load(path)


def test_truncated_tarball_is_a_clear_error(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    _write_tarball(path, np.random.default_rng(0), {"data_batch_1": 50, "test_batch": 50})
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match="not a readable CIFAR-10 archive"):
        data.load_tarball(path, expected_md5=None)


def test_tarball_without_batches_is_rejected(tmp_path):
    path = tmp_path / "other.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("readme.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match="lacks data_batch"):
        data.load_tarball(path, expected_md5=None)


def test_loader_augments_deterministically_and_keeps_eval_untouched(test_images):
    a = data.TensorLoader(test_images, 64, train=True, seed=3)
    b = data.TensorLoader(test_images, 64, train=True, seed=3)
    (xa, ya), (xb, yb) = next(iter(a)), next(iter(b))
    assert xa.shape == (64, 3, 32, 32) and torch.equal(xa, xb) and torch.equal(ya, yb)
    plain = data.TensorLoader(test_images, 64, train=False)
    x0, y0 = next(iter(plain))
    assert torch.equal(y0, torch.from_numpy(test_images.labels[:64].astype(np.int64)))
    assert not torch.equal(xa, x0)
    assert len(plain) == 8 and len(data.TensorLoader(test_images.sample(100), 64, train=False)) == 2


@pytest.mark.parametrize("side", [5, 8, 12, 16])
def test_cutout_zeroes_an_exact_square(test_images, side):
    """A square fully inside the image is side x side pixels (it was (side-1)^2 for even sides);
    one at an edge is the same square clipped."""
    loader = data.TensorLoader(test_images, 256, train=True, seed=0, translate=0, cutout=side)
    x, _ = next(iter(loader))
    hole = (x == 0).all(dim=1)  # normalized pixels are never exactly 0 by chance
    inside = 0
    for mask in hole:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(mask.sum()) == height * width, "the hole is one rectangle"
        assert height <= side and width <= side
        if 0 < rows[0] <= rows[-1] < 31 and 0 < cols[0] <= cols[-1] < 31:
            assert (height, width) == (side, side), f"{height}x{width} for cutout {side}"
            inside += 1
    assert inside >= 20


def test_fetch_keeps_nothing_when_the_download_is_wrong(tmp_path, monkeypatch):
    import httpx

    payload = b"x" * 1000

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=payload)

    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(handler)))
    dest = tmp_path / "cifar-10-python.tar.gz"
    with pytest.raises(DataError, match="MD5"):
        data.fetch(dest)
    assert list(tmp_path.iterdir()) == []


def test_parallel_jpeg_decoding_matches_serial(cifar):
    with np.load(data.default_data_path()) as z:
        offsets = z["test_offsets"][:1001]
        blob = z["test_jpeg"][: offsets[-1]]
    serial = data._decode_jpegs(blob, offsets, jobs=1)
    parallel = data._decode_jpegs(blob, offsets, jobs=3)
    assert serial.shape == (1000, 32, 32, 3) and np.array_equal(serial, parallel)
    assert np.array_equal(serial, cifar.test.images[:1000])


def test_the_test_split_alone_is_the_copys_test_split_and_is_checked(cifar, tmp_path):
    """What the GPU serve run carries to gate on (3 MiB against 18): the copy's 10k test split,
    identical once decoded, its content's SHA-256 checked, with an empty train split."""
    path = data.write_test_split(data.default_data_path(), tmp_path / "test.npz")
    assert path.stat().st_size < 4 << 20
    with pytest.raises(DataError, match="holds the test split alone.*need the whole copy"):
        data.load(path)  # training, the build: never a dataset without training images
    alone = data.load(path, test_only=True)
    assert alone.train.images.shape == (0, 32, 32, 3) and len(alone.train.labels) == 0
    np.testing.assert_array_equal(alone.test.images, cifar.test.images)
    np.testing.assert_array_equal(alone.test.labels, cifar.test.labels)
    assert alone.source == cifar.source and alone.checksum == data.TEST_SPLIT_SHA256
    with np.load(path) as z:
        arrays = {key: z[key] for key in data.TEST_SPLIT_KEYS}
    labels = arrays["test_labels"].copy()
    labels[0] = (labels[0] + 1) % 10
    jpeg, offsets = arrays["test_jpeg"], arrays["test_offsets"]
    changed = {
        "a label": arrays | {"test_labels": labels},
        "the JPEG bytes' type": arrays | {"test_jpeg": jpeg.astype(np.int16)},  # the same bytes' digest otherwise
        "bytes moved into an offset": arrays | {"test_offsets": np.concatenate([[0], offsets])},
    }
    for edited in changed.values():
        np.savez_compressed(tmp_path / "changed.npz", **edited)
        with pytest.raises(DataError, match="not the CIFAR-10 JPEG copy's; make it again: make gpu-data"):
            data.load(tmp_path / "changed.npz", test_only=True)
