"""Past one process: helpers for running advlab under ``torchrun`` (PyTorch's own launcher and
``torch.distributed``; nothing home-made).

>>> # torchrun --nproc_per_node 2 my_script.py        (or --nnodes N --rdzv-endpoint host:port)
>>> from advlab import distributed as dist
>>> dev = dist.init()                                # gloo on CPU, nccl on GPU; no-op alone
>>> fit(model.to(dev), train_set, batch_size=64)     # DDP, sharded batches, rank-0 progress
>>> res = PGD(model, eps=0.3, seed=0).run(test_set)  # each rank attacks its shard, gathered
>>> dist.on_main(save_checkpoint, model, "m.pt")     # rank 0 writes, the others wait
>>> dist.shutdown()

Rank, world size and local rank come from the process group when one is initialised, else from
the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else 0 / 1 / 0. A
single process (no torchrun, or ``--nproc_per_node 1``) never initialises a process group and
never calls into ``torch.distributed``: every helper below is then a plain local operation.

Sharding (:func:`shard_indices`) is deterministic: ``"contiguous"`` gives rank r the r-th of W
nearly equal consecutive blocks (the first ``n % W`` ranks one more); ``"strided"`` gives it the
indices ``r, r + W, r + 2W, ...`` (``DistributedSampler``'s layout without the shuffle).

Gathering (:func:`gather`, :func:`gather_indexed`) uses ``all_gather_object``: each rank sends
its per-sample tensors (CPU) together with their positions in the original order; every rank
receives all of them, checks that every position arrives exactly once, and puts them back in the
original order. One collective per call, any dtype or shape, uneven shards allowed; the cost is
one pickle per rank and every rank holding the whole result (size estimates in the README).
A tensor pickles its whole storage, so a view (a batch's slice of the whole label tensor) would
send the whole set once per batch: what is sent is first made :func:`compact` (a copy of only
its own elements wherever it is a view into a larger storage).
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

import torch

from ._util import AdvlabError, atomic_write_bytes

__all__ = ["rank", "world_size", "local_rank", "is_initialized", "is_distributed", "is_main", "device", "init",
           "shutdown", "barrier", "shard_indices", "gather", "gather_indexed", "all_gather_object",
           "all_reduce_sum", "average_gradients", "on_main", "log", "write_bytes", "compact"]

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise AdvlabError(f"environment variable {name} must be an integer, got {v!r}") from None


def is_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is up (False when torch lacks distributed)."""
    d = torch.distributed
    return d.is_available() and d.is_initialized()


def rank() -> int:
    """This process's global rank: the process group's, else ``$RANK``, else 0."""
    if is_initialized():
        return torch.distributed.get_rank()
    return _env_int("RANK", 0)


def world_size() -> int:
    """Number of processes: the process group's, else ``$WORLD_SIZE``, else 1."""
    if is_initialized():
        return torch.distributed.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """This process's rank on its machine (``$LOCAL_RANK``, set by torchrun), else 0: the GPU it uses."""
    return _env_int("LOCAL_RANK", 0)


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised: the sharded paths run
    exactly then."""
    return is_initialized() and torch.distributed.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes files."""
    return rank() == 0


def device(kind: Optional[str] = None) -> torch.device:
    """The device this rank should use: ``cuda:LOCAL_RANK`` when CUDA is available (or ``kind``
    is "cuda"), else the CPU."""
    if kind is None:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        return torch.device("cuda", local_rank())
    return torch.device(kind)


