from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import torch

from .._util import AdvlabError, unknown_name
from .tensors import TensorImageDataset, check_split, no_extra_options


def dataset_tensors(dataset) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a dataset with ``.images``/``.labels``, an ``(x, y)`` tuple of tensors,
    or any map-style dataset of (x, y) pairs."""
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        return dataset.images, dataset.labels
    if isinstance(dataset, tuple) and len(dataset) == 2 and isinstance(dataset[0], torch.Tensor):
        return dataset
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) or isinstance(dataset, (str, bytes)):
        raise AdvlabError(f"dataset must be a dataset with .images/.labels, an (x, y) tuple of tensors or a map-style "
                          f"Dataset of (x, y) pairs, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise AdvlabError("dataset is empty")
    try:
        xs, ys = zip(*[dataset[i] for i in range(len(dataset))])
        return torch.stack(xs), torch.as_tensor(ys)
    except (TypeError, ValueError, RuntimeError) as e:
        raise AdvlabError(f"dataset must yield (image tensor, label) pairs of one shape: {e}") from None


def split_validation(dataset, fraction: float = 0.15, seed: int = 0):
    """Seeded (fit, validation) split of a dataset, e.g. to tune a defense's threshold on data
    it was not fitted on. Returns two datasets of the same kind (``.subset``) or two tuples.

    ``fraction``: the validation share, in (0, 1); ``seed``: the permutation's seed."""
    x, y = dataset_tensors(dataset)
    if not (0.0 < fraction < 1.0):
        raise AdvlabError(f"fraction must be in (0, 1), got {fraction}")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(fraction * len(y))))
    if hasattr(dataset, "subset"):
        return dataset.subset(indices=perm[n_val:]), dataset.subset(indices=perm[:n_val])
    return (x[perm[n_val:]], y[perm[n_val:]]), (x[perm[:n_val]], y[perm[:n_val]])


def shared_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """The folder holding the benchmark datasets (``mnist-10k/``, ``fashion-mnist/``): the given
    ``data_root`` (``--data-root``), else ``$ADVLAB_SHARED_DATA``, else ``../shared/data`` from
    the current directory. A clear error names the options when none exists."""
    cands = [data_root] if data_root is not None else \
        [os.environ.get("ADVLAB_SHARED_DATA"), Path.cwd().parent / "shared" / "data"]
    for c in cands:
        if c and Path(c).is_dir():
            return Path(c)
    tried = ", ".join(str(c) for c in cands if c)
    raise AdvlabError(f"no data folder found (tried {tried}); pass --data-root DIR or set ADVLAB_SHARED_DATA to the "
                      "folder holding mnist-10k/ and fashion-mnist/")


#: the folder of each dataset inside the shared data root
SHARED_FOLDERS = {"mnist": "mnist-10k", "fashion-mnist": "fashion-mnist"}


def shared_folder(root, dataset: str, folder: str | None = None) -> Path | None:
    """The folder of ``dataset`` inside the shared data ``root`` (None for the embedded digits)."""
    if dataset == "digits":
        return None
    return Path(root) / (folder or SHARED_FOLDERS.get(dataset, dataset))


def load_train_test(dataset: str, data_root=None, folder: str | None = None, train_subset: int | None = None,
                    test_subset: int | None = None, seed: int = 0):
    """(train, test) of ``dataset`` from its folder in the shared data root (the embedded digits
    need none), each optionally cut to a seeded subset: what an experiment spec names.

    ``data_root``: the shared data folder (default :func:`shared_data_root`); ``folder``: the dataset's
    folder inside it (default: its usual name); ``train_subset``, ``test_subset``: sizes of the seeded
    subsets (``seed``), None for the whole split."""
    root = shared_folder(data_root, dataset, folder) if dataset != "digits" else None
    train, test = load_dataset(dataset, root, "train"), load_dataset(dataset, root, "test")
    if train_subset:
        train = train.subset(int(train_subset), seed=seed)
    if test_subset:
        test = test.subset(int(test_subset), seed=seed)
    return train, test


