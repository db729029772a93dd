"""The in-memory dataset every loader returns (:class:`TensorImageDataset`) and the argument
checks the loaders share; below :mod:`advlab.data.core` and the format modules, so that the
registry in ``core`` can load ``cifar``/``svhn``/``folder`` without an import circle."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

from .._util import AdvlabError, check_positive_int


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
        """The images' (C, H, W)."""
        return tuple(self.images.shape[1:])

    def subset(self, n: int | None = None, seed: int = 0, indices=None) -> "TensorImageDataset":
        """The first ``n`` samples of a seeded permutation (or the given indices)."""
        if indices is None:
            if n is not None:
                n = check_positive_int(n, "n")
            g = torch.Generator().manual_seed(seed)
            perm = torch.randperm(len(self), generator=g)
            indices = perm[: (len(self) if n is None else min(n, len(self)))]
        try:
            indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise AdvlabError(f"indices must be integer positions, got {type(indices).__name__}") from None
        if indices.numel() and (int(indices.min()) < -len(self) or int(indices.max()) >= len(self)):
            raise AdvlabError(f"indices must lie in [0, {len(self) - 1}] for a dataset of {len(self)} samples, got "
                              f"range [{int(indices.min())}, {int(indices.max())}]")
        return TensorImageDataset(self.images[indices], self.labels[indices], self.classes, self.name, self.split)

    def __repr__(self) -> str:
        return (f"TensorImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={tuple(self.images.shape[1:])}, classes={self.num_classes})")


def check_split(split: str, allowed=("train", "test")) -> str:
    if split not in allowed:
        raise AdvlabError(f"split must be one of {', '.join(allowed)}, got {split!r}")
    return split


def no_extra_options(name: str, kwargs: dict) -> None:
    if kwargs:
        raise AdvlabError(f"dataset {name!r} takes no option(s) {', '.join(sorted(kwargs))}")
