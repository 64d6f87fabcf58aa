"""Data sets of the paper: ``load(name)`` → ``Dataset`` (see ``loading``), downloads with checksums,
stratified subsets, mini-batches and the CIFAR augmentation.

common.py     names, the ``Dataset`` record, per-set constants, pixel standardization
readers.py    IDX and CIFAR-10 pickle readers
download.py   mirrors, checksums, fetch()
imagenet.py   ImageNet class-folder tree and its transforms (torch ops, Pillow decoding)
subsets.py    stratified subsets
loading.py    load(), default_data()
minibatches.py  minibatches() of in-memory tensors, crop_flip()
"""

from criticality.paper.data.common import (
    CIFAR_ARCHIVE,
    CIFAR_DIR,
    CIFAR_FILES,
    CLASSES,
    IDX_FILES,
    IMAGE_SUFFIXES,
    MEAN_STD,
    NAMES,
    TORCHVISION_DIR,
    Dataset,
    Split,
    split_size,
)
from criticality.paper.data.download import CHECKSUMS, MIRRORS, fetch
from criticality.paper.data.loading import DEBIAN_FASHION, default_data, load
from criticality.paper.data.minibatches import crop_flip, minibatches
from criticality.paper.data.readers import read_cifar_batch, read_idx
from criticality.paper.data.subsets import stratified_indices, stratified_subset

__all__ = [
    "CHECKSUMS", "CIFAR_ARCHIVE", "CIFAR_DIR", "CIFAR_FILES", "CLASSES", "DEBIAN_FASHION", "IDX_FILES",
    "IMAGE_SUFFIXES", "MEAN_STD", "MIRRORS", "NAMES", "TORCHVISION_DIR", "Dataset", "Split", "crop_flip",
    "default_data", "fetch", "load", "minibatches", "read_cifar_batch", "read_idx", "split_size", "stratified_indices",
    "stratified_subset",
]
