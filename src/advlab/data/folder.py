"""Image folders, one subfolder per class: ``root/<class>/*.png`` (or jpg, bmp, gif, tif, webp).

If ``root`` has both ``train/`` and ``test/`` subfolders, each holds class folders and gives that
split; otherwise the images are split per class with a seeded shuffle (``test_fraction`` of each
class goes to ``test``). Classes are the sorted folder names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._util import AdvlabError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _class_files(root: Path) -> Dict[str, List[Path]]:
    if not root.is_dir():
        raise AdvlabError(f"image folder not found: {root}")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise AdvlabError(f"image folder {root} has no class subfolders; expected root/<class>/<image files>")
    out = {}
    for c in classes:
        files = sorted(p for p in c.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise AdvlabError(f"class folder {c} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
        out[c.name] = files
    return out


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), both sorted: each class is shuffled with ``seed`` and
    ``round(test_fraction * n)`` of its n samples go to test (at least one each side when n >= 2)."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        else:
            n_test = 0
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def _read_image(path: Path, mode: str, size: Optional[Tuple[int, int]]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise AdvlabError(f"unreadable image {path}: {e}") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _check_size(size) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size, size)
    try:
        vals = tuple(size)
    except TypeError:
        vals = ()
    if len(vals) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                                 for v in vals):
        raise AdvlabError(f"size must be (height, width) with positive integers, or one integer, got {size!r}")
    return int(vals[0]), int(vals[1])


def read_images(files: Sequence[Path], size=None, grayscale: bool = False) -> torch.Tensor:
    """Images (N, C, H, W) float32 in [0, 1] from image files (C = 1 if ``grayscale`` else 3).
    Without ``size`` all images must have the same height and width."""
    size = _check_size(size)
    mode = "L" if grayscale else "RGB"
    arrays = []
    for f in files:
        a = _read_image(Path(f), mode, size)
        if arrays and a.shape != arrays[0].shape:
            raise AdvlabError(f"image {f} is {a.shape[1]}x{a.shape[0]} but {files[0]} is "
                              f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; pass size=(H, W) to resize all images")
        arrays.append(a)
    c = 1 if grayscale else 3
    if not arrays:
        h, w = size if size is not None else (0, 0)
        return torch.zeros(0, c, h, w)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x.to(torch.float32).div_(255.0)


def load_folder(root=None, split: str = "train", download: bool = False, size=None, grayscale: bool = False,
                test_fraction: float = 0.2, seed: int = 0, **kwargs):
    """A class-per-subfolder image folder as a TensorImageDataset.

    ``split``: ``train``/``test`` (from ``root/train`` and ``root/test`` if both exist, else a
    seeded stratified split with ``test_fraction`` and ``seed``) or ``all``. ``size=(H, W)``
    resizes every image (bilinear); ``grayscale=True`` gives one channel, else RGB."""
    from .tensors import TensorImageDataset, check_split, no_extra_options

    check_split(split, ("train", "test", "all"))
    no_extra_options("folder", kwargs)
    if download:
        raise AdvlabError("the folder dataset is local: download=True does not apply")
    if root is None:
        raise AdvlabError("dataset 'folder' needs root=DIR holding one subfolder of images per class")
    try:
        fraction_ok = not isinstance(test_fraction, (bool, str)) and 0.0 < float(test_fraction) < 1.0
    except (TypeError, ValueError):
        fraction_ok = False
    if not fraction_ok:
        raise AdvlabError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise AdvlabError(f"seed must be an integer, got {seed!r}")
    _check_size(size)  # before any file is read
    root = Path(root)
    presplit = (root / "train").is_dir() and (root / "test").is_dir()
    if presplit:
        train_files = _class_files(root / "train")
        classes = sorted(train_files)
        if split == "train":
            per_class = train_files
        else:
            test_files = _class_files(root / "test")
            extra = sorted(set(test_files) - set(classes))
            if extra:
                raise AdvlabError(f"{root / 'test'} has classes not in {root / 'train'}: {', '.join(extra)}")
            per_class = test_files if split == "test" else {
                c: train_files.get(c, []) + test_files.get(c, []) for c in classes}
    else:
        per_class = _class_files(root)
        classes = sorted(per_class)
    files = [f for c in sorted(per_class) for f in per_class[c]]
    labels = np.array([classes.index(c) for c in sorted(per_class) for _ in per_class[c]], dtype=np.int64)
    if not presplit and split != "all":
        train_idx, test_idx = stratified_split(labels, float(test_fraction), int(seed))
        keep = train_idx if split == "train" else test_idx
        files, labels = [files[i] for i in keep], labels[keep]
    images = read_images(files, size=size, grayscale=grayscale)
    return TensorImageDataset(images, torch.from_numpy(labels), classes, "folder", split)


def folder_image_shape(root) -> Tuple[int, int, int]:
    """(C, H, W) of the first image of a class-per-subfolder folder (of ``root/test`` when the
    folder is pre-split): C is 1 for a grayscale image, else 3. Reads one image header."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        root = root / "test"
    files = _class_files(root)
    first = files[sorted(files)[0]][0]
    try:
        with Image.open(first) as img:
            mode, (w, h) = img.mode, img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise AdvlabError(f"unreadable image {first}: {e}") from None
    return (1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3), int(h), int(w)
