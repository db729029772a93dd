from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .._util import AdvlabError, unknown_name


class TensorImageDataset(Dataset):
    """A dataset held as two tensors: ``images`` float32 (N, C, H, W) in [0, 1] and ``labels``
    int64 (N,). Indexing gives ``(image, label)``, so it works with any DataLoader."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                 name: str = "custom", split: str = "train"):
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels)
        if images.dim() != 4:
            raise AdvlabError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise AdvlabError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images.to(torch.float32).contiguous()
        self.labels = labels.to(torch.int64).contiguous()
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def channel_stats(self):
        """Per-channel (mean, std) lists of the images, for a model's ``Normalize``."""
        x = self.images.transpose(0, 1).flatten(1)
        return x.mean(1).tolist(), x.std(1).clamp_min(1e-3).tolist()

    @property
    def in_shape(self):
        return tuple(self.images.shape[1:])

    def subset(self, n: int | None = None, seed: int = 0, indices=None) -> "TensorImageDataset":
        """The first ``n`` samples of a seeded permutation (or the given indices)."""
        if indices is None:
            g = torch.Generator().manual_seed(seed)
            perm = torch.randperm(len(self), generator=g)
            indices = perm[: (len(self) if n is None else min(n, len(self)))]
        indices = torch.as_tensor(indices, dtype=torch.long)
        return TensorImageDataset(self.images[indices], self.labels[indices], self.classes, self.name, self.split)

    def __repr__(self) -> str:
        return (f"TensorImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={tuple(self.images.shape[1:])}, classes={self.num_classes})")


def _check_split(split: str, allowed=("train", "test")) -> str:
    if split not in allowed:
        raise AdvlabError(f"split must be one of {', '.join(allowed)}, got {split!r}")
    return split


def _digits(root=None, split="train", download=False, **kw) -> TensorImageDataset:
    from sklearn.datasets import load_digits

    _check_split(split)
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    # fixed, seeded, class-stratified split: 80% train / 20% test
    rng = np.random.RandomState(0)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        rng.shuffle(idx)
        cut = int(round(0.8 * len(idx)))
        train_idx.extend(idx[:cut])
        test_idx.extend(idx[cut:])
    idx = np.array(sorted(train_idx if split == "train" else test_idx))
    return TensorImageDataset(x[idx], y[idx], [str(i) for i in range(10)], "digits", split)


def _idx_dataset(name: str, classes: Sequence[str]):
    def load(root=None, split="train", download=False, **kw) -> TensorImageDataset:
        from .idx import load_idx_pair
        from .download import IDX_FILES, ensure_files

        _check_split(split)
        if root is None:
            raise AdvlabError(f"dataset {name!r} needs root=DIR holding the official IDX files "
                              f"({', '.join(IDX_FILES[name][split])})")
        root = Path(root)
        files = ensure_files(name, root, split, download=download)
        images, labels = load_idx_pair(files[0], files[1])
        return TensorImageDataset(images, labels, classes, name, split)
    return load


MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]

#: name -> (loader, one-line description)
DATASETS: Dict[str, tuple] = {
    "digits": (_digits, "scikit-learn's embedded 8x8 digits (1797 images), seeded 80/20 split; no download"),
    "mnist": (_idx_dataset("mnist", MNIST_CLASSES), "MNIST, official IDX gzip files in root"),
    "fashion-mnist": (_idx_dataset("fashion-mnist", FASHION_CLASSES),
                      "Fashion-MNIST, official IDX gzip files in root"),
}


def register_dataset(name: str, loader: Callable, description: str) -> None:
    DATASETS[name] = (loader, description)


def list_datasets():
    """Names of the registered datasets."""
    return sorted(DATASETS)


def load_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train",
                 download: bool = False, **kwargs) -> TensorImageDataset:
    """Load a registered dataset as a :class:`TensorImageDataset`.

    ``root`` is the folder of the dataset's files (not needed for ``digits``); ``download=True``
    fetches the official files into ``root`` with SHA-256 checks where the dataset has an
    official source."""
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    loader, _ = DATASETS[name]
    return loader(root=root, split=split, download=download, **kwargs)
