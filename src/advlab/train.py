"""One training loop for every model and defense: epochs, optimizer, schedule, callbacks,
checkpoints, a tqdm progress bar, per-epoch history, deterministic with a seed."""

from __future__ import annotations

import contextlib
import io
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import __version__
from ._util import (AdvlabError, atomic_write_bytes, check_device, check_images, check_labels, check_positive,
                    check_positive_int, model_device, progress_enabled, restore_train_modes, train_modes)
from .models.loading import CHECKPOINT_FORMAT, build_from_spec, read_checkpoint  # noqa: F401 - re-exported


@dataclass
class History:
    """Per-epoch metrics of a :func:`fit` run; ``history.epochs[i]`` is a dict."""

    epochs: List[Dict[str, float]] = field(default_factory=list)

    def __getitem__(self, key: str) -> List[float]:
        return [e[key] for e in self.epochs if key in e]

    def last(self) -> Dict[str, float]:
        """The metrics of the last epoch (an empty dict before the first)."""
        return self.epochs[-1] if self.epochs else {}


class _TensorBatches:
    """Shuffled mini-batches of a dataset held as tensors (``.images``/``.labels``): one index
    permutation per epoch and a gather per batch, no per-sample Python work."""

    def __init__(self, dataset, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1):
        self.x, self.y = dataset.images, dataset.labels
        self.batch_size, self.g = batch_size, generator
        self.rank, self.world = rank, world

    def _per_rank(self) -> int:
        return (self.y.shape[0] + self.world - 1) // self.world

    def __len__(self) -> int:
        return (self._per_rank() + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        perm = torch.randperm(self.y.shape[0], generator=self.g)
        if self.world > 1:
            # DistributedSampler's layout: every rank draws the same permutation (same seed),
            # pads it by repeating its head to a multiple of the world size and takes every
            # world-th index from its rank on: disjoint shards, the same number of batches
            pad = self._per_rank() * self.world - perm.shape[0]
            if pad and perm.shape[0]:
                perm = torch.cat([perm, perm.repeat(-(-pad // perm.shape[0]))[:pad]])
            perm = perm[self.rank::self.world]
        for i in range(0, perm.shape[0], self.batch_size):
            idx = perm[i: i + self.batch_size]
            yield self.x[idx], self.y[idx]


def resolve_device(device=None, model: nn.Module | None = None) -> torch.device:
    """``device`` (checked: a device string that names no device, or one not available here, is
    an AdvlabError), else the model's device, else the CPU."""
    if device is not None:
        return check_device(device)
    if model is not None:
        return model_device(model)
    return torch.device("cpu")


@contextlib.contextmanager
def seeded_rng(seed: int, device=None):
    """Run a block with torch's global RNG seeded with ``seed``, inside a fork: the caller's
    random state is restored afterwards (library code never reseeds the user's global RNG)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Class predictions of ``model`` for ``x``: ``model.predict(x)`` when the model defines it
    (a defended model may return ``advlab.REJECT``), else the argmax of its logits. Batched."""
    dev = model_device(model)
    was = train_modes(model)
    model.eval()
    out = []
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i: i + batch_size].to(dev)
            if hasattr(model, "predict") and callable(getattr(model, "predict")):
                out.append(model.predict(xb).cpu())
            else:
                out.append(model(xb).argmax(1).cpu())
    finally:
        restore_train_modes(was)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, dataset, batch_size: int = 1024) -> float:
    """Accuracy of ``model`` on a dataset with ``.images``/``.labels`` or any (x, y) dataset."""
    if hasattr(dataset, "images"):
        x, y = dataset.images, dataset.labels
    else:
        xs, ys = zip(*[dataset[i] for i in range(len(dataset))])
        x, y = torch.stack(xs), torch.as_tensor(ys)
    if len(y) == 0:
        return float("nan")
    return float((predict(model, x, batch_size) == y).float().mean())


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9):
    """An optimizer over ``params``: ``"adam"`` (Adam) or ``"sgd"`` (SGD with Nesterov momentum
    ``momentum``), at learning rate ``lr`` with ``weight_decay``. Raises ``AdvlabError`` on another name."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    raise AdvlabError(f"unknown optimizer {name!r}; valid names: adam, sgd")


def make_schedule(name, optimizer, epochs: int, steps_per_epoch: int):
    """Per-step schedules: None, "cosine", "step" (x0.1 at 50% and 75%), "onecycle"."""
    if name is None or name == "none":
        return None
    total = max(1, epochs * steps_per_epoch)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(0.5 * total), int(0.75 * total)], 0.1)
    if name == "onecycle":
        lrs = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lrs, total_steps=total)
    if callable(name):
        return name(optimizer)
    raise AdvlabError(f"unknown schedule {name!r}; valid: none, cosine, step, onecycle")


def fit(model: nn.Module, dataset: Dataset, epochs: int = 3, lr: float = 1e-3, batch_size: int = 128,
        optimizer: str = "adam", schedule=None, loss: Optional[Callable] = None, seed: int = 0,
        device=None, eval_dataset: Optional[Dataset] = None, callbacks: Sequence[Callable] = (),
        weight_decay: float = 0.0, params=None, progress: Optional[bool] = None,
        batch_transform: Optional[Callable] = None, desc: str = "train") -> History:
    """Train ``model`` on ``dataset`` and return the per-epoch :class:`History`.

    ``loss(model, x, y) -> (loss, logits)`` replaces cross-entropy (defenses use it: PCL, VIB,
    adversarial training); ``batch_transform(x, y) -> (x, y)`` edits each batch (e.g. crafts
    adversarial examples). ``params`` restricts what is trained. Each callback is called as
    ``cb(epoch, metrics, model)`` after every epoch; returning True stops training.
    Deterministic for a given ``seed`` on the same machine.

    Under ``torchrun`` (a process group initialised, e.g. by :func:`advlab.distributed.init`,
    with more than one process) the same call trains data-parallel: the model is wrapped in
    ``DistributedDataParallel`` (rank 0's initial weights are broadcast, gradients averaged over
    the ranks at every step), each rank takes a disjoint shard of every epoch's permutation
    (``DistributedSampler``'s layout, the same number of batches on every rank), ``batch_size``
    is per process (the effective batch is ``world * batch_size``), the history holds the
    metrics of all ranks together, progress is drawn on rank 0 only, and callbacks run on every
    rank (write checkpoints there with :func:`advlab.distributed.on_main`; a stop from any rank
    stops all). ``loss`` receives a view of the wrapped model (calling it runs the DDP wrapper,
    attributes are the model's); a loss that never calls it, and trainable ``params`` outside
    the model, get their gradients averaged explicitly. With the tensor datasets' strided shard,
    ``batch_size = B / world`` makes the union of the ranks' batches exactly the single process's
    batches of size B, so the averaged gradient equals the single-process one up to float
    summation order. Alone (no process group) none of this runs.
    """
    if not isinstance(model, nn.Module):
        raise AdvlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    epochs = check_positive_int(epochs, "epochs", 0)
    batch_size = check_positive_int(batch_size, "batch_size")
    lr = check_positive(lr, "lr")
    _check_training_set(dataset, images=loss is None)
    dev = resolve_device(device, model)
    model.to(dev)
    g = torch.Generator().manual_seed(seed)
    world, rank = _fit_world()
    sampler = None
    if hasattr(dataset, "images"):
        loader = _TensorBatches(dataset, batch_size, g, rank, world)
    elif world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g, drop_last=False)
    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = make_optimizer(optimizer, trainable, lr, weight_decay)
    sched = make_schedule(schedule, opt, epochs, len(loader))
    history = History()
    show = progress_enabled(progress) and rank == 0
    step_model = model if world == 1 else _DDPView(model, dev, trainable)
    from tqdm.auto import tqdm

    # dropout and other layers draw from torch's global RNG: seeded inside a fork, so the
    # caller's random state is left as it was
    first = True  # the first batch's forward is checked: images that do not fit the model, labels beyond its classes
    with seeded_rng(seed, dev):
        for epoch in range(1, epochs + 1):
            model.train()
            t0 = time.perf_counter()
            tot_loss, tot_correct, tot_n = 0.0, 0, 0
            bar = tqdm(loader, desc=f"{desc} {epoch}/{epochs}", disable=not show, leave=False, file=sys.stderr)
            if sampler is not None:
                sampler.set_epoch(epoch)
            for x, y in bar:
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                if batch_transform is not None:
                    x, y = batch_transform(x, y)
                    model.train()
                if loss is None:
                    logits = _first_forward(step_model, x, y, dataset) if first else step_model(x)
                    lval = F.cross_entropy(logits, y)
                else:
                    lval, logits = loss(step_model, x, y)
                first = False
                opt.zero_grad(set_to_none=True)
                lval.backward()
                if world > 1:
                    step_model.sync_gradients()
                opt.step()
                if sched is not None:
                    sched.step()
                n = y.shape[0]
                tot_loss += float(lval.detach()) * n
                if logits is not None:
                    tot_correct += int((logits.detach().argmax(1) == y).sum())
                tot_n += n
                if show:
                    # refresh=False: a refresh here would redraw the stale count (tqdm writes n lazily)
                    bar.set_postfix(loss=f"{tot_loss / tot_n:.4f}", refresh=False)
            if world > 1:  # the history is over all ranks' samples, the same on every rank
                tot_loss, tot_correct, tot_n = _sum_over_ranks(tot_loss, tot_correct, tot_n)
            metrics = {"epoch": epoch, "loss": tot_loss / max(tot_n, 1), "train_acc": tot_correct / max(tot_n, 1),
                       "seconds": time.perf_counter() - t0, "images_per_s": tot_n / max(time.perf_counter() - t0, 1e-9)}
            if eval_dataset is not None:
                metrics["test_acc"] = accuracy(model, eval_dataset)
            history.epochs.append(metrics)
            if show:
                msg = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
                tqdm.write(f"{desc} {msg}", file=sys.stderr)
            stop = False
            for cb in callbacks:
                stop = bool(cb(epoch, metrics, model)) or stop
            if world > 1:  # a stop on any rank stops every rank (they must take the same steps)
                stop = _sum_over_ranks(float(stop))[0] > 0
            if stop:
                break
    # leave no gradients behind: a trained model handed to an attack or a defense starts clean
    opt.zero_grad(set_to_none=True)
    if world > 1:
        step_model.release()
    model.eval()
    return history


def _check_training_set(dataset, images: bool) -> None:
    """A dataset :func:`fit` can train on, with clear errors before any work: not empty; for a
    tensor dataset (``.images``/``.labels``) trained with cross-entropy (``images``), images that
    pass :func:`~advlab._util.check_images` and integer labels >= 0, one per image."""
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        n = len(dataset.labels)
        if images:
            check_images(dataset.images, "dataset images")
            check_labels(dataset.labels, dataset.images.shape[0], None, "dataset labels")
            if n and int(dataset.labels.min()) < 0:
                raise AdvlabError(f"dataset labels must be class indices >= 0, found {int(dataset.labels.min())}")
    elif isinstance(dataset, (Dataset, DataLoader)) or (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
                                                          and not isinstance(dataset, (str, bytes, dict))):
        n = len(dataset)
    else:
        raise AdvlabError(f"dataset must be a dataset with .images/.labels or a torch Dataset of (x, y) pairs, got "
                          f"{type(dataset).__name__}")
    if n == 0:
        raise AdvlabError("dataset is empty: nothing to train on")


def _first_forward(model, x: torch.Tensor, y: torch.Tensor, dataset) -> torch.Tensor:
    """The model's logits on the first batch, with a clear error when the images do not fit the
    model or the labels go beyond its classes (instead of a shape error deep inside torch)."""
    try:
        logits = model(x)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        raise AdvlabError(f"the model cannot take the dataset's images of shape {tuple(x.shape[1:])}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise AdvlabError(f"the model must map a batch of images to logits (N, num_classes), got "
                          f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    labels = dataset.labels if hasattr(dataset, "labels") and isinstance(dataset.labels, torch.Tensor) else y
    if labels.is_floating_point() or labels.dtype == torch.bool:  # soft targets: cross-entropy checks them
        return logits
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise AdvlabError(f"dataset labels must lie in [0, {logits.shape[1] - 1}] (the model has {logits.shape[1]} "
                          f"classes), found range [{int(labels.min())}, {int(labels.max())}]")
    return logits


def _fit_world() -> tuple:
    """``(world size, rank)`` for :func:`fit`: ``(1, 0)`` unless a process group with more than
    one process is initialised (a single process never touches torch.distributed)."""
    from . import distributed

    if not distributed.is_distributed():
        return 1, 0
    return distributed.world_size(), distributed.rank()


def _sum_over_ranks(*values: float) -> List[float]:
    from . import distributed

    return distributed.all_reduce_sum(values)


class _DDPView:
    """What :func:`fit` trains through under torchrun, and what a custom ``loss`` receives as its
    model: calling it runs the model's ``DistributedDataParallel`` wrapper (gradients averaged
    over the ranks in backward), every attribute and method is the model's own (``taps``,
    ``feature_layers``, module names unchanged). :meth:`sync_gradients` averages explicitly what
    DDP did not: all trainable tensors when the loss never called the wrapper in this step, and
    trainable tensors that are not parameters of the model."""

    def __init__(self, model: nn.Module, dev: torch.device, trainable: Sequence[torch.Tensor]):
        from torch.nn.parallel import DistributedDataParallel

        ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
        own = {id(p) for p in model.parameters()}
        vars(self).update(_model=model, _calls=0, _trainable=list(trainable),
                          _extra=[p for p in trainable if id(p) not in own],
                          _ddp=DistributedDataParallel(model, device_ids=ids))

    def __call__(self, *args, **kwargs):
        vars(self)["_calls"] += 1
        return self._ddp(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(vars(self)["_model"], name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._model, name, value)

    def sync_gradients(self) -> None:
        from . import distributed

        todo = self._trainable if self._calls == 0 else self._extra
        if todo:
            distributed.average_gradients(todo)
        vars(self)["_calls"] = 0

    def release(self) -> None:
        """Drop the DDP wrapper (its gradient hooks go with it); the model stays trained."""
        vars(self)["_ddp"] = None


# --------------------------------------------------------------------------- checkpoints

# the reading side (read_checkpoint, build_from_spec, the format tag) lives in advlab.models.loading, below
# this module, so that the one model loader (advlab.models.load_model) reads advlab checkpoints too


def write_checkpoint(path, state_dict: Dict[str, torch.Tensor], metadata: Dict, format: str = CHECKPOINT_FORMAT) -> Path:
    """The one checkpoint writer: ``{"format", "metadata", "state_dict"}`` with plain CPU tensors
    and JSON-like metadata (versions added), written atomically. Models (:func:`save_checkpoint`)
    and defenses (:meth:`advlab.defenses.Defense.save`) both go through it."""
    meta = {"advlab_version": __version__, "torch_version": str(torch.__version__)}
    meta.update(metadata)
    _check_weights_only(meta, path)
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    buf = io.BytesIO()
    torch.save({"format": format, "metadata": meta, "state_dict": state}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def _check_weights_only(meta: Dict, path) -> None:
    """Refuse metadata that :func:`read_checkpoint` could not load back (``weights_only=True``
    reads tensors and plain Python values only): the error names the first bad key, and nothing
    is written."""
    for k, v in meta.items():
        buf = io.BytesIO()
        try:
            torch.save(v, buf)
            buf.seek(0)
            torch.load(buf, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdvlabError(f"checkpoint metadata {k!r} ({type(v).__name__}) cannot be stored in {path}: only tensors "
                              f"and plain values (numbers, strings, lists, dicts) load back weights-only "
                              f"({type(e).__name__})") from None


def save_checkpoint(model: nn.Module, path, **metadata) -> Path:
    """Write the model's weights plus metadata (model spec, versions, anything passed) atomically.

    A zoo model (from :func:`advlab.models.build_model`) is rebuilt by :func:`load_checkpoint`
    from its spec; extra metadata (dataset, accuracy...) is stored as plain JSON-like values."""
    meta = {}
    spec = getattr(model, "advlab_spec", None)
    if spec is not None:
        meta["model"] = spec
    meta.update(metadata)
    return write_checkpoint(path, model.state_dict(), meta)


def load_checkpoint(path, model: nn.Module | None = None, device=None):
    """Rebuild the model from the checkpoint's metadata (or fill the given ``model``) and load
    its weights. Returns ``(model, metadata)``. Never executes code from the file."""
    obj = read_checkpoint(path)
    meta = obj["metadata"]
    if model is None:
        model = build_from_spec(meta.get("model"), path)
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        raise AdvlabError(f"checkpoint {path} does not fit the model: {str(e).splitlines()[0]}") from None
    model.to(resolve_device(device, model)).eval()
    return model, meta
