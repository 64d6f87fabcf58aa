"""Downloads of mnist / fashion-mnist / cifar10 from ``MIRRORS`` into torchvision's layout, checked
against ``CHECKSUMS``; a mismatch leaves no file behind."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from criticality.errors import CriticalityError
from criticality.infra.files import atomic_path
from criticality.paper.data.common import CIFAR_ARCHIVE, CIFAR_DIR, TORCHVISION_DIR

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

