"""SVHN (cropped digits) from the official MATLAB files ``train_32x32.mat``, ``test_32x32.mat``
and ``extra_32x32.mat``: ``X`` is (32, 32, 3, N) uint8, ``y`` is (N, 1) with 1..10, where 10 is
the digit 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .._util import AdvlabError

CLASSES = [str(i) for i in range(10)]


def read_svhn_mat(path: str | Path):
    """Images (N, 3, H, W) float32 in [0, 1] and labels int64 in 0..9 from an SVHN ``.mat`` file."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise AdvlabError(f"SVHN file not found: {path}")
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except NotImplementedError as e:  # MATLAB v7.3 (HDF5) files
        raise AdvlabError(f"{path}: unsupported MATLAB file version ({e}); the official files are v5") from None
    except Exception as e:  # scipy raises ValueError, MatReadError, OSError, ... on corrupt files
        raise AdvlabError(f"{path} is not a readable SVHN .mat file: {type(e).__name__}: {e}") from None
    if "X" not in mat or "y" not in mat:
        raise AdvlabError(f"{path}: expected variables 'X' and 'y', found {', '.join(sorted(mat)) or 'none'}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.ndim != 4 or x.shape[2] != 3:
        raise AdvlabError(f"{path}: 'X' must have shape (H, W, 3, N), got {x.shape}")
    if x.dtype != np.uint8:
        raise AdvlabError(f"{path}: 'X' must be uint8, got {x.dtype}")
    y = y.reshape(-1)
    if y.shape[0] != x.shape[3]:
        raise AdvlabError(f"{path} holds {x.shape[3]} images but {y.shape[0]} labels")
    if y.size and (y.min() < 1 or y.max() > 10 or not np.all(y == np.round(y))):
        raise AdvlabError(f"{path}: labels must be integers 1..10 (10 is the digit 0), "
                          f"found range [{y.min()}, {y.max()}]")
    labels = torch.from_numpy((y.astype(np.int64) % 10))
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))).to(torch.float32).div_(255.0)
    return images, labels


def load_svhn(root=None, split: str = "train", download: bool = False, mirrors=None, **kwargs):
    """SVHN cropped digits as a TensorImageDataset of (N, 3, 32, 32) images; split is
    ``train``, ``test`` or ``extra``."""
    from .tensors import TensorImageDataset, check_split, no_extra_options
    from .download import default_root, ensure_files

    check_split(split, ("train", "test", "extra"))
    no_extra_options("svhn", kwargs)
    root = Path(root) if root is not None else default_root("svhn")
    (path,) = ensure_files("svhn", root, split, download=download, mirrors=mirrors)
    images, labels = read_svhn_mat(path)
    return TensorImageDataset(images, labels, CLASSES, "svhn", split)
