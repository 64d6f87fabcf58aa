"""Tests for criticality.paper.data.  Run: ``.venv/bin/pytest tests/test_data.py -q`` (about 10 s, no internet).

Checks: real Fashion-MNIST from the Debian package (shapes, dtypes, labels, train mean 0 / std 1;
skipped only when /usr/share/datasets/fashion-mnist is absent) and its published checksums; digits;
MNIST IDX files written here (plain and .gz, torchvision and flat layouts) read back exactly; corrupt IDX
files; CIFAR-10 batches pickled here read back exactly; a malicious pickle refused without running;
an ImageNet-style tree of tiny PNGs; a corrupt image; the missing-data message; downloads from a
localhost HTTP server only (good checksum, bad checksum, mirror fallback, CIFAR archive); batching,
stratified subsets and the crop-and-flip augmentation against a per-image reference loop.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from criticality.errors import CriticalityError
from criticality.paper import data
from criticality.paper.data import imagenet, loading
from fixtures import serve, write_cifar, write_idx, write_mnist, write_png, write_tree


def unnormalize(x: torch.Tensor, name: str, scale: float) -> np.ndarray:
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in data.MEAN_STD[name])
    return (x * std + mean).mul(scale).round().to(torch.int64).numpy()


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


needs_fashion = pytest.mark.skipif(not data.DEBIAN_FASHION.is_dir(),
                                   reason="Debian package dataset-fashion-mnist not installed")


# ---- real data ----


@needs_fashion
def test_fashion_mnist_real(tmp_path):
    ds = data.load("fashion-mnist")
    (x, y), (xt, yt) = ds.train, ds.test
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.unique().tolist()) == set(range(10)) == set(yt.unique().tolist())
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and len(ds.classes) == 10
    assert ds.source == str(data.DEBIAN_FASHION) and "0.286" in ds.normalization
    assert data.load("fashion-mnist", tmp_path, max_train=10).source == str(data.DEBIAN_FASHION)  # fallback


@needs_fashion
def test_fashion_mnist_checksums_match_debian_files():
    for file, accepted in data.CHECKSUMS["fashion-mnist"].items():
        digest = hashlib.sha256((data.DEBIAN_FASHION / file).read_bytes()).hexdigest()
        assert f"sha256:{digest}" in accepted


def test_digits():
    from sklearn.datasets import load_digits

    ds = data.load("digits")
    (x, _), (xt, yt) = ds.train, ds.test
    assert x.shape == (1437, 1, 8, 8) and xt.shape == (360, 1, 8, 8) and ds.input_shape == (1, 8, 8)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    raw, target = load_digits(return_X_y=True)
    np.testing.assert_array_equal(unnormalize(xt, "digits", 16).reshape(360, 64), raw[-360:])
    np.testing.assert_array_equal(yt.numpy(), target[-360:])


def test_unknown_name_suggests():
    with pytest.raises(CriticalityError, match="did you mean 'cifar10'"):
        data.load("cifar-10")


# ---- MNIST IDX ----


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("torchvision_layout", [False, True])
def test_mnist_idx_roundtrip(tmp_path, gz, torchvision_layout):
    folder = tmp_path / "MNIST" / "raw" if torchvision_layout else tmp_path
    arrays = write_mnist(folder, gz)
    ds = data.load("mnist", tmp_path)
    np.testing.assert_array_equal(unnormalize(ds.train[0], "mnist", 255)[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(unnormalize(ds.test[0], "mnist", 255)[:, 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.train[1].numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test[1].numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.source == str(folder) and ds.input_shape == (1, 28, 28)


def _corrupt(raw: bytes, how: str) -> bytes:
    return {"truncated": raw[:-5], "magic": b"\x12\x34" + raw[2:], "dtype": raw[:2] + b"\x0d" + raw[3:],
            "ndim": raw[:3] + b"\x02" + raw[4:], "extra": raw + b"\0"}[how]


@pytest.mark.parametrize("how,message", [("truncated", "truncated"), ("magic", "magic"),
                                         ("dtype", "dtype code 0x0d"), ("ndim", "2 dimensions"),
                                         ("extra", "payload")])
def test_corrupt_idx_names_file(tmp_path, how, message):
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28)))
    path.write_bytes(_corrupt(path.read_bytes(), how))
    with pytest.raises(CriticalityError, match=message) as err:
        data.read_idx(path, 3)
    assert str(path) in str(err.value)


def test_truncated_gzip_names_file(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(CriticalityError, match="train-images-idx3-ubyte.gz"):
        data.read_idx(path, 3)


def test_missing_data_message(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "DEBIAN_FASHION", tmp_path / "not-installed")
    with pytest.raises(CriticalityError) as err:
        data.load("mnist", tmp_path)
    message = str(err.value)
    assert all(f in message for f in data.IDX_FILES)
    assert str(tmp_path) in message and "--download" in message
    with pytest.raises(CriticalityError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion-mnist", tmp_path)
    with pytest.raises(CriticalityError, match="data_batch_1"):
        data.load("cifar10", tmp_path)
    with pytest.raises(CriticalityError, match="train/<class>"):
        data.load("imagenet", tmp_path)


# ---- CIFAR-10 ----


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_roundtrip(tmp_path, nested):
    folder = tmp_path / data.CIFAR_DIR if nested else tmp_path
    batches = write_cifar(folder)
    ds = data.load("cifar10", tmp_path)
    train_x = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    np.testing.assert_array_equal(unnormalize(ds.train[0], "cifar10", 255).reshape(-1, 3072), train_x)
    np.testing.assert_array_equal(unnormalize(ds.test[0], "cifar10", 255).reshape(-1, 3072), batches["test_batch"][0])
    assert ds.train[1].tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert ds.test[1].tolist() == batches["test_batch"][1]
    assert ds.train[0].shape == (20, 3, 32, 32) and ds.input_shape == (3, 32, 32)
    # channel-major rows: the first 1024 values are the red plane
    red = torch.tensor(batches["test_batch"][0][0, :1024].reshape(32, 32)).float() / 255
    mean, std = data.MEAN_STD["cifar10"]
    torch.testing.assert_close(ds.test[0][0, 0], (red - mean[0]) / std[0])


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the real CIFAR batches: every str as a BINSTRING (bytes
    under encoding='bytes') and numpy.core.multiarray._reconstruct by its old module name."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + bytes([len(raw)]) if len(raw) < 256 else pickle.BINSTRING + struct.pack(
            "<i", len(raw))
        self.write(head + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        if obj is np.zeros(0).__reduce__()[0]:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def test_cifar10_python2_style_batch(tmp_path):
    x = np.random.default_rng(2).integers(0, 256, (3, 3072), dtype=np.uint8)
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump({"batch_label": "training batch 1 of 5", "labels": [3, 1, 4], "data": x,
                                      "filenames": ["a.png", "b.png", "c.png"]})
    assert b"numpy.core.multiarray\n_reconstruct" in buf.getvalue()
    path = tmp_path / "data_batch_1"
    path.write_bytes(buf.getvalue())
    images, labels = data.read_cifar_batch(path)
    np.testing.assert_array_equal(images.reshape(3, 3072), x)
    assert labels.tolist() == [3, 1, 4]


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _RunsEval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload", [_RunsShell, _RunsEval])
def test_malicious_cifar_pickle_is_refused_not_run(tmp_path, payload):
    folder = tmp_path / data.CIFAR_DIR
    write_cifar(folder)
    marker = tmp_path / "pwned"
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [payload(marker)]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(evil))
    with pytest.raises(CriticalityError, match="refusing to unpickle .* \\(not a CIFAR-10 batch\\)") as err:
        data.load("cifar10", tmp_path)
    assert "data_batch_1" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("obj,message", [([1, 2], "not a CIFAR-10 batch"),
                                         ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "labels"),
                                         ({b"data": np.zeros((2, 10), np.uint8), b"labels": [1, 2]}, "3072")])
def test_wrong_cifar_content(tmp_path, obj, message):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(CriticalityError, match=message):
        data.read_cifar_batch(path)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CriticalityError, match="not a readable CIFAR-10 batch"):
        data.read_cifar_batch(path)


# ---- ImageNet-style tree ----


def test_imagenet_tree(tmp_path):
    write_tree(tmp_path)
    ds = data.load("imagenet", tmp_path, image_size=16, generator=torch.Generator().manual_seed(0))
    assert ds.classes == ("class0", "class1", "class2") and ds.num_classes == 3 and ds.input_shape == (3, 16, 16)
    assert len(ds.train) == 6 and len(ds.test) == 3
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in data.MEAN_STD["imagenet"])
    for split in (ds.train, ds.test):
        x, y = next(iter(torch.utils.data.DataLoader(split, batch_size=len(split))))
        assert x.shape == (len(split), 3, 16, 16) and x.dtype == torch.float32
        expected = (F.one_hot(y, 3).float()[:, :, None, None] - mean) / std  # flat colours survive crops
        torch.testing.assert_close(x, expected.expand_as(x), atol=1e-4, rtol=0)
    sub = data.load("imagenet", tmp_path, image_size=16, max_train=3)
    assert sorted(sub.train.targets.tolist()) == [0, 1, 2]


def test_imagenet_crops_are_seeded():
    img = torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(1))
    crop = lambda seed: imagenet.random_resized_crop(img, 16, torch.Generator().manual_seed(seed))  # noqa: E731
    assert crop(0).shape == (3, 16, 16)
    torch.testing.assert_close(crop(0), crop(0))
    assert not torch.equal(crop(0), crop(1))
    assert imagenet.resize_center_crop(img, 16).shape == (3, 16, 16)


def test_imagenet_train_items_repeat_per_epoch(tmp_path):
    write_tree(tmp_path)
    write_png(tmp_path / "train" / "class0" / "img0.png", np.random.default_rng(0).integers(0, 256, (30, 40, 3)))
    ds = data.load("imagenet", tmp_path, image_size=16, generator=torch.Generator().manual_seed(0))
    first = ds.train[0][0]
    torch.testing.assert_close(ds.train[0][0], first)
    ds.train.set_epoch(1)
    assert not torch.equal(ds.train[0][0], first)


def test_corrupt_image_names_file(tmp_path):
    write_tree(tmp_path)
    bad = tmp_path / "val" / "class1" / "img.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    ds = data.load("imagenet", tmp_path, image_size=16)
    with pytest.raises(CriticalityError, match="not a readable image") as err:
        ds.test[1]
    assert str(bad) in str(err.value)
    bad.write_bytes(b"not an image at all")
    with pytest.raises(CriticalityError, match=re.escape(str(bad))):
        ds.test[1]


# ---- downloads (localhost only) ----


@needs_fashion
def test_download_fashion_mnist_with_real_checksums(tmp_path, monkeypatch, no_proxy):
    debian = data.DEBIAN_FASHION
    monkeypatch.setattr(loading, "DEBIAN_FASHION", tmp_path / "not-installed")  # else no download is needed
    with serve(debian) as url:
        monkeypatch.setitem(data.MIRRORS, "fashion-mnist", (url,))
        ds = data.load("fashion-mnist", tmp_path, download=True, max_train=100, max_test=50)
    assert ds.source == str(tmp_path / "FashionMNIST" / "raw")
    assert ds.train[0].shape == (100, 1, 28, 28) and ds.test[0].shape == (50, 1, 28, 28)


def _mnist_server_dir(tmp_path: Path) -> tuple[Path, dict]:
    served = tmp_path / "served"
    write_mnist(served, gz=True)
    sums = {f"{f}.gz": (f"sha256:{hashlib.sha256((served / f'{f}.gz').read_bytes()).hexdigest()}",)
            for f in data.IDX_FILES}
    return served, sums


def test_download_good_checksum_and_mirror_fallback(tmp_path, monkeypatch, no_proxy):
    served, sums = _mnist_server_dir(tmp_path)
    monkeypatch.setitem(data.CHECKSUMS, "mnist", sums)
    with serve(served) as url:
        monkeypatch.setitem(data.MIRRORS, "mnist", (url + "missing/", url))  # first mirror answers 404
        ds = data.load("mnist", tmp_path / "root", download=True)
    assert ds.train[0].shape == (7, 1, 28, 28)
    assert sorted(p.name for p in (tmp_path / "root" / "MNIST" / "raw").iterdir()) == sorted(sums)


def test_download_bad_checksum_leaves_no_file(tmp_path, monkeypatch, no_proxy):
    served, sums = _mnist_server_dir(tmp_path)
    sums["train-images-idx3-ubyte.gz"] = ("md5:" + "0" * 32,)
    monkeypatch.setitem(data.CHECKSUMS, "mnist", sums)
    with serve(served) as url, pytest.raises(CriticalityError, match="checksum mismatch"):
        data.fetch("mnist", tmp_path / "root", mirrors=(url,))
    raw = tmp_path / "root" / "MNIST" / "raw"
    assert not raw.exists() or not any(raw.iterdir())


def test_download_unreachable_names_urls(tmp_path, no_proxy):
    with serve(tmp_path) as url, pytest.raises(CriticalityError, match="could not download .*404"):
        data.fetch("mnist", tmp_path / "root", mirrors=(url + "nothing/",))


def test_download_cifar_archive(tmp_path, monkeypatch, no_proxy):
    batches = write_cifar(tmp_path / "src" / data.CIFAR_DIR)
    served = tmp_path / "served"
    served.mkdir()
    archive = served / data.CIFAR_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / data.CIFAR_DIR, arcname=data.CIFAR_DIR)
        evil = tarfile.TarInfo("../escaped")  # outside the data folder: must not be written
        tar.addfile(evil, io.BytesIO(b""))
    monkeypatch.setitem(data.CHECKSUMS, "cifar10", {data.CIFAR_ARCHIVE: (
        "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest(),)})
    with serve(served) as url:
        monkeypatch.setitem(data.MIRRORS, "cifar10", (url,))
        ds = data.load("cifar10", tmp_path / "root", download=True)
    np.testing.assert_array_equal(unnormalize(ds.test[0], "cifar10", 255).reshape(-1, 3072), batches["test_batch"][0])
    assert not (tmp_path / "root" / data.CIFAR_ARCHIVE).exists() and not (tmp_path / "escaped").exists()


def test_download_needs_root():
    with pytest.raises(CriticalityError, match="--data-root"):
        data.load("mnist", download=True)


# ---- subsets, batches, augmentation ----


def test_stratified_subset():
    y = torch.arange(1000) % 4  # 4 balanced classes
    x = torch.arange(1000).float()[:, None]
    xs, ys = data.stratified_subset(x, y, 100, torch.Generator().manual_seed(3))
    assert torch.bincount(ys).tolist() == [25, 25, 25, 25]
    assert torch.equal(xs[:, 0].long() % 4, ys) and len(xs[:, 0].unique()) == 100
    again = data.stratified_subset(x, y, 100, torch.Generator().manual_seed(3))[0]
    assert torch.equal(xs, again)
    assert torch.equal(data.stratified_subset(x, y, 100)[0], data.stratified_subset(x, y, 100)[0])
    assert len(data.stratified_subset(x, y, 5000)[0]) == 1000
    ds = data.load("digits", max_train=100, max_test=50)
    assert len(ds.train[0]) == 100 and len(ds.test[0]) == 50 and torch.bincount(ds.train[1]).min() >= 9


def test_batches_cover_each_example_once():
    x, y = torch.arange(103).float()[:, None], torch.arange(103)
    seen = [yb for _, yb in data.minibatches(x, y, 10, shuffle=True, generator=torch.Generator().manual_seed(0))]
    assert [len(b) for b in seen] == [10] * 10 + [3]
    assert sorted(torch.cat(seen).tolist()) == list(range(103))
    again = torch.cat([yb for _, yb in data.minibatches(x, y, 10, shuffle=True,
                                                    generator=torch.Generator().manual_seed(0))])
    assert torch.equal(torch.cat(seen), again) and not torch.equal(again, y)
    plain = list(data.minibatches(x, y, 10, drop_last=True, augment=lambda xb: -xb))
    assert len(plain) == 10 and torch.equal(plain[0][0], -x[:10]) and torch.equal(plain[0][1], y[:10])
    with pytest.raises(ValueError, match="Generator"):
        next(data.minibatches(x, y, 10, shuffle=True))


def test_crop_flip_matches_per_image_reference():
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = data.crop_flip(x, torch.Generator().manual_seed(7))
    assert out.shape == x.shape
    torch.testing.assert_close(out, data.crop_flip(x, torch.Generator().manual_seed(7)))
    g = torch.Generator().manual_seed(7)  # replay the draws: (2, N) shifts, then N flip coins
    shifts, coins = torch.randint(0, 9, (2, 16), generator=g), torch.rand(16, generator=g)
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(16):
        ref = padded[i, :, shifts[0, i]:shifts[0, i] + 32, shifts[1, i]:shifts[1, i] + 32]
        torch.testing.assert_close(out[i], ref.flip(-1) if coins[i] < 0.5 else ref)
    assert not torch.equal(out, x)
    no_pad = data.crop_flip(x, torch.Generator().manual_seed(1), padding=0)
    assert all(torch.equal(o, xi) or torch.equal(o, xi.flip(-1)) for o, xi in zip(no_pad, x, strict=True))
