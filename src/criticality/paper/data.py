"""Data sets: small ones as normalized in-memory tensors, ImageNet as a lazily decoded image tree.

| name          | read from                                                   | x per example | classes |
|---------------|-------------------------------------------------------------|---------------|---------|
| digits        | scikit-learn's bundled ``load_digits`` (last 360 = test)     | (1, 8, 8)     | 10      |
| fashion-mnist | IDX files: ``/usr/share/datasets/fashion-mnist`` or ``root`` | (1, 28, 28)   | 10      |
| mnist         | IDX files: ``root/MNIST/raw`` (torchvision) or ``root``      | (1, 28, 28)   | 10      |
| cifar10       | ``root/cifar-10-batches-py`` pickles (restricted unpickler)  | (3, 32, 32)   | 10      |
| imagenet      | ``root/{train,val}/<class>/*.JPEG`` (decoded per item)       | (3, S, S)     | folders |

Pixels are scaled to [0, 1], then standardized with the constants in ``MEAN_STD`` (mean/std of each
training set; per channel for colour). ``fetch`` downloads mnist / fashion-mnist / cifar10 from
``MIRRORS`` and checks ``CHECKSUMS``. Randomness (subsets, shuffles, augmentation) always comes from an
explicit ``torch.Generator``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import math
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from criticality.errors import CriticalityError, unknown_name
from criticality.infra.files import atomic_path

NAMES = ("digits", "fashion-mnist", "mnist", "cifar10", "imagenet")
Split = tuple[Tensor, Tensor] | torch.utils.data.Dataset

# (mean, std) per channel of the [0, 1]-scaled training images.
MEAN_STD = {
    "digits": ((0.3054,), (0.3755,)),  # x/16, first 1437 images
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
CLASSES = {
    "digits": tuple("0123456789"),
    "mnist": tuple("0123456789"),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # torchvision: root/<dir>/raw
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")

# Base URLs tried in order; the file name is appended. Tests point these at a local server.
MIRRORS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}
# Accepted digests per file, "algorithm:hex". Fashion-MNIST: Debian re-packs the .gz files, so both the
# Debian sha256 and the upstream md5 (as published by torchvision) identify the same data.
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte.gz": ("md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",),
        "train-labels-idx1-ubyte.gz": ("md5:d53e105ee54ea40749a09fcbcd1e9432",),
        "t10k-images-idx3-ubyte.gz": ("md5:9fb629c4189551a2d022fa330f9573f3",),
        "t10k-labels-idx1-ubyte.gz": ("md5:ec29112dd5afa0611ce80d1b7f02629c",),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": ("sha256:b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
                                       "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        "train-labels-idx1-ubyte.gz": ("sha256:0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
                                       "md5:25c81989df183df01b3e8a0aad5dffbe"),
        "t10k-images-idx3-ubyte.gz": ("sha256:cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
                                      "md5:bef4ecab320f06d8554ea6380940ec79"),
        "t10k-labels-idx1-ubyte.gz": ("sha256:8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
                                      "md5:bb300cfdad3c16e7a12a480ee83cd310"),
    },
    "cifar10": {CIFAR_ARCHIVE: ("md5:c58f30108f718f92721af3b95e74349a",)},
}


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split = dataclasses.field(repr=False)  # (x (N, C, H, W) float32, y (N,) int64) or a torch Dataset
    test: Split = dataclasses.field(repr=False)
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    normalization: str  # how raw pixels became x, constants included
    source: str  # where the data was read from
    classes: tuple[str, ...] | None = None


def default_data() -> str:
    """The data set the embedded default runs on: Fashion-MNIST when installed, else the bundled digits."""
    return "fashion-mnist" if (DEBIAN_FASHION / "t10k-labels-idx1-ubyte.gz").is_file() else "digits"


def load(name: str, root: str | Path | None = None, *, download: bool = False, max_train: int | None = None,
         max_test: int | None = None, generator: torch.Generator | None = None,
         image_size: int = 224) -> Dataset:
    """Load data set ``name`` (see ``NAMES``); ``max_train``/``max_test`` keep stratified subsets.

    ``generator`` draws the subsets (default: a fixed seed 0) and ImageNet's augmentation seed;
    ``image_size`` is ImageNet's crop side S in pixels (ignored by the others).
    """
    if name not in NAMES:
        raise unknown_name("data set", name, NAMES)
    root = Path(root).expanduser() if root is not None else None
    if name == "digits":
        ds = _digits()
    elif name in TORCHVISION_DIR:  # subsets drawn on the bytes: the whole set is never made float
        return _idx_dataset(name, root, download, (max_train, max_test), generator)
    elif name == "cifar10":
        return _cifar10(root, download, (max_train, max_test), generator)
    else:
        if download:
            raise CriticalityError("imagenet cannot be downloaded automatically (licence): get ILSVRC2012 "
                                   "from image-net.org and pass --data-root")
        from criticality.paper.imagenet import load_imagenet  # Pillow is imported only when ImageNet is used

        ds = load_imagenet(root, image_size, generator)
    return dataclasses.replace(ds, train=_subset(ds.train, max_train, generator),
                               test=_subset(ds.test, max_test, generator))


def _normalization(name: str, scale: int) -> str:
    mean, std = MEAN_STD[name]
    return f"x/{scale}, then (x-{mean})/{std} per channel (training-set mean/std)"


def _standardize(x: np.ndarray, name: str, scale: float) -> Tensor:
    """uint8 (N, H, W) or (N, C, H, W) → float32 (N, C, H, W), (x/scale - mean)/std."""
    t = torch.from_numpy(x.astype(np.float32)).div_(scale)  # astype copies: IDX arrays are read-only views
    t = t.unsqueeze(1) if t.ndim == 3 else t
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in MEAN_STD[name])
    return t.sub_(mean).div_(std)


def _digits() -> Dataset:
    import sklearn
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)  # (1797, 64) float64 in 0..16, (1797,)
    x = _standardize(x.reshape(-1, 8, 8), "digits", 16.0)  # (1797, 1, 8, 8)
    y = torch.from_numpy(y).long()
    return Dataset("digits", (x[:-360], y[:-360]), (x[-360:], y[-360:]), 10, (1, 8, 8),
                   _normalization("digits", 16) + "; test = the last 360 images",
                   f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})", CLASSES["digits"])


# ---- IDX (MNIST, Fashion-MNIST) ----

def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (plain or gzip) → uint8 array with ``ndim`` dims, checked exactly."""
    try:
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise CriticalityError(f"{path}: cannot read IDX file ({e})") from e
    head = 4 + 4 * ndim
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise CriticalityError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000 0803/0801)")
    if raw[2] != 0x08:
        raise CriticalityError(f"{path}: IDX dtype code 0x{raw[2]:02x}, expected 0x08 (unsigned byte)")
    if raw[3] != ndim:
        raise CriticalityError(f"{path}: IDX file has {raw[3]} dimensions, expected {ndim}")
    if len(raw) < head:
        raise CriticalityError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    if len(raw) - head != math.prod(dims):
        raise CriticalityError(f"{path}: IDX payload is {len(raw) - head} bytes but dims {dims} need "
                               f"{math.prod(dims)} (truncated or corrupt)")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


