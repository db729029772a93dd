"""Reader for the IDX format of MNIST and Fashion-MNIST (optionally gzip-compressed)."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from .._util import AdvlabError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw, told apart by content) into a numpy array,
    checking the magic number and that the size matches the header.

    ``path``: the file. Raises ``AdvlabError`` naming it when it is truncated or its header is wrong."""
    path = Path(path)
    if not path.is_file():
        raise AdvlabError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise AdvlabError(f"corrupt gzip file {path}: {e}") from None
    elif path.suffix == ".gz":
        raise AdvlabError(f"corrupt gzip file {path}: no gzip header (first bytes {raw[:4].hex() or 'empty'})")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise AdvlabError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype = np.dtype(_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise AdvlabError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise AdvlabError(f"{path}: truncated or oversized IDX file: {len(raw)} bytes, expected {expected} "
                          f"for shape {tuple(dims)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def load_idx_pair(images_path, labels_path):
    """Images (N, 1, H, W) float32 in [0, 1] and labels int64 from an IDX image/label pair."""
    imgs = read_idx(images_path)
    labels = read_idx(labels_path)
    if imgs.ndim != 3:
        raise AdvlabError(f"{images_path}: expected a 3-d image array (N, H, W), got shape {imgs.shape}")
    if labels.ndim != 1:
        raise AdvlabError(f"{labels_path}: expected a 1-d label array, got shape {labels.shape}")
    if imgs.shape[0] != labels.shape[0]:
        raise AdvlabError(f"{images_path} holds {imgs.shape[0]} images but {labels_path} holds {labels.shape[0]} labels")
    x = torch.from_numpy(imgs.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y
