"""Writers of small data files in the real formats (IDX, CIFAR-10 pickles, image trees) and a localhost
HTTP server, shared by the tests. Independent of the readers under test; nothing here runs on its own.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import pickle
import struct
import threading
from pathlib import Path

import numpy as np

from criticality.paper import data


def write_idx(path: Path, array: np.ndarray) -> Path:
    """IDX as specified by LeCun: 0x0000, dtype 0x08, ndim, big-endian uint32 dims, then the bytes."""
    raw = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_mnist(folder: Path, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (7, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(7) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28)),
              "t10k-labels-idx1-ubyte": np.array([9, 0, 5])}
    for stem, array in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), array)
    return arrays


def write_cifar(folder: Path, n: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Six batches shaped like the real ones: dicts with bytes keys, uint8 (n, 3072) data, list labels."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate(data.CIFAR_FILES):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        batch = {b"batch_label": f"batch {i}".encode(), b"labels": y, b"data": x,
                 b"filenames": [f"img{j}.png".encode() for j in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
        batches[name] = (x, y)
    return batches


def write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


@contextlib.contextmanager
def serve(directory: Path):
    """A localhost HTTP server for ``directory``, in a thread; stops on exit or after 60 s at most."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    watchdog = threading.Timer(60, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)


def write_tree(root: Path) -> None:
    """3 classes; train: 2 images each, val: 1 each; 40x30 px, one flat colour per class."""
    for c, colour in enumerate(([255, 0, 0], [0, 255, 0], [0, 0, 255])):
        rgb = np.broadcast_to(np.array(colour), (30, 40, 3))
        for i in range(2):
            write_png(root / "train" / f"class{c}" / f"img{i}.png", rgb)
        write_png(root / "val" / f"class{c}" / "img.png", rgb)