def init(backend: Optional[str] = None, device_kind: Optional[str] = None,
         timeout_s: float = 1800.0) -> torch.device:
    """Join the process group that ``torchrun`` describes (``init_method="env://"``: MASTER_ADDR,
    MASTER_PORT, RANK, WORLD_SIZE) and return this rank's device.

    ``backend``: "gloo" on the CPU, "nccl" on GPUs (the default follows the device). With
    ``WORLD_SIZE`` unset or 1 nothing is initialised (a single process costs nothing). Calling it
    again is a no-op; the group is destroyed at exit if :func:`shutdown` was not called.

    ``device_kind``: "cuda", "cpu", ... (default: CUDA when available); ``timeout_s``: the process
    group's timeout. Raises ``AdvlabError`` when ``WORLD_SIZE`` > 1 but torchrun's other variables
    are missing, or for an unknown backend."""
    dev = device(device_kind)
    if is_initialized() or _env_int("WORLD_SIZE", 1) <= 1:
        return dev
    d = torch.distributed
    if not d.is_available():
        raise AdvlabError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if backend not in ("gloo", "nccl", "mpi", "ucc"):
        raise AdvlabError(f"backend must be 'gloo' (CPU) or 'nccl' (GPU), got {backend!r}")
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        if var not in os.environ:
            raise AdvlabError(f"WORLD_SIZE is set but {var} is not: launch with torchrun (it sets MASTER_ADDR, "
                              "MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE)")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kw: Dict[str, Any] = {"backend": backend, "init_method": "env://",
                          "timeout": datetime.timedelta(seconds=float(timeout_s))}
    if dev.type == "cuda" and backend == "nccl":
        kw["device_id"] = dev  # eager NCCL init bound to this rank's GPU
    try:
        d.init_process_group(**kw)
    except TypeError:  # older torch without device_id
        kw.pop("device_id", None)
        d.init_process_group(**kw)
    atexit.register(shutdown)  # a script that forgets shutdown() still leaves cleanly
    return dev


def shutdown() -> None:
    """Leave and destroy the process group (no-op when none is initialised)."""
    if is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        torch.distributed.barrier()


# --------------------------------------------------------------------------- sharding

def shard_indices(n: int, rank_: Optional[int] = None, world: Optional[int] = None,
                  mode: str = "contiguous") -> torch.Tensor:
    """The indices of ``range(n)`` that rank ``rank_`` (default: this one) of ``world`` processes
    handles, as a long tensor. ``"contiguous"``: consecutive blocks, sizes differing by at most
    one (rank r gets ``[r*q + min(r, m), ...)`` with ``q, m = divmod(n, world)``); ``"strided"``:
    ``r, r + world, ...``. Every index belongs to exactly one rank; deterministic, no communication.

    ``mode``: "contiguous" or "strided"."""
    world = world_size() if world is None else int(world)
    r = rank() if rank_ is None else int(rank_)
    if n < 0:
        raise AdvlabError(f"n must be >= 0, got {n}")
    if world < 1 or not 0 <= r < world:
        raise AdvlabError(f"rank must be in [0, world) with world >= 1, got rank={r}, world={world}")
    if mode == "strided":
        return torch.arange(r, max(n, r), world, dtype=torch.long)
    if mode != "contiguous":
        raise AdvlabError(f"mode must be 'contiguous' or 'strided', got {mode!r}")
    q, m = divmod(n, world)
    start = r * q + min(r, m)
    return torch.arange(start, start + q + (1 if r < m else 0), dtype=torch.long)


# --------------------------------------------------------------------------- collectives

def compact(obj: T) -> T:
    """``obj`` with every tensor in it (through dicts, lists and tuples) detached, on the CPU and
    holding only its own elements: a view into a larger storage (a slice of a whole dataset's
    labels) is copied, since pickling a tensor writes its whole storage. Tensors that already own
    exactly their storage are returned as they are (no copy)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            return t.cpu()  # a fresh, compact copy
        if t.storage_offset() != 0 or t.untyped_storage().nbytes() > t.numel() * t.element_size():
            t = t.clone(memory_format=torch.contiguous_format)
        return t
    if isinstance(obj, dict):
        return {k: compact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [compact(v) for v in obj]
    if isinstance(obj, tuple):
        vals = [compact(v) for v in obj]
        return type(obj)(*vals) if hasattr(obj, "_fields") else tuple(vals)
    return obj


def all_gather_object(obj: T) -> List[T]:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process). Tensors should be on
    the CPU (they are pickled)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_indexed(items: Dict[int, T], total: Optional[int] = None) -> List[T]:
    """Gather ``{position: item}`` from every rank into one list ordered by position, each
    position exactly once (an :class:`AdvlabError` names a position that is missing or sent by
    two ranks). ``total``: the expected number of positions (default: as many as arrive, which
    must then be ``0..k-1``). Every rank receives the whole list.

    ``items``: this rank's ``{position: item}`` (positions are ints)."""
    merged: Dict[int, T] = {}
    for part in all_gather_object(compact(items)):
        for k, v in part.items():
            if k in merged:
                raise AdvlabError(f"gather: position {k} was sent by two ranks")
            merged[k] = v
    n = len(merged) if total is None else int(total)
    if len(merged) != n or (n and (min(merged) != 0 or max(merged) != n - 1)):
        missing = sorted(set(range(n)) - set(merged))[:5]
        raise AdvlabError(f"gather: expected positions 0..{n - 1} exactly once, got {len(merged)}"
                          + (f" (missing e.g. {missing})" if missing else ""))
    return [merged[k] for k in range(n)]


