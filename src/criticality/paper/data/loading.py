"""``load(name)``: a data set as a ``Dataset``, small ones as normalized in-memory tensors, ImageNet as a
lazily decoded image tree; ``default_data()``: the set the embedded default runs on.

| name          | read from                                                   | x per example | classes |
|---------------|-------------------------------------------------------------|---------------|---------|
| digits        | scikit-learn's bundled ``load_digits`` (last 360 = test)     | (1, 8, 8)     | 10      |
| fashion-mnist | IDX files: ``/usr/share/datasets/fashion-mnist`` or ``root`` | (1, 28, 28)   | 10      |
| mnist         | IDX files: ``root/MNIST/raw`` (torchvision) or ``root``      | (1, 28, 28)   | 10      |
| cifar10       | ``root/cifar-10-batches-py`` pickles (restricted unpickler)  | (3, 32, 32)   | 10      |
| imagenet      | ``root/{train,val}/<class>/*.JPEG`` (decoded per item)       | (3, S, S)     | folders |

Randomness (subsets, ImageNet's augmentation seed) always comes from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from criticality.errors import CriticalityError, unknown_name
from criticality.paper.data.common import (
    CIFAR_DIR,
    CIFAR_FILES,
    CLASSES,
    IDX_FILES,
    NAMES,
    TORCHVISION_DIR,
    Dataset,
    normalization,
    standardize,
)
from criticality.paper.data.download import fetch
from criticality.paper.data.imagenet import load_imagenet
from criticality.paper.data.readers import read_cifar_batch, read_idx
from criticality.paper.data.subsets import stratified_indices, subset

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


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
        ds = load_imagenet(root, image_size, generator)
    return dataclasses.replace(ds, train=subset(ds.train, max_train, generator),
                               test=subset(ds.test, max_test, generator))


def _digits() -> Dataset:
    import sklearn
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)  # (1797, 64) float64 in 0..16, (1797,)
    x = standardize(x.reshape(-1, 8, 8), "digits", 16.0)  # (1797, 1, 8, 8)
    y = torch.from_numpy(y).long()
    return Dataset("digits", (x[:-360], y[:-360]), (x[-360:], y[-360:]), 10, (1, 8, 8),
                   normalization("digits", 16) + "; test = the last 360 images",
                   f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})", CLASSES["digits"])


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
    return standardize(x, name, scale), y


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
    return Dataset(name, train, test, 10, tuple(train[0].shape[1:]), normalization(name, 255),
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
    return Dataset("cifar10", train, test, 10, (3, 32, 32), normalization("cifar10", 255), str(folder),
                   CLASSES["cifar10"])

