"""Data streaming and sharding for a pass over a dataset: numpy arrays as tensors, the accepted
forms of a dataset (``.images``/``.labels``, an ``(x, y)`` pair, a Dataset, a DataLoader, an
iterable of batches; a batch as a tuple, a list or a dict) read as ``(x, y)`` tensor batches, the
split of a stream by whole batches over the ranks of a ``torch.distributed`` run (see
:mod:`advlab.distributed`), and the per-batch seeds that make a batch's result independent of
the rank that computes it. :meth:`advlab.attacks.Attack.run` streams through these."""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

import numpy as np
import torch

from ._util import AdvlabError


#: dict keys of a batch's images and labels that :meth:`~advlab.attacks.Attack.run` accepts, in order of preference
IMAGE_KEYS = ("image", "images", "x", "input", "pixel_values")
LABEL_KEYS = ("label", "labels", "y", "target")


def as_tensor(v, name: str, what: str = "images of shape (N, C, H, W)"):
    """A numpy array as a tensor (sharing its memory where numpy's layout allows; a read-only,
    non-contiguous or byte-swapped array is copied), a tensor (or None) unchanged; anything else
    is an error naming ``name``."""
    if v is None or isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        a = v if v.dtype.isnative else v.astype(v.dtype.newbyteorder("="))
        a = np.ascontiguousarray(a)
        if not a.flags.writeable:
            a = a.copy()
        try:
            return torch.from_numpy(a)
        except TypeError:
            raise AdvlabError(f"{name} is a numpy array of dtype {v.dtype}, which torch cannot hold; "
                              f"expected {what}") from None
    raise AdvlabError(f"{name} must be a torch.Tensor or a numpy array of {what}, got {type(v).__name__}")


def batch_seed(stream: int, b: int) -> int:
    """The seed of batch ``b``'s generator in a run whose stream seed is ``stream``."""
    return (stream + (b + 1) * 0x9E3779B97F4A7C15) % (2 ** 63)


def run_world(shard: Optional[bool]) -> tuple:
    """``(world size, rank)`` of :meth:`~advlab.attacks.Attack.run`: ``(1, 0)`` unless sharding is on."""
    from . import distributed

    if shard is False:
        return 1, 0
    if distributed.is_distributed():
        return distributed.world_size(), distributed.rank()
    if shard and distributed.world_size() > 1:
        raise AdvlabError("shard=True: WORLD_SIZE > 1 but no process group is initialised; call "
                          "advlab.distributed.init() first (under torchrun)")
    return 1, 0