def _idx_dirs(name: str, root: Path | None) -> list[Path]:
    """Where to look, in order: torchvision's layout, ``root`` itself, then the Debian package."""
    dirs = [root / TORCHVISION_DIR[name] / "raw", root] if root is not None else []
    return dirs + [DEBIAN_FASHION] if name == "fashion-mnist" else dirs


def _find_idx(dirs: list[Path]) -> list[Path] | None:
    """The four IDX paths (plain or .gz) from the first directory holding all of them."""
    for d in dirs:
        paths = [next((p for p in (d / f, d / f"{f}.gz") if p.is_file()), None) for f in IDX_FILES]
        if all(paths):
            return paths
    return None


def _pixels(x: np.ndarray, y: Tensor, n: int | None, generator: torch.Generator | None, name: str,
            scale: float) -> tuple[Tensor, Tensor]:
    """``load``'s stratified subset of ``n`` examples (all for None) taken from the raw pixels ``x`` before
    :func:`_standardize`: the same values as subsetting afterwards, without a float copy of the whole set
    (Fashion-MNIST's training set: 188 MB, three times an fcn-5x2048)."""
    if n is not None:
        idx = stratified_indices(y, n, generator)
        x, y = x[idx.numpy()], y[idx]
    return _standardize(x, name, scale), y


def _idx_dataset(name: str, root: Path | None, download: bool, sizes: tuple[int | None, int | None] = (None, None),
                 generator: torch.Generator | None = None) -> Dataset:
    dirs = _idx_dirs(name, root)
    paths = _find_idx(dirs)
    if paths is None and download:
        fetch(name, _need_root(name, root))
        paths = _find_idx(dirs)
    if paths is None:
        how = ("install them with `apt-get install dataset-fashion-mnist`, or pass --data-root DIR holding them "
               "(add --download to fetch them into DIR)" if name == "fashion-mnist" else
               "pass --data-root DIR holding them (torchvision's DIR/MNIST/raw works), or add --download")
        raise CriticalityError(f"{name}: files not found: {', '.join(f + '[.gz]' for f in IDX_FILES)}; searched "
                               f"{', '.join(map(str, dirs)) or '(no --data-root given)'}; {how}")
    train = _idx_split(name, *paths[:2], sizes[0], generator)  # train first: the generator's order
    test = _idx_split(name, *paths[2:], sizes[1], generator)
    return Dataset(name, train, test, 10, tuple(train[0].shape[1:]), _normalization(name, 255),
                   str(paths[0].parent), CLASSES[name])


