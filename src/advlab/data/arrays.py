"""Data you already have as numpy arrays: a ``.npz`` file (``x``/``y`` or ``images``/``labels``)
or a pair of ``.npy`` files, as a :class:`~advlab.data.TensorImageDataset`.

>>> ds, notes = load_arrays("test.npz")                       # x: uint8 NHWC, y: int labels
>>> ds, notes = load_arrays("x.npy", labels="y.npy", layout="nchw")

Images may be uint8 (0-255, scaled to [0, 1]) or float in [0, 1]; NHWC or NCHW (told from
the shape: the channel axis is the one of size 1 or 3; ``layout=`` settles the ambiguous
case, ``channels=`` the model's input channels help it), or (N, H, W) for one channel. What
was detected is returned as notes for the log. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from .._util import AdvlabError
from .tensors import TensorImageDataset

X_KEYS = ("x", "images", "X", "x_test", "data", "inputs")
Y_KEYS = ("y", "labels", "Y", "y_test", "targets", "label")


def _read(path: Path, what: str):
    if not path.is_file():
        raise AdvlabError(f"{what} not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head[:4] != b"PK\x03\x04" and head != b"\x93NUMPY":
        raise AdvlabError(f"{what} {path} is not a numpy .npz or .npy file")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise AdvlabError(f"{what} {path} holds Python objects (a pickled array); save plain numeric arrays "
                              "(np.savez(path, x=images, y=labels))") from None
        raise AdvlabError(f"cannot read {what} {path}: corrupt ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise AdvlabError(f"cannot read {what} {path}: corrupt ({type(e).__name__}: {e})") from None


def _pick(npz, keys, given: Optional[str], role: str, path: Path) -> np.ndarray:
    names = list(npz.files)
    if given is not None:
        if given not in names:
            raise AdvlabError(f"{path} has no array {given!r} ({role}); it holds: {', '.join(names) or 'nothing'}")
        key = given
    else:
        key = next((k for k in keys if k in names), None)
        if key is None:
            raise AdvlabError(f"{path} has no {role} array: expected one of {', '.join(keys[:2])} (or "
                              f"{', '.join(keys[2:])}); it holds: {', '.join(names) or 'nothing'} (name them with "
                              f"--dataset-option {'x_key' if role == 'images' else 'y_key'}=NAME)")
    try:
        return npz[key]
    except ValueError as e:
        raise AdvlabError(f"{path}: array {key!r} holds Python objects ({e}); save plain numeric arrays") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise AdvlabError(f"cannot read {path}: corrupt array {key!r} ({type(e).__name__})") from None


def _layout(x: np.ndarray, layout: Optional[str], channels: Optional[int], path: Path, notes: List[str]) -> np.ndarray:
    if x.ndim == 3:
        notes.append(f"{path.name}: images of shape {x.shape} read as (N, H, W), one channel")
        return x[:, None]
    if x.ndim != 4:
        raise AdvlabError(f"images in {path} must have shape (N, C, H, W), (N, H, W, C) or (N, H, W), got {x.shape}")
    if layout is not None:
        layout = str(layout).lower()
        if layout not in ("nchw", "nhwc"):
            raise AdvlabError(f"layout must be nchw or nhwc, got {layout!r}")
    else:
        first, last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
        if channels is not None and (first or last) and x.shape[1] != x.shape[3]:
            first, last = x.shape[1] == channels, x.shape[3] == channels
        if first and not last:
            layout = "nchw"
        elif last and not first:
            layout = "nhwc"
        elif first and last:
            layout = "nchw"
            notes.append(f"{path.name}: shape {x.shape} could be NCHW or NHWC; read as NCHW (pass --dataset-option "
                         "layout=nhwc for the other)")
        else:
            raise AdvlabError(f"cannot tell the channel axis of images of shape {x.shape} in {path}: neither axis 1 nor "
                              "axis 3 has 1 or 3 channels (pass --dataset-option layout=nchw or layout=nhwc)")
    if layout == "nhwc":
        notes.append(f"{path.name}: images {x.shape} are NHWC, transposed to NCHW")
        return x.transpose(0, 3, 1, 2)
    notes.append(f"{path.name}: images {x.shape} are NCHW")
    return x


def _pixels(x: np.ndarray, scale, path: Path, notes: List[str]) -> torch.Tensor:
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise AdvlabError(f"images in {path} must be uint8 (0-255) or float in [0, 1], got dtype {x.dtype}")
    if scale is not None:
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            scale = float("nan")
        if not 0 < scale < float("inf"):
            raise AdvlabError(f"scale must be a number > 0 (the value of a white pixel), got {scale!r}")
    if x.size == 0:
        raise AdvlabError(f"{path} holds no images")
    t = torch.from_numpy(np.ascontiguousarray(x))
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(t.min()), int(t.max())
        top = scale or 255.0
        if lo < 0 or hi > top:
            raise AdvlabError(f"integer images in {path} must lie in [0, {top:g}], got range [{lo}, {hi}]")
        notes.append(f"{path.name}: {x.dtype} pixels 0-{top:g} scaled to [0, 1]")
        return t.to(torch.float32).div_(top)
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise AdvlabError(f"images in {path} contain NaN or infinite values")
    if scale is not None:
        t = t / scale
        notes.append(f"{path.name}: float pixels divided by {scale:g}")
    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:
        hint = " (they look like 0-255 values: pass --dataset-option scale=255, or save them as uint8)" \
            if hi <= 255.0 and lo >= 0.0 else " (put mean/std normalisation in the model: --mean/--std)"
        raise AdvlabError(f"float images in {path} must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]{hint}")
    return t


def _labels(y: np.ndarray, n: int, path: Path, notes: List[str]) -> torch.Tensor:
    if y.ndim == 2 and y.shape[0] == n and y.shape[1] > 1 and np.issubdtype(y.dtype, np.number):
        notes.append(f"{path.name}: labels are one-hot {y.shape}, argmax taken")
        y = y.argmax(1)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.shape[0] != n:
        raise AdvlabError(f"labels in {path} must have shape ({n},) for {n} images, got {y.shape}")
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise AdvlabError(f"labels in {path} must be integer class indices, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise AdvlabError(f"labels in {path} must be integer class indices, got non-integer floats")
    y = torch.from_numpy(np.asarray(y).astype(np.int64))
    if n and int(y.min()) < 0:
        raise AdvlabError(f"labels in {path} must be class indices >= 0, got {int(y.min())}")
    return y


def load_arrays(path, labels=None, layout: Optional[str] = None, channels: Optional[int] = None,
                x_key: Optional[str] = None, y_key: Optional[str] = None, scale=None,
                num_classes: Optional[int] = None) -> Tuple[TensorImageDataset, List[str]]:
    """Images and labels from ``path`` (``.npz``; or ``.npy`` with ``labels`` another ``.npy``),
    as ``(dataset, notes)``; see the module docstring. ``num_classes`` (default: the largest label
    + 1) sets the dataset's classes."""
    path = Path(path)
    notes: List[str] = []
    obj = _read(path, "data file")
    if isinstance(obj, np.ndarray):
        if labels is None:
            raise AdvlabError(f"{path} is a .npy file, which holds one array (the images): pass the labels as a second "
                              ".npy file (--labels FILE.npy), or save both in one .npz (np.savez(path, x=..., y=...))")
        x = obj
        yobj = _read(Path(labels), "labels file")
        if not isinstance(yobj, np.ndarray):
            yobj = _pick(yobj, Y_KEYS, y_key, "labels", Path(labels))
        y = yobj
    else:
        with obj as npz:
            x = _pick(npz, X_KEYS, x_key, "images", path)
            if labels is not None:
                yobj = _read(Path(labels), "labels file")
                y = yobj if isinstance(yobj, np.ndarray) else _pick(yobj, Y_KEYS, y_key, "labels", Path(labels))
            else:
                y = _pick(npz, Y_KEYS, y_key, "labels", path)
    x = _layout(x, layout, channels, path, notes)
    images = _pixels(x, scale, path, notes)
    ys = _labels(np.asarray(y), images.shape[0], Path(labels) if labels is not None else path, notes)
    k = int(ys.max()) + 1 if ys.numel() else 0
    if num_classes is not None:
        if k > num_classes:
            raise AdvlabError(f"labels in {path} go up to {k - 1}, beyond the model's {num_classes} classes")
        k = num_classes
    return TensorImageDataset(images, ys, [str(i) for i in range(k)], path.stem, "test"), notes
