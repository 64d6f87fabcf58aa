"""ImageNet as a class-folder tree (``root/{train,val}/<class>/*.JPEG``), decoded per item with Pillow.

Transforms are written with torch ops (no torchvision): training items get a random-resized crop and a
horizontal flip drawn from a per-item generator; test items are resized (shorter side S·256/224) and
centre-cropped to S. Both are normalized with ImageNet's channel mean/std.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from criticality.errors import CriticalityError
from criticality.paper.data.common import IMAGE_SUFFIXES, MEAN_STD, Dataset


class ImageFolder(torch.utils.data.Dataset):
    """``(x (3, S, S) float32 normalized, y int)`` per image of ``samples`` = [(path, class index)].

    Training items get a random-resized crop and a flip drawn from a generator seeded by
    ``seed + epoch * len(self) + index``: reproducible, and the same in any DataLoader worker.
    Call ``set_epoch`` for new crops. Test items: shorter side to S*256/224, centre crop S.
    """

    def __init__(self, samples: list[tuple[Path, int]], classes: tuple[str, ...], *, image_size: int = 224,
                 train: bool = False, seed: int = 0):
        self.samples, self.classes, self.image_size = samples, classes, image_size
        self.train, self.seed, self.epoch = train, seed, 0
        self.targets = torch.tensor([label for _, label in samples], dtype=torch.int64)  # (N,)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def subset(self, indices: Tensor) -> ImageFolder:
        return ImageFolder([self.samples[i] for i in indices.tolist()], self.classes, image_size=self.image_size,
                           train=self.train, seed=self.seed)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        img = read_image(path)  # (3, H, W) in [0, 1]
        if self.train:
            g = torch.Generator().manual_seed(self.seed + self.epoch * len(self) + index)
            img = random_resized_crop(img, self.image_size, g)
            img = img.flip(-1) if torch.rand((), generator=g) < 0.5 else img
        else:
            img = resize_center_crop(img, self.image_size)
        mean, std = (torch.tensor(v).view(-1, 1, 1) for v in MEAN_STD["imagenet"])
        return (img - mean) / std, label


def read_image(path: Path) -> Tensor:
    """Any Pillow-readable image → float32 RGB (3, H, W) in [0, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"))  # (H, W, 3) uint8
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for unknown/truncated files
        raise CriticalityError(f"{path}: not a readable image ({e})") from e
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255)


def _resize(img: Tensor, h: int, w: int) -> Tensor:
    return F.interpolate(img[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


def random_resized_crop(img: Tensor, size: int, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Inception-style crop: area fraction ~ U(scale), log aspect ~ U(log ratio), 10 tries, then
    the central square; resized to (3, size, size)."""
    _, h, w = img.shape
    for _ in range(10):
        u_area, u_ratio = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        area = h * w * (scale[0] + u_area * (scale[1] - scale[0]))
        aspect = math.exp(math.log(ratio[0]) + u_ratio * (math.log(ratio[1]) - math.log(ratio[0])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (), generator=generator))
            return _resize(img[:, top:top + ch, left:left + cw], size, size)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return _resize(img[:, top:top + side, left:left + side], size, size)


def resize_center_crop(img: Tensor, size: int) -> Tensor:
    """Shorter side to round(size * 256/224) (256 for 224), then the central (3, size, size)."""
    _, h, w = img.shape
    short = round(size * 256 / 224)
    nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    img = _resize(img, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[:, top:top + size, left:left + size]


def _scan(split_dir: Path, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    samples = []
    for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
        if class_dir.name not in classes:
            raise CriticalityError(f"{class_dir}: class folder has no counterpart in the training folder")
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        samples += [(p, classes.index(class_dir.name)) for p in files]
    if not samples:
        raise CriticalityError(f"{split_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in class folders")
    return samples


def load_imagenet(root: Path | None, image_size: int, generator: torch.Generator | None) -> Dataset:
    train_dir, val_dir = (root / "train", root / "val") if root is not None else (None, None)
    if root is None or not train_dir.is_dir() or not val_dir.is_dir():
        raise CriticalityError(f"imagenet: expected class folders DIR/train/<class>/*.JPEG and DIR/val/<class>/"
                               f"*.JPEG under --data-root DIR (got {root}); arrange the validation images into "
                               f"class folders too")
    classes = tuple(sorted(d.name for d in train_dir.iterdir() if d.is_dir()))
    seed = int(torch.randint(0, 2**31, (), generator=generator)) if generator is not None else 0
    train = ImageFolder(_scan(train_dir, classes), classes, image_size=image_size, train=True, seed=seed)
    test = ImageFolder(_scan(val_dir, classes), classes, image_size=image_size)
    mean, std = MEAN_STD["imagenet"]
    return Dataset("imagenet", train, test, len(classes), (3, image_size, image_size),
                   f"x/255, then (x-{mean})/{std} per channel; train: random-resized crop {image_size} + flip; "
                   f"test: resize {round(image_size * 256 / 224)} + centre crop {image_size}", str(root), classes)
