"""Small shared helpers: input validation with clear errors, eval-mode and frozen-parameter guards,
seeded generators, atomic writes. Every subpackage may import this module."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn


class AdvlabError(ValueError):
    """A user-facing error: bad argument, unknown name, corrupt file. The CLI prints it in one line."""


def check_batch(x: torch.Tensor, name: str = "x", dtype_note: str = "") -> torch.Tensor:
    """Check that ``x`` is a floating (N, C, H, W) tensor: type, shape and dtype only, so no host
    sync. ``dtype_note`` is added to the dtype error (e.g. " with values in [0, 1]")."""
    if not isinstance(x, torch.Tensor):
        raise AdvlabError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise AdvlabError(f"{name} must have shape (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise AdvlabError(f"{name} must be a floating-point tensor{dtype_note}, got dtype {x.dtype}")
    return x


def check_images(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Check that ``x`` is a floating (N, C, H, W) batch of finite values in [0, 1]."""
    check_batch(x, name, " with values in [0, 1]")
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


def _as_float(value, name: str, expected: str) -> float:
    """``float(value)``, or AdvlabError naming ``name`` for None, a bool, text or another non-number."""
    if value is None or isinstance(value, (bool, str, bytes)):
        raise AdvlabError(f"{name} must be {expected}, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError, RuntimeError):  # RuntimeError: a tensor of several values
        raise AdvlabError(f"{name} must be {expected}, got {value!r}") from None


def check_nonneg(value: float, name: str) -> float:
    """A finite number >= 0 (NaN, infinities, None, bools and text are errors naming ``name``)."""
    v = _as_float(value, name, "a finite number >= 0")
    if not (0.0 <= v < math.inf):
        raise AdvlabError(f"{name} must be a finite number >= 0, got {value}")
    return v


def check_positive(value, name: str) -> float:
    """A finite number > 0."""
    v = _as_float(value, name, "a finite number > 0")
    if not (0.0 < v < math.inf):
        raise AdvlabError(f"{name} must be a finite number > 0, got {value}")
    return v


def check_positive_int(value: int, name: str, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (a float with an integer value is accepted; 2.5, NaN, inf are not)."""
    v = _as_float(value, name, f"an integer >= {minimum}")
    if not math.isfinite(v) or v != int(v) or int(v) < minimum:
        raise AdvlabError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(v)


def check_device(device, name: str = "device") -> torch.device:
    """``torch.device(device)``, or AdvlabError when the string is not a device or the device is
    not available here (CUDA/MPS absent, a CUDA index beyond the visible GPUs)."""
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise AdvlabError(f"{name} must be cpu, cuda, cuda:N or mps, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AdvlabError(f"{name} {str(dev)!r} is not available: no CUDA GPU is visible to torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AdvlabError(f"{name} {str(dev)!r} is not available: {torch.cuda.device_count()} CUDA GPU(s) visible")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise AdvlabError(f"{name} 'mps' is not available on this machine")
    return dev


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (cpu for a parameter-free model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def train_modes(model: nn.Module) -> list:
    """Every submodule's own train/eval flag, for :func:`restore_train_modes`."""
    return [(m, m.training) for m in model.modules()]


def restore_train_modes(modes: list) -> None:
    """Give every submodule back its own flag. ``model.train(was)`` would not: it sets one flag on
    the whole tree, so a backbone in eval mode inside a wrapper in train mode (a frozen feature
    extractor, a user's model wrapped by a defense) would come back in train mode."""
    for m, training in modes:
        m.training = training


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with parameters not requiring grad; restore both afterwards
    (each submodule's own train/eval flag, see :func:`restore_train_modes`).

    Attacks run inside this guard: no gradient lands on the model's parameters, and the
    backward pass skips the weight gradients it would otherwise compute.
    """
    modes = train_modes(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        restore_train_modes(modes)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``; None when seed is None."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) and not (hasattr(seed, "__index__") or (
            isinstance(seed, float) and seed.is_integer())):
        raise AdvlabError(f"seed must be an integer, got {seed!r}")
    g = torch.Generator(device=device)
    try:
        g.manual_seed(int(seed))
    except (RuntimeError, ValueError, OverflowError):  # out of range for a 64-bit seed
        raise AdvlabError(f"seed must be a 64-bit integer, got {seed!r}") from None
    return g


def progress_enabled(enabled: Optional[bool]) -> bool:
    """Whether to draw progress bars: as given, else on a terminal unless $ADVLAB_QUIET is set."""
    if enabled is None:
        return sys.stderr.isatty() and not os.environ.get("ADVLAB_QUIET")
    return bool(enabled)


def _cannot_write(path: Path, e: OSError) -> AdvlabError:
    why = e.strerror or type(e).__name__
    blocker = next((p for p in path.parents if p.exists()), None)
    if path.is_dir():
        why = "it is a directory"
    elif blocker is not None and not blocker.is_dir():
        why = f"{blocker} is a file, not a folder"
    return AdvlabError(f"cannot write {path}: {why}")


def _temp_beside(path: Path) -> str:
    """A new empty temporary file in ``path``'s folder (created if needed); OSError -> AdvlabError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _cannot_write(path, e) from None
    os.close(fd)
    return tmp


def _replace(tmp: str, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise _cannot_write(path, e) from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename; on any
    failure the temporary file is removed and ``path`` is left as it was (a failure to write is an
    AdvlabError naming ``path``)."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            raise _cannot_write(path, e) from None
        _replace(tmp, path)
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
    tmp = _temp_beside(path)
    try:
        yield Path(tmp)
        _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def unknown_name(kind: str, name: str, valid) -> AdvlabError:
    return AdvlabError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(valid))}")


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where it is not readable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakRSS:
    """Peak resident set size (bytes) of this process while the block runs, sampled every 5 ms by
    a thread (torch's CPU allocations are invisible to tracemalloc): ``base`` before, ``peak``
    during, ``above`` the difference. Zero where /proc is not available."""

    def __enter__(self) -> "PeakRSS":
        import threading

        self.base = _rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def above(self) -> int:
        return self.peak - self.base


# --------------------------------------------------------------------------- perturbation budgets

class EpsUnitWarning(UserWarning):
    """A budget that is almost certainly in the wrong units (8 meant as 8/255)."""


class DefenseHealthWarning(UserWarning):
    """A fitted defense in a regime where it is known to fail (e.g. M-SVDD-D detecting too few
    transferred adversarials at its chosen threshold); the message names the knob that helps."""


def parse_eps(value, name: str = "eps", check: bool = True) -> float:
    """A perturbation budget in pixel units from what people write: a number, or text such as
    ``"8/255"``, ``"0.3"``, ``"2e-2"``. The one parser of every command and spec; the result is a
    finite number >= 0 (errors name ``name``); ``check=False`` reads the number only and leaves
    its range to the caller's own check."""
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/")
                value = float(num) / float(den)
            else:
                value = float(text)
        except (ValueError, ZeroDivisionError):
            raise AdvlabError(f"{name} must be a number or a fraction such as 8/255, got {text!r}") from None
    return check_nonneg(value, name) if check else _as_float(value, name, "a number or a fraction such as 8/255")


def format_eps(eps: float) -> str:
    """``eps`` both ways: ``"8/255 = 0.03137"`` when it is a whole number of 255ths, else
    ``"0.3 (76.5/255)"``."""
    k = eps * 255.0
    if eps > 0 and abs(k - round(k)) < 1e-6 * max(1.0, k):
        return f"{int(round(k))}/255 = {eps:.4g}"
    return f"{eps:g} ({k:.4g}/255)"


def eps_unit_problem(eps: float, norm: str, shape) -> Optional[str]:
    """The unit mistake an ``eps`` for images of ``shape`` (C, H, W) in [0, 1] most likely makes,
    or None: an L-inf eps >= 1 covers the whole pixel range; an L2 eps above the diameter of the
    [0, 1] box, sqrt(C*H*W), covers every image."""
    if not math.isfinite(eps) or eps < 0:  # a bad number: its own check says so
        return None
    norm = str(norm).lower().lstrip("l")
    if norm == "inf":
        if eps >= 1.0:
            return (f"L-inf eps {eps:g} covers the whole [0, 1] pixel range (any image can become any other), "
                    f"so robust accuracy is 0 by construction; eps is in pixel units on [0, 1]: you probably "
                    f"meant {eps:g}/255 = {eps / 255:.4g}")
        return None
    if norm == "2":
        dims = 1
        for d in shape:
            dims *= int(d)
        diameter = math.sqrt(dims)
        if dims and eps > diameter:
            return (f"L2 eps {eps:g} is larger than the diameter of the [0, 1] image box (sqrt({dims}) = "
                    f"{diameter:.4g}): it covers every image, so robust accuracy is 0 by construction; eps is in "
                    f"pixel units on [0, 1]: if it was meant on the 0-255 scale, that is {eps:g}/255 = "
                    f"{eps / 255:.4g}")
    return None


def check_eps_units(eps: float, norm: str, shape, stacklevel: int = 3) -> Optional[str]:
    """Warn (:class:`EpsUnitWarning`) when ``eps`` is almost surely in the wrong units for images of
    ``shape`` (C, H, W) in [0, 1] (:func:`eps_unit_problem`); returns the message or None."""
    import warnings

    msg = eps_unit_problem(float(eps), str(norm), shape)
    if msg:
        warnings.warn(msg, EpsUnitWarning, stacklevel=stacklevel)
    return msg
