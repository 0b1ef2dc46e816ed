"""Data sets for the course, offline first.

Taught in lesson 00_setup.

* Offline, shipped inside packages the course depends on: scikit-learn's handwritten ``digits``
  (1,797 real 8x8 images), scikit-image's ``faces`` (the 100 face images of ``lfw_subset``, 25x25) and
  ``photo_patches`` cut from its colour photographs; and 2-D toy distributions (:func:`toy_2d`).
* Online, for real training on a GPU or Colab: ``mnist``, ``fashion_mnist`` and ``cifar10`` through
  torchvision, downloaded into the repository's ``data/`` folder. Without a network they fail at once
  with :class:`DatasetUnavailable`, which names the offline alternatives.

Images are float32 tensors of shape ``(N, C, H, W)`` scaled to [-1, 1]; labels are int64 ``(N,)``.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import shapes

OFFLINE_IMAGE_SETS = ("digits", "faces", "photo_patches", "photos", "shapes")
ONLINE_IMAGE_SETS = ("mnist", "fashion_mnist", "cifar10")
TOY_2D = ("moons", "swiss_roll", "eight_gaussians", "circles", "checkerboard")
SPLITS = ("train", "test", "all")


class DatasetUnavailable(RuntimeError):
    """A data set could not be loaded (typically: no network for a download)."""


@dataclass
class ImageData:
    """Images ``(N, C, H, W)`` in [-1, 1], labels ``(N,)`` and the class names. Lesson: 00_setup."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    classes: List[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    @property
    def shape(self) -> tuple:
        """The shape of one image, ``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        return f"ImageData({self.name!r}, {len(self)} images of shape {self.shape}, {len(self.classes)} classes)"


def data_root() -> Path:
    """Where downloads go: ``$DIFFUSION_COURSE_DATA``, else the repository's ``data/`` folder when the
    package runs from a checkout, else ``./data``. Lesson: 00_setup."""
    env = os.environ.get("DIFFUSION_COURSE_DATA")
    if env:
        return Path(env)
    repo_data = Path(__file__).resolve().parents[1] / "data"
    if repo_data.is_dir():
        return repo_data
    return Path.cwd() / "data"


def check_dataset_name(name: str) -> None:
    """A clear ValueError unless ``name`` is a data set :func:`get_dataset` knows (``folder:PATH`` included).
    Lesson: 00_setup."""
    if name in OFFLINE_IMAGE_SETS + ONLINE_IMAGE_SETS or (isinstance(name, str) and name.startswith("folder:")):
        return
    hint = " (2-D toy sets come from toy_2d)" if name in TOY_2D else ""
    raise ValueError(f"unknown data set {name!r}{hint}; valid names: {', '.join(OFFLINE_IMAGE_SETS + ONLINE_IMAGE_SETS)}"
                     f", or folder:PATH for a folder of your own images")


def to_unit_range(images: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Map values from [lo, hi] to [-1, 1] (float32). Lesson: 00_setup."""
    return ((images.float() - lo) / (hi - lo) * 2.0 - 1.0).clamp(-1.0, 1.0)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` images to ``size x size`` (bilinear, antialiased when shrinking), keeping
    the range [-1, 1]. Lesson: 00_setup."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"image_size must be a positive int, got {size!r}")
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    shrink = size < max(images.shape[-2:])
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return out.clamp(-1.0, 1.0)


def _split(n: int, split: str, test_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    if split == "test":
        return np.sort(order[:n_test])
    if split == "train":
        return np.sort(order[n_test:])
    return np.arange(n)


def digits(image_size: int = 8, split: str = "train") -> ImageData:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), resized to ``image_size`` and scaled
    to [-1, 1]; a fixed 80/20 train/test split. Offline. Lesson: 00_setup."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = _split(len(d.images), split)
    x = torch.from_numpy(d.images[idx]).float().unsqueeze(1)  # (N, 1, 8, 8), values 0..16
    x = resize(to_unit_range(x, 0.0, 16.0), image_size)
    return ImageData(x, torch.from_numpy(d.target[idx]).long(), "digits", [str(i) for i in range(10)])


def faces(image_size: int = 24, split: str = "train") -> ImageData:
    """The 100 real face photographs (25x25, grey) of scikit-image's ``lfw_subset``, resized to
    ``image_size``; a fixed 80/20 split. Offline. Lesson: 00_setup."""
    from skimage.data import lfw_subset

    imgs = lfw_subset()[:100]  # the first 100 are faces, the last 100 are not
    idx = _split(len(imgs), split)
    x = torch.from_numpy(np.asarray(imgs[idx], dtype=np.float32)).unsqueeze(1)
    x = resize(to_unit_range(x, 0.0, 1.0), image_size)
    return ImageData(x, torch.zeros(len(idx), dtype=torch.long), "faces", ["face"])


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo_patches(image_size: int = 64, n: int = 256, split: str = "train", seed: int = 0) -> ImageData:
    """``n`` random RGB patches of ``image_size`` pixels cut from scikit-image's colour photographs
    (astronaut, chelsea, coffee, rocket). ``train`` cuts from the left 80% of each photograph and ``test``
    from the right 20%, so the two never overlap. Offline. Lesson: 00_setup."""
    import skimage.data

    if split not in ("train", "test"):
        raise ValueError(f"photo_patches has splits 'train' and 'test', got {split!r}")
    rng = np.random.default_rng(seed + (0 if split == "train" else 1))
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    patches, labels = [], []
    for k in range(n):
        j = int(rng.integers(len(photos)))
        img = photos[j]
        h, w = img.shape[:2]
        cut = int(w * 0.8)
        x_lo, x_hi = (0, cut - image_size) if split == "train" else (cut, w - image_size)
        if image_size > h or x_hi < x_lo:
            raise ValueError(f"image_size {image_size} is too large for the {split} part of {PHOTOS[j]}")
        y0 = int(rng.integers(0, h - image_size + 1))
        x0 = int(rng.integers(x_lo, x_hi + 1))
        patches.append(img[y0:y0 + image_size, x0:x0 + image_size, :3])
        labels.append(j)
    x = torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2).float()
    return ImageData(to_unit_range(x, 0.0, 255.0), torch.tensor(labels), "photo_patches", list(PHOTOS))


def photos(image_size: int = 32, n: int = 4096, split: str = "train", seed: int = 0) -> ImageData:
    """``n`` RGB patches for super-resolution (lesson 09_stablesr): squares of ``2 * image_size`` pixels cut
    as in :func:`photo_patches` (train from the left 80% of each photograph, test from the right 20%) and
    shrunk by 2 (antialiased), so that each patch holds the detail of a photograph at half its size rather
    than a smooth crop at full size. Offline. Lesson: 09_stablesr."""
    crops = photo_patches(2 * image_size, n, split, seed)
    return ImageData(resize(crops.images, image_size), crops.labels, "photos", crops.classes)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def image_folder(root: str, image_size: int = 64, n: int = 4096, split: str = "train", seed: int = 0) -> ImageData:
    """``n`` random RGB crops of ``image_size`` pixels from the images in the folder ``root`` (and its
    subfolders), for super-resolution on photographs of your own, such as DIV2K's high-resolution set. The
    files are sorted by name; the last 20% are the ``test`` split, so train and test come from different
    images. Images smaller than the crop are skipped. Offline. Lesson: 09_stablesr."""
    from PIL import Image

    if split not in ("train", "test"):
        raise ValueError(f"an image folder has splits 'train' and 'test', got {split!r}")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise ValueError(f"no image folder {str(folder)!r}: give a folder of .png or .jpg images, e.g. "
                         f"'folder:data/DIV2K_train_HR'")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    cut = max(1, int(round(len(files) * 0.8))) if len(files) > 1 else len(files)
    files = files[:cut] if split == "train" else files[cut:]
    images = [im for im in (np.asarray(Image.open(f).convert("RGB")) for f in files)
              if min(im.shape[:2]) >= image_size]
    if not images:
        raise ValueError(f"the {split} split of {str(folder)!r} has no image of at least {image_size}x{image_size} "
                         f"pixels ({len(files)} files); it takes the last 20% of the sorted files as test images")
    rng = np.random.default_rng(seed + (0 if split == "train" else 1))
    crops, labels = [], []
    for _ in range(n):
        j = int(rng.integers(len(images)))
        h, w = images[j].shape[:2]
        y0, x0 = int(rng.integers(0, h - image_size + 1)), int(rng.integers(0, w - image_size + 1))
        crops.append(images[j][y0:y0 + image_size, x0:x0 + image_size])
        labels.append(j)
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float()
    return ImageData(to_unit_range(x, 0.0, 255.0), torch.tensor(labels), f"folder:{folder}", ["image"])


def _torchvision_set(name: str, image_size: Optional[int], split: str, download: bool) -> ImageData:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    if split not in ("train", "test"):
        raise ValueError(f"{name} has splits 'train' and 'test', got {split!r}")
    root = data_root()
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        ds = cls(root=str(root), train=(split == "train"), download=download)
    except Exception as e:  # no network, a mirror that refuses, a corrupt file
        raise DatasetUnavailable(
            f"could not load {name!r} into {root} ({type(e).__name__}: {e}). Downloads need internet "
            f"(Colab has it). Offline, use one of {', '.join(OFFLINE_IMAGE_SETS)} instead, e.g. "
            f"get_dataset('digits', image_size=...).") from e
    finally:
        socket.setdefaulttimeout(old_timeout)
    data = torch.as_tensor(np.asarray(ds.data))
    x = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    x = to_unit_range(x, 0.0, 255.0)
    if image_size is not None:
        x = resize(x, image_size)
    return ImageData(x, torch.as_tensor(np.asarray(ds.targets)).long(), name, list(ds.classes))


def get_dataset(name: str, image_size: Optional[int] = None, split: str = "train",
                download: bool = True, **kwargs) -> ImageData:
    """An image data set by name, resized to ``image_size`` (its native size when None).

    Offline: ``digits`` (native 8), ``faces`` (native 25), ``photo_patches`` (default 64), ``photos`` (default
    32, patches for super-resolution), ``folder:PATH`` (crops of the images in a folder of your own), ``shapes``
    (default 32, a :class:`shapes.ShapesData` with captions, layout and masks, splits train/test/holdout);
    online: ``mnist`` and ``fashion_mnist`` (28), ``cifar10`` (32). Lesson: 00_setup.
    """
    if name == "digits":
        return digits(image_size or 8, split)
    if name == "faces":
        return faces(image_size or 25, split)
    if name == "photo_patches":
        return photo_patches(image_size or 64, split=split, **kwargs)
    if name == "photos":
        return photos(image_size or 32, split=split, **kwargs)
    if name.startswith("folder:"):  # an image folder of one's own (lesson 09), e.g. folder:data/DIV2K_train_HR
        return image_folder(name[len("folder:"):], image_size or 64, split=split, **kwargs)
    if name == "shapes":  # captioned coloured shapes (lesson 07); splits train, test, holdout
        return shapes.shapes_dataset(image_size or 32, split, **kwargs)
    if name in ONLINE_IMAGE_SETS:
        return _torchvision_set(name, image_size, split, download)
    check_dataset_name(name)
    raise AssertionError(f"data set {name!r} is valid but has no loader")


# ----------------------------------------------------------------------------------------------
# 2-D toy distributions (lesson 03)
# ----------------------------------------------------------------------------------------------

def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n, noise=0.05, random_state=int(rng.integers(2**31)))
    return (x - np.array([0.5, 0.25])) * np.array([1.0, 1.6])


def _swiss_roll(n: int, rng: np.random.Generator) -> np.ndarray:
    theta = 1.5 * np.pi * (1 + 2 * rng.random(n))
    x = np.stack([theta * np.cos(theta), theta * np.sin(theta)], 1) / 7.5
    return x + 0.03 * rng.standard_normal((n, 2))


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    angles = 2 * np.pi * rng.integers(0, 8, n) / 8
    centres = 1.5 * np.stack([np.cos(angles), np.sin(angles)], 1)
    return centres + 0.1 * rng.standard_normal((n, 2))


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    r = np.where(rng.random(n) < 0.5, 0.6, 1.4)
    a = 2 * np.pi * rng.random(n)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1) + 0.04 * rng.standard_normal((n, 2))


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2.0
    x2 = x2 + (np.floor(x1) % 2)
    return np.stack([x1, x2], 1) * 0.9


_TOY: Dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "moons": _moons, "swiss_roll": _swiss_roll, "eight_gaussians": _eight_gaussians,
    "circles": _circles, "checkerboard": _checkerboard,
}


def toy_2d(name: str = "moons", n: int = 2000, seed: int = 0) -> torch.Tensor:
    """``n`` points ``(n, 2)`` float32 from a 2-D toy distribution of roughly unit scale.

    Names: moons, swiss_roll, eight_gaussians, circles, checkerboard. Lesson: 03_training_and_sampling.
    """
    if name not in _TOY:
        raise ValueError(f"unknown toy distribution {name!r}; valid names: {', '.join(TOY_2D)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return torch.from_numpy(_TOY[name](n, np.random.default_rng(seed))).float()


def random_batches(x: torch.Tensor, batch_size: int, *others: torch.Tensor,
                   generator: Optional[torch.Generator] = None) -> Iterator:
    """An endless stream of random mini-batches of ``x`` (sampling with replacement across batches,
    without within one), the x_0 ~ q(x_0) of Algorithm 1. Extra tensors are indexed alike.
    Lesson: 03_training_and_sampling."""
    n = x.shape[0]
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    while True:
        idx = torch.randperm(n, generator=generator)[: min(batch_size, n)]
        if others:
            yield (x[idx],) + tuple(o[idx] for o in others)
        else:
            yield x[idx]