def _idx_split(name: str, images: Path, labels: Path, n: int | None = None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    x, y = read_idx(images, 3), read_idx(labels, 1)  # (N, H, W), (N,) uint8
    if len(x) != len(y) or (y.size and y.max() > 9):
        raise CriticalityError(f"{images} / {labels}: {len(x)} images but {len(y)} labels, or labels outside 0..9")
    return _pixels(x, torch.from_numpy(y.astype(np.int64)), n, generator, name, 255.0)


def _need_root(name: str, root: Path | None) -> Path:
    if root is None:
        raise CriticalityError(f"{name}: --download needs --data-root DIR to download into")
    return root


# ---- CIFAR-10 ----

_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's ndarray reconstructor, whatever module holds it
_CIFAR_GLOBALS = {  # everything the CIFAR-10 python pickles reference (numpy 1.x and 2.x module names)
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and builtins only; any other global is refused, never imported."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _CIFAR_GLOBALS:
            return _CIFAR_GLOBALS[(module, name)]
        raise CriticalityError(f"{self.path}: refusing to unpickle {module}.{name} (not a CIFAR-10 batch)")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 python batch → (uint8 (N, 3, 32, 32), int64 (N,))."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, path).load()
    except CriticalityError:
        raise
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise CriticalityError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from e
    data, labels = (obj.get(b"data"), obj.get(b"labels")) if isinstance(obj, dict) else (None, None)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise CriticalityError(f"{path}: not a CIFAR-10 batch (needs 'data': uint8 array (N, 3072))")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise CriticalityError(f"{path}: CIFAR-10 'labels' are not integers") from e
    if y.shape != (len(data),) or (y.size and (y.min() < 0 or y.max() > 9)):
        raise CriticalityError(f"{path}: CIFAR-10 'labels' must be {len(data)} integers in 0..9")
    return data.reshape(-1, 3, 32, 32), y  # rows are 1024 red, 1024 green, 1024 blue values


def _cifar10(root: Path | None, download: bool, sizes: tuple[int | None, int | None] = (None, None),
             generator: torch.Generator | None = None) -> Dataset:
    dirs = [root / CIFAR_DIR, root] if root is not None else []
    if download and not any(all((d / f).is_file() for f in CIFAR_FILES) for d in dirs):
        fetch("cifar10", _need_root("cifar10", root))
    folder = next((d for d in dirs if all((d / f).is_file() for f in CIFAR_FILES)), None)
    if folder is None:
        raise CriticalityError(f"cifar10: files not found: {', '.join(CIFAR_FILES)}; searched "
                               f"{', '.join(map(str, dirs)) or '(no --data-root given)'}; pass --data-root DIR "
                               f"holding {CIFAR_DIR}/ (add --download to fetch it into DIR)")
    parts = [read_cifar_batch(folder / f) for f in CIFAR_FILES]
    x_train, y_train = (np.concatenate(a) for a in zip(*parts[:5], strict=True))  # (50000, 3, 32, 32), (50000,)
    train = _pixels(x_train, torch.from_numpy(y_train), sizes[0], generator, "cifar10", 255.0)
    test = _pixels(parts[5][0], torch.from_numpy(parts[5][1]), sizes[1], generator, "cifar10", 255.0)
    return Dataset("cifar10", train, test, 10, (3, 32, 32), _normalization("cifar10", 255), str(folder),
                   CLASSES["cifar10"])


# ---- downloads ----

def fetch(name: str, root: str | Path, *, mirrors: tuple[str, ...] | None = None) -> Path:
    """Download ``name``'s files into ``root`` (torchvision's layout), verifying ``CHECKSUMS``."""
    root = Path(root)
    urls = mirrors if mirrors is not None else MIRRORS[name]
    if name == "cifar10":
        archive = root / CIFAR_ARCHIVE
        _download([u + CIFAR_ARCHIVE for u in urls], archive, CHECKSUMS[name][CIFAR_ARCHIVE])
        _extract_cifar(archive, root)
        return root / CIFAR_DIR
    folder = root / TORCHVISION_DIR[name] / "raw"
    for file, accepted in CHECKSUMS[name].items():
        if not ((folder / file).is_file() and _digest_ok(folder / file, accepted)):
            _download([u + file for u in urls], folder / file, accepted)
    return folder


def _digest_ok(path: Path, accepted: tuple[str, ...]) -> bool:
    for want in accepted:
        algo = want.split(":")[0]
        with open(path, "rb") as f:
            if f"{algo}:{hashlib.file_digest(f, algo).hexdigest()}" == want:
                return True
    return False


def _download(urls: list[str], dest: Path, accepted: tuple[str, ...]) -> None:
    """First mirror that answers wins; a checksum mismatch raises and leaves no file at ``dest``."""
    failures = []
    for url in urls:
        try:
            with atomic_path(dest) as tmp:
                with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                    shutil.copyfileobj(response, f, 1 << 20)
                if not _digest_ok(tmp, accepted):
                    raise CriticalityError(f"{url}: checksum mismatch (expected {' or '.join(accepted)}); "
                                           "the download was deleted")
            return
        except (urllib.error.URLError, OSError) as e:
            failures.append(f"{url} ({e})")
    raise CriticalityError(f"could not download {dest.name}: " + "; ".join(failures))


def _extract_cifar(archive: Path, root: Path) -> None:
    """Unpack only ``cifar-10-batches-py/*`` regular files, via a temporary folder then one rename."""
    with tempfile.TemporaryDirectory(dir=root, prefix=".cifar-") as tmp, tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(CIFAR_DIR + "/")]
        tar.extractall(tmp, members=members, filter="data")
        target = root / CIFAR_DIR
        if target.exists():
            shutil.rmtree(target)
        Path(tmp, CIFAR_DIR).rename(target)
    archive.unlink()


# ---- subsets, batches, augmentation ----

def stratified_indices(y: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Sorted indices of ``n`` examples whose class proportions match ``y``'s (all if n >= len(y))."""
    if n < 1:
        raise CriticalityError(f"a subset needs at least 1 example, got {n}")
    if n >= len(y):
        return torch.arange(len(y))
    perm = torch.randperm(len(y), generator=generator or torch.Generator().manual_seed(0))
    y_perm = y.cpu()[perm]
    # Each example's rank within its class, as a fraction of the class size: taking the n smallest
    # takes about n * (class share) from every class.
    rank = torch.empty(len(y), dtype=torch.float64)
    for c in y_perm.unique():
        mask = y_perm == c
        k = int(mask.sum())
        rank[mask] = torch.arange(k, dtype=torch.float64) / k
    return perm[torch.argsort(rank, stable=True)[:n]].sort().values


def stratified_subset(x: Tensor, y: Tensor, n: int, generator: torch.Generator | None = None
                      ) -> tuple[Tensor, Tensor]:
    idx = stratified_indices(y, n, generator).to(y.device)
    return x[idx], y[idx]


def _subset(split: Split, n: int | None, generator: torch.Generator | None) -> Split:
    if n is None:
        return split
    if hasattr(split, "subset"):  # an ImageFolder (criticality.imagenet)
        return split.subset(stratified_indices(split.targets, n, generator))
    return stratified_subset(*split, n, generator)


def batches(x: Tensor, y: Tensor, batch_size: int, *, shuffle: bool = False,
            generator: torch.Generator | None = None, augment: Callable[[Tensor], Tensor] | None = None,
            drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches ``(x[b], y[b])`` of in-memory tensors, each example once per pass (last one short
    unless ``drop_last``); ``shuffle`` needs an explicit generator; ``augment`` maps each x batch."""
    if shuffle and generator is None:
        raise ValueError("batches(shuffle=True) needs an explicit torch.Generator")
    order = torch.randperm(len(x), generator=generator, device=generator.device).to(x.device) if shuffle else None
    stop = len(x) - len(x) % batch_size if drop_last else len(x)
    for start in range(0, stop, batch_size):
        if order is None:
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            xb, yb = x[idx], y[idx]
        yield (augment(xb) if augment is not None else xb), yb


def crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Random crop after zero padding (0 = the data-set mean, x being normalized) and a horizontal flip
    with probability 1/2, independently per image: (N, C, H, W) → (N, C, H, W), two gathers."""
    n, c, h, w = x.shape
    shifts = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=generator.device).to(x.device)
    flip = (torch.rand(n, generator=generator, device=generator.device) < 0.5).to(x.device)  # (N,)
    padded = F.pad(x, (padding,) * 4)  # (N, C, H + 2p, W + 2p)
    rows = shifts[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = shifts[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))  # (N, C, H, W + 2p)
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))  # (N, C, H, W)
