"""CIFAR-10 in its official python layout: ``cifar-10-batches-py/`` with ``data_batch_1..5``,
``test_batch`` and ``batches.meta``, or the ``cifar-10-python.tar.gz`` tarball holding it.

The batch files are Python pickles, as the dataset is distributed. **Only load pickle files you
trust**: the official tarball (downloaded here and checked against its SHA-256 and MD5) or files
you put in ``root`` yourself. As a safety net they are read with :class:`RestrictedUnpickler`,
which resolves only the few numpy constructors an array needs and refuses every other global,
so a pickle cannot name an arbitrary function to run.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import re
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .._util import AdvlabError, atomic_write_bytes

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _allowed_globals() -> Dict[Tuple[str, str], object]:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 1.x (the official files)
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 2.x
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles from Python 3 store bytes
    }


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy's array reconstruction (``_reconstruct``,
    ``ndarray``, ``dtype``) and ``_codecs.encode``; any other global raises AdvlabError."""

    _ALLOWED = None

    def find_class(self, module: str, name: str):
        allowed = RestrictedUnpickler._ALLOWED
        if allowed is None:
            allowed = RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return allowed[(module, name)]
        except KeyError:
            raise AdvlabError(f"refusing to unpickle global {module}.{name}: CIFAR batch files hold only "
                              f"numpy arrays, lists and strings") from None


def restricted_loads(data: bytes, what: str = "pickle"):
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``latin1`` for Python 2 strings);
    corrupt data raises AdvlabError naming ``what``."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except AdvlabError as e:
        raise AdvlabError(f"{what}: {e}") from None
    except Exception as e:  # a corrupt pickle can raise almost anything (UnpicklingError, EOFError, ...)
        raise AdvlabError(f"{what} is not a readable CIFAR pickle: {type(e).__name__}: {e}") from None


def _key(d: dict, name: str):
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    return None