def own_batches(data, batch_size: int, world: int, rank: int) -> Iterable:
    """``(batch index, offset, x, y)`` for the batches of ``data`` that ``rank`` of ``world``
    attacks (batch b goes to rank b % world; all of them alone). Sized data is sliced (or loaded)
    for those batches only; other iterables are read in full, other ranks' batches yielded as
    ``(b, offset, None, None)`` so the indices and offsets stay those of the whole stream."""
    if world == 1:
        offset = 0
        for b, (xb, yb) in enumerate(iter_batches(data, batch_size)):
            yield b, offset, xb, yb
            offset += xb.shape[0]
        return
    if hasattr(data, "images") and hasattr(data, "labels"):
        data = (data.images, data.labels)
    if is_pair(data):
        n = data[0].shape[0]
        for b in range(rank, (n + batch_size - 1) // batch_size, world):
            i = b * batch_size
            yield (b, i, *batch_pair((data[0][i: i + batch_size], data[1][i: i + batch_size])))
    elif isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        n = len(data)
        mine = list(range(rank, (n + batch_size - 1) // batch_size, world))
        idx = [i for b in mine for i in range(b * batch_size, min((b + 1) * batch_size, n))]
        sub = torch.utils.data.Subset(data, idx)
        loader = torch.utils.data.DataLoader(sub, batch_size=batch_size, shuffle=False)
        for b, batch in zip(mine, loader):
            yield (b, b * batch_size, *batch_pair(batch))
    else:
        offset = 0
        for b, (xb, yb) in enumerate(iter_batches(data, batch_size)):
            if b % world == rank:
                yield b, offset, xb, yb
            else:
                yield b, offset, None, None
            offset += xb.shape[0]


def sliced_batches(data, batch_size) -> Optional[int]:
    """Number of batches of the inputs :func:`own_batches` slices per rank (tensors, ``.images``,
    map-style Datasets); None for the others (read in full, counted while read)."""
    if hasattr(data, "images") and hasattr(data, "labels"):
        return (len(data.labels) + batch_size - 1) // batch_size
    if is_pair(data):
        return (data[0].shape[0] + batch_size - 1) // batch_size
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        return (len(data) + batch_size - 1) // batch_size
    return None


def num_batches(data, batch_size):
    sliced = sliced_batches(data, batch_size)
    if sliced is not None:
        return sliced
    try:  # a DataLoader or a list of batches: its length counts batches
        return len(data)
    except TypeError:
        return None


def iter_batches(data, batch_size: int) -> Iterable:
    """``(x, y)`` tensor batches of ``data`` (see :meth:`~advlab.attacks.Attack.run`), in order."""
    if hasattr(data, "images") and hasattr(data, "labels"):
        for i in range(0, len(data.labels), batch_size):
            yield batch_pair((data.images[i: i + batch_size], data.labels[i: i + batch_size]))
    elif is_pair(data):
        for i in range(0, data[0].shape[0], batch_size):
            yield data[0][i: i + batch_size], data[1][i: i + batch_size]
    elif isinstance(data, torch.utils.data.Dataset):  # samples, batched here (an IterableDataset too)
        for batch in torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False):
            yield batch_pair(batch)
    else:  # a DataLoader or any iterable of batches
        try:
            it = iter(data)
        except TypeError:
            raise AdvlabError(f"data must be a dataset (.images/.labels), an (x, y) pair of tensors or numpy "
                              f"arrays, a Dataset, a DataLoader or an iterable of batches, got "
                              f"{type(data).__name__}") from None
        for batch in it:
            yield batch_pair(batch)


def is_pair(data) -> bool:
    """An ``(x, y)`` pair of whole arrays (a tuple of tensors as :func:`as_data` leaves it)."""
    return isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor)


def as_data(data):
    """The input of :meth:`~advlab.attacks.Attack.run` with whole numpy arrays as tensors (sharing memory): an
    ``(x, y)`` tuple or list whose ``x`` is a tensor or numpy array, or a dict of whole arrays
    with an image key and a label key, becomes a tuple of tensors; anything else is unchanged
    (its batches are converted one by one by :func:`batch_pair`)."""
    if isinstance(data, Mapping):
        return tuple(batch_pair(data))
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, np.ndarray)):
        if isinstance(data, list) and data[0].ndim != 4:
            return data  # a list of two batches of another form: read as batches
        return (as_tensor(data[0], "x"), as_tensor(data[1], "y", "class indices of shape (N,)"))
    return data


def batch_pair(batch) -> tuple:
    """``(x, y)`` of one batch: an (x, y) tuple or list, or a dict with one of :data:`IMAGE_KEYS`
    and one of :data:`LABEL_KEYS`; numpy arrays become tensors."""
    if isinstance(batch, Mapping):
        xk = next((k for k in IMAGE_KEYS if k in batch), None)
        yk = next((k for k in LABEL_KEYS if k in batch), None)
        if xk is None or yk is None:
            raise AdvlabError(f"a batch of data is a dict with keys {sorted(map(str, batch))}; Attack.run needs an "
                              f"image key (one of {', '.join(IMAGE_KEYS)}) and a label key (one of "
                              f"{', '.join(LABEL_KEYS)})")
        xb, yb = batch[xk], batch[yk]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        xb, yb = batch
    else:
        what = (f"a {type(batch).__name__} of {len(batch)} items" if isinstance(batch, (tuple, list))
                else type(batch).__name__)
        raise AdvlabError(f"each batch of data must be an (x, y) tuple or list, or a dict with an image key "
                          f"({', '.join(IMAGE_KEYS)}) and a label key ({', '.join(LABEL_KEYS)}); got {what}")
    return as_tensor(xb, "x (a batch of data)"), as_tensor(yb, "y (a batch of data)", "class indices of shape (N,)")
