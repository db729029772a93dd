"""Small shared helpers: input validation with clear errors, eval-mode and frozen-parameter guards,
seeded generators, atomic writes. Every subpackage may import this module."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn


class AdvlabError(ValueError):
    """A user-facing error: bad argument, unknown name, corrupt file. The CLI prints it in one line."""


def check_images(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Check that ``x`` is a floating (N, C, H, W) batch of finite values in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise AdvlabError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise AdvlabError(f"{name} must have shape (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise AdvlabError(f"{name} must be a floating-point tensor with values in [0, 1], got dtype {x.dtype}")
    if not x.numel():
        return x
    # one reduction and one host sync: min/max propagate NaN, and infinities land in them too
    lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise AdvlabError(f"{name} contains NaN or infinite values")
    if lo < 0.0 or hi > 1.0:
        raise AdvlabError(
            f"{name} must hold pixel values in [0, 1], got range [{lo:.4g}, {hi:.4g}]; "
            "put mean/std normalisation inside the model (advlab.nn.Normalize)"
        )
    return x


def check_labels(y: torch.Tensor, n: int, num_classes: int | None = None, name: str = "y") -> torch.Tensor:
    """Check that ``y`` is an integer vector of length ``n`` with values in [0, num_classes)."""
    if not isinstance(y, torch.Tensor):
        raise AdvlabError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != n:
        raise AdvlabError(f"{name} must have shape ({n},), got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise AdvlabError(f"{name} must be an integer tensor of class indices, got dtype {y.dtype}")
    if n and num_classes is not None:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise AdvlabError(f"{name} holds labels outside [0, {num_classes - 1}]: found range [{lo}, {hi}]")
    return y


def check_nonneg(value: float, name: str) -> float:
    if value is None or not (float(value) >= 0.0):
        raise AdvlabError(f"{name} must be >= 0, got {value}")
    return float(value)


def check_positive(value, name: str) -> float:
    if isinstance(value, bool) or value is None or not (float(value) > 0.0) or float(value) == float("inf"):
        raise AdvlabError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_positive_int(value: int, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise AdvlabError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (cpu for a parameter-free model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with parameters not requiring grad; restore both afterwards.

    Attacks run inside this guard: no gradient lands on the model's parameters, and the
    backward pass skips the weight gradients it would otherwise compute.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``; None when seed is None."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def unknown_name(kind: str, name: str, valid) -> AdvlabError:
    return AdvlabError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(valid))}")