def _decode_batch(obj, what: str) -> Tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, dict):
        raise AdvlabError(f"{what}: expected a dict with 'data' and 'labels', got {type(obj).__name__}")
    data, labels = _key(obj, "data"), _key(obj, "labels")
    if data is None or labels is None:
        keys = ", ".join(k.decode() if isinstance(k, bytes) else str(k) for k in obj)
        raise AdvlabError(f"{what}: expected keys 'data' and 'labels', found {keys}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise AdvlabError(f"{what}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise AdvlabError(f"{what}: 'labels' must be a list of integers")
    if labels.shape[0] != data.shape[0]:
        raise AdvlabError(f"{what} holds {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise AdvlabError(f"{what}: labels outside [0, 9]: found range [{labels.min()}, {labels.max()}]")
    return data, labels.astype(np.int64)


def _class_names(meta, what: str) -> List[str]:
    if meta is None:
        return list(CLASSES)
    names = _key(meta, "label_names") if isinstance(meta, dict) else None
    if names is None or len(names) != len(CLASSES):
        raise AdvlabError(f"{what}: expected 'label_names' with {len(CLASSES)} names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


class _FolderReader:
    def __init__(self, folder: Path):
        self.folder = folder

    def names(self) -> List[str]:
        return sorted(p.name for p in self.folder.iterdir() if p.is_file())

    def read(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def where(self, name: str) -> str:
        return str(self.folder / name)


class _TarReader:
    """Reads members of the tarball into memory; nothing is extracted to disk."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.tar = tarfile.open(path, "r:*")
            self.members = {m.name: m for m in self.tar.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise AdvlabError(f"corrupt CIFAR-10 tarball {path}: {e}") from None

    def names(self) -> List[str]:
        return sorted(n[len(FOLDER) + 1:] for n in self.members if n.startswith(FOLDER + "/") and n.count("/") == 1)

    def read(self, name: str) -> bytes:
        try:
            return self.tar.extractfile(self.members[f"{FOLDER}/{name}"]).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise AdvlabError(f"corrupt CIFAR-10 tarball {self.path}: {e}") from None

    def where(self, name: str) -> str:
        return f"{self.path}:{FOLDER}/{name}"

    def close(self):
        self.tar.close()


def _find(root: Path):
    """The reader for ``root``: the batch folder (``root/cifar-10-batches-py`` or ``root`` itself)
    if present, else the tarball; None when neither is there."""
    for folder in (root / FOLDER, root):
        if folder.is_dir() and ((folder / TEST_BATCH).is_file() or (folder / TRAIN_BATCHES[0]).is_file()):
            return _FolderReader(folder)
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        return _TarReader(root)
    if (root / "cifar-10-python.tar.gz").is_file():
        return _TarReader(root / "cifar-10-python.tar.gz")
    return None


def _safe_extract(tar_path: Path, dest_root: Path) -> Path:
    """Extract the regular files directly under ``cifar-10-batches-py/`` of a verified tarball,
    each written atomically; any other member (links, nested paths, '..') is skipped."""
    reader = _TarReader(tar_path)
    try:
        for name in reader.names():
            if re.fullmatch(r"[A-Za-z0-9_.\-]+", name) and name not in (".", ".."):
                atomic_write_bytes(dest_root / FOLDER / name, reader.read(name))
    finally:
        reader.close()
    return dest_root / FOLDER


def ensure_cifar10(root: str | os.PathLike, download: bool = False, mirrors=None, timeout: float = 60.0,
                   progress: Optional[bool] = None) -> Path:
    """The folder or tarball to read CIFAR-10 from in ``root``. With ``download=True`` and
    neither present, the official tarball is downloaded, its SHA-256 and MD5 verified, and its
    batches extracted into ``root/cifar-10-batches-py``."""
    from .download import CIFAR10_TARBALL, ensure_files, file_url, mirrors_for, verify_file

    root = Path(root)
    tarball = root / CIFAR10_TARBALL.name
    if (root / FOLDER).is_dir() and any((root / FOLDER / n).is_file() for n in [TEST_BATCH] + TRAIN_BATCHES):
        return root / FOLDER
    if root.is_dir() and any((root / n).is_file() for n in [TEST_BATCH] + TRAIN_BATCHES):
        return root
    if not download:
        if tarball.is_file():
            return tarball
        url = file_url(mirrors_for("cifar10", mirrors)[0], CIFAR10_TARBALL.name)
        raise AdvlabError(
            f"cifar10 files missing in {root}: expected {FOLDER}/ (data_batch_1..5, test_batch, batches.meta) "
            f"or {CIFAR10_TARBALL.name}; put the official files there (from {url}) or pass download=True "
            f"(--download)")
    if tarball.is_file():
        # A tarball already in root is extracted only if it is the official one.
        verify_file(tarball, sha256=CIFAR10_TARBALL.sha256, md5=CIFAR10_TARBALL.md5)
    else:
        tarball = ensure_files("cifar10", root, "train", download=True, mirrors=mirrors, timeout=timeout,
                               progress=progress)[0]
    return _safe_extract(tarball, root)


def load_cifar10(root=None, split: str = "train", download: bool = False, mirrors=None, **kwargs):
    """CIFAR-10 as a TensorImageDataset of (N, 3, 32, 32) float32 images in [0, 1].

    ``root`` holds ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz`` (read in memory, not
    extracted). The train split is every ``data_batch_<k>`` present; a warning says when fewer
    than the official five are there. The batch files are pickles: load only trusted files
    (they are read with :class:`RestrictedUnpickler`)."""
    from .tensors import TensorImageDataset, check_split, no_extra_options
    from .download import default_root

    check_split(split)
    no_extra_options("cifar10", kwargs)
    root = Path(root) if root is not None else default_root("cifar10")
    src = _find(root) if not download else None
    if src is None:
        src = _find(ensure_cifar10(root, download=download, mirrors=mirrors))
    try:
        names = src.names()
        if split == "train":
            wanted = sorted((n for n in names if re.fullmatch(r"data_batch_\d+", n)), key=lambda n: int(n[11:]))
            if not wanted:
                raise AdvlabError(f"no CIFAR-10 training batches (data_batch_1..5) in {src.where('')}")
            if wanted != TRAIN_BATCHES:
                warnings.warn(f"CIFAR-10 train split from {len(wanted)} batch file(s) ({', '.join(wanted)}), "
                              f"not the official five", stacklevel=4)  # the caller of load_dataset
        else:
            if TEST_BATCH not in names:
                raise AdvlabError(f"CIFAR-10 {TEST_BATCH} missing in {src.where('')}")
            wanted = [TEST_BATCH]
        parts = [_decode_batch(restricted_loads(src.read(n), src.where(n)), src.where(n)) for n in wanted]
        meta = restricted_loads(src.read(META), src.where(META)) if META in names else None
        classes = _class_names(meta, src.where(META))
    finally:
        if isinstance(src, _TarReader):
            src.close()
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = torch.from_numpy(data).view(-1, 3, 32, 32).to(torch.float32).div_(255.0)
    return TensorImageDataset(x, torch.from_numpy(labels), classes, "cifar10", split)