def gather(values: Dict[str, torch.Tensor], indices: torch.Tensor, n: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Per-sample tensors of this rank's shard (``values[k][i]`` belongs to sample ``indices[i]``)
    gathered from every rank into the original order: ``out[k][indices[i]] == values[k][i]``.
    Every sample of ``0..n-1`` must arrive exactly once (checked). Works unchanged in a single
    process (it then only reorders). Returns CPU tensors."""
    indices = torch.as_tensor(indices, dtype=torch.long).cpu()
    local = {k: compact(v) for k, v in values.items()}
    for k, v in local.items():
        if v.shape[:1] != indices.shape:
            raise AdvlabError(f"gather: {k} has {tuple(v.shape)[:1]} entries for {indices.shape[0]} indices")
    parts = all_gather_object((indices, local))
    idx = torch.cat([p[0] for p in parts])
    total = int(idx.shape[0]) if n is None else int(n)
    seen = torch.zeros(total, dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= total):
        raise AdvlabError(f"gather: an index lies outside 0..{total - 1}")
    seen.index_add_(0, idx, torch.ones_like(idx))
    if not bool((seen == 1).all()):
        bad = (seen != 1).nonzero().squeeze(1)[:5].tolist()
        raise AdvlabError(f"gather: every sample must arrive exactly once; samples {bad} did not")
    out = {}
    for k in local:
        cat = torch.cat([p[1][k] for p in parts])
        res = torch.empty((total, *cat.shape[1:]), dtype=cat.dtype)
        res[idx] = cat
        out[k] = res
    return out


def all_reduce_sum(values: Sequence[float]) -> List[float]:
    """Sum numbers over all ranks (float64 on the CPU with gloo, on this rank's GPU with nccl);
    the same list in a single process.

    ``values``: this rank's numbers; returns the sums, one per value, on every rank."""
    if not is_distributed():
        return [float(v) for v in values]
    dev = torch.device("cuda", torch.cuda.current_device()) \
        if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """All-reduce and average ``.grad`` of ``params`` over the ranks (one flat bucket per dtype
    and device). A parameter without a gradient on every rank keeps ``grad = None`` (an optimizer
    then skips it, as alone); one with a gradient on some ranks only counts as zero on the others.
    No-op alone. :func:`fit` uses it for trainable tensors that ``DistributedDataParallel`` does
    not own, or when a custom loss bypasses the wrapped model."""
    if not is_distributed():
        return
    params = list(params)
    w = torch.distributed.get_world_size()
    has = all_reduce_sum([float(p.grad is not None) for p in params])
    groups: Dict[tuple, list] = {}
    for p, h in zip(params, has):
        if h == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for ps in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        torch.distributed.all_reduce(flat)
        flat.div_(w)
        off = 0
        for p in ps:
            k = p.grad.numel()
            p.grad.copy_(flat[off: off + k].view_as(p.grad))
            off += k


# --------------------------------------------------------------------------- rank 0 only

def on_main(fn: Callable[..., T], *args, wait: bool = True, **kwargs) -> Optional[T]:
    """Call ``fn(*args, **kwargs)`` on rank 0 only (checkpoints, reports) and return its result
    there (None on the other ranks); with ``wait`` every rank then waits at a barrier, so the file
    exists everywhere once this returns. Plain call in a single process."""
    out = fn(*args, **kwargs) if is_main() else None
    if wait:
        barrier()
    return out


def log(msg: str, file=None) -> None:
    """Print ``msg`` on rank 0 only (stderr by default).

    ``file``: where to print (default ``sys.stderr``)."""
    if is_main():
        print(msg, file=file or sys.stderr, flush=True)


def write_bytes(path, data: bytes) -> Optional[Path]:
    """Atomic write of ``data`` to ``path`` on rank 0 only, then a barrier; returns the path on
    rank 0, None elsewhere."""
    return on_main(atomic_write_bytes, path, data)
