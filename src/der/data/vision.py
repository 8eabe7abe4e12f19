"""Image datasets: sklearn digits (bundled), CIFAR-10/100 (python pickle format), ImageNet-style folders.

All return float tensors ``(C, H, W)`` normalized per channel, and int64 labels. No downloads: CIFAR and
ImageNet read the standard on-disk layouts and raise ``FileNotFoundError`` naming what they expected.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DigitsData", "digits_dataset", "cifar_dataset", "imagenet_folder", "ImageFolder"]


@dataclass
class DigitsData:
    """Train/test split of the upsampled digits plus per-patch foreground masks.

    ``train``/``test``: ``TensorDataset(images (n,1,S,S), labels (n,))``; ``test_fg``: bool ``(n_test, P)``
    with P = (S/patch)² — a patch is foreground when its mean original intensity exceeds ``fg_threshold``.
    ``test_raw``: the un-normalized images in [0, 1] (corruptions act on these).
    """

    train: TensorDataset
    test: TensorDataset
    test_raw: torch.Tensor
    test_fg: torch.Tensor
    mean: float
    std: float
    image_size: int
    patch_size: int

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] to the normalized input space the models are trained on."""
        return (raw - self.mean) / self.std


def digits_dataset(image_size: int = 64, patch_size: int = 4, test_fraction: float = 0.25, seed: int = 0,
                   fg_threshold: float = 0.25, limit: int | None = None) -> DigitsData:
    """sklearn ``load_digits`` (1797 images, 8×8, 16 gray levels) upsampled bilinearly to ``image_size``.

    Defaults give 64/4 = 16×16 = 256 patches per image. The split is stratified by class and fixed by
    ``seed``. ``limit`` keeps the first ``limit`` images of each split (tests).
    """
    if image_size % patch_size:
        raise ValueError(f"image_size must be a multiple of patch_size, got {image_size} and {patch_size}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * test_fraction))].tolist())
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True
    tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    rng.shuffle(tr)
    if limit is not None:
        tr, te = tr[:limit], te[:limit]
    up = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    mean, std = float(up[tr].mean()), float(up[tr].std())
    fg = F.avg_pool2d(up[te], patch_size).flatten(1) > fg_threshold
    norm = (up - mean) / std
    return DigitsData(
        train=TensorDataset(norm[tr], y[tr]), test=TensorDataset(norm[te], y[te]), test_raw=up[te],
        test_fg=fg, mean=mean, std=std, image_size=image_size, patch_size=patch_size,
    )


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"expected CIFAR python-format file {path} (from cifar-*-python.tar.gz)")
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def cifar_dataset(root: str | Path, split: str = "train", num_classes: int = 10) -> TensorDataset:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``) python pickles.

    Returns ``TensorDataset(images (n,3,32,32) normalized, labels)``. Note: pickle files execute code when
    loaded; only point this at the official archives.
    """
    root = Path(root)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if num_classes == 10:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        key = b"labels"
    elif num_classes == 100:
        files, key = [split], b"fine_labels"
    else:
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    xs, ys = [], []
    for name in files:
        d = _unpickle(root / name)
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[key], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs)).float() / 255.0
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return TensorDataset((x - mean) / std, torch.from_numpy(np.concatenate(ys)))


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_IMG_EXT = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


class ImageFolder(Dataset):
    """``root/<class>/<image>`` folder dataset (ImageNet layout): resize shorter side, center-crop, normalize."""

    def __init__(self, root: str | Path, image_size: int = 224, resize: int | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"expected an image folder root/<class>/<image>, {root} does not exist")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"no class sub-folders in {root}")
        self.samples = [
            (p, i) for i, c in enumerate(self.classes) for p in sorted((root / c).iterdir())
            if p.suffix.lower() in _IMG_EXT
        ]
        if not self.samples:
            raise FileNotFoundError(f"no images with extensions {_IMG_EXT} under {root}")
        self.image_size, self.resize = image_size, resize or int(round(image_size / 0.875))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = self.resize / min(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
            im = im.crop((left, top, left + self.image_size, top + self.image_size))
            x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        mean = torch.tensor(_IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(_IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std, label


def imagenet_folder(root: str | Path, split: str = "train", image_size: int = 224) -> ImageFolder:
    """ImageNet in the usual ``root/{train,val}/<wnid>/*.JPEG`` layout."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return ImageFolder(Path(root) / split, image_size=image_size)
