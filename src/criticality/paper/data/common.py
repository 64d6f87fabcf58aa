"""What every data module shares: the data-set names, the ``Dataset`` record, per-set constants
(normalization, classes, file names) and the pixel standardization.

Pixels are scaled to [0, 1], then standardized with the constants in ``MEAN_STD`` (mean/std of each
training set; per channel for colour).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

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
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # torchvision: root/<dir>/raw
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


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


def normalization(name: str, scale: int) -> str:
    mean, std = MEAN_STD[name]
    return f"x/{scale}, then (x-{mean})/{std} per channel (training-set mean/std)"


def standardize(x: np.ndarray, name: str, scale: float) -> Tensor:
    """uint8 (N, H, W) or (N, C, H, W) → float32 (N, C, H, W), (x/scale - mean)/std."""
    t = torch.from_numpy(x.astype(np.float32)).div_(scale)  # astype copies: IDX arrays are read-only views
    t = t.unsqueeze(1) if t.ndim == 3 else t
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in MEAN_STD[name])
    return t.sub_(mean).div_(std)



def split_size(split: Split) -> int:
    """Examples in a split: in-memory ``(x, y)`` or a torch Dataset."""
    return len(split[1]) if isinstance(split, tuple) else len(split)