def _digits(root=None, split="train", download=False, **kw) -> TensorImageDataset:
    from sklearn.datasets import load_digits

    check_split(split)
    no_extra_options("digits", kw)
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
    def load(root=None, split="train", download=False, mirrors=None, **kw) -> TensorImageDataset:
        from .idx import load_idx_pair
        from .download import default_root, ensure_files

        check_split(split)
        no_extra_options(name, kw)
        root = Path(root) if root is not None else default_root(name)
        files = ensure_files(name, root, split, download=download, mirrors=mirrors)
        images, labels = load_idx_pair(files[0], files[1])
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise AdvlabError(f"{files[1]}: labels outside [0, {len(classes) - 1}]: "
                              f"found range [{int(labels.min())}, {int(labels.max())}]")
        return TensorImageDataset(images, labels, classes, name, split)
    load.__doc__ = (f"{name} from the official IDX files in root (default: default_root({name!r})); "
                    f"``download=True`` fetches missing ones with checksums.")
    return load


def _lazy(module: str, func: str) -> Callable:
    """A loader that imports ``advlab.data.<module>`` only when called (keeps scipy/PIL imports lazy)."""
    def load(**kwargs):
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), func)(**kwargs)
    load.__name__ = func
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
    "cifar10": (_lazy("cifar", "load_cifar10"),
                "CIFAR-10, official python batches (cifar-10-batches-py/ or cifar-10-python.tar.gz) in root"),
    "svhn": (_lazy("svhn", "load_svhn"),
             "SVHN cropped digits, official train_32x32.mat / test_32x32.mat / extra_32x32.mat in root"),
    "folder": (_lazy("folder", "load_folder"),
               "your images, root/<class>/*.png|jpg|...; options size=(H, W), grayscale, test_fraction, seed"),
}


def register_dataset(name: str, loader: Callable, description: str) -> None:
    """Register a dataset for :func:`load_dataset` (and the CLI's ``--dataset``) under ``name``.

    ``loader(root=..., split=..., download=..., **options)`` must return a :class:`TensorImageDataset`
    (float32 NCHW in [0, 1], int64 labels); ``description`` is the line ``advlab datasets`` shows. A
    registered name is replaced."""
    DATASETS[name] = (loader, description)


def list_datasets():
    """Names of the registered datasets (:data:`DATASETS`), sorted."""
    return sorted(DATASETS)


def load_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train",
                 download: bool = False, **kwargs) -> TensorImageDataset:
    """Load a registered dataset as a :class:`TensorImageDataset` (float32 NCHW in [0, 1],
    int64 labels).

    ``root`` is the folder of the dataset's files (default ``$ADVLAB_DATA/<name>`` or
    ``~/.cache/advlab/<name>``; not used by ``digits``; required by ``folder``). Files found
    there are read as they are. ``download=True`` fetches missing official files and verifies
    their SHA-256/MD5; ``mirrors=[...]`` (or ``$ADVLAB_MIRROR``) replaces the official mirrors.
    ``folder`` also takes ``size``, ``grayscale``, ``test_fraction`` and ``seed``.

    ``split``: "train" or "test". Raises ``AdvlabError`` for an unknown name (naming the valid ones),
    missing or corrupt files, or a checksum mismatch."""
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    loader, _ = DATASETS[name]
    return loader(root=root, split=split, download=download, **kwargs)


def dataset_info(name: str) -> dict:
    """What the CLI shows for a dataset: description, splits, official files with checksums and
    mirrors, and the default folder (for the datasets that have official files).

    ``name``: a registered dataset (an unknown one is an error naming the valid ones)."""
    from .download import SOURCES, default_root, mirrors_for

    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    info = {"name": name, "description": DATASETS[name][1], "downloadable": name in SOURCES}
    if name in SOURCES:
        src = SOURCES[name]
        info.update(
            splits=list(src.files),
            files={split: [{"name": f.name, "sha256": f.sha256, "md5": f.md5} for f in files]
                   for split, files in src.files.items()},
            mirrors=mirrors_for(name),
            homepage=src.homepage,
            default_root=str(default_root(name)),
        )
    else:
        info["splits"] = ["train", "test", "all"] if name == "folder" else ["train", "test"]
    return info
