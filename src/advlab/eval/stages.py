"""Resumable reproductions: a stage cache in the report folder.

``advlab reproduce`` runs a spec inside :func:`stage_cache`. A runner wraps each expensive,
self-contained piece of work (one experiment, one trained model, one attack sweep) in
:func:`stage`::

    result = stage(f"{exp['name']}/seed{seed}", lambda: run_experiment(exp, spec, ...))

The first run computes the value and writes it to ``OUT/.stages/<name>-<key>.pt`` (atomically,
``torch.save``); a run interrupted later (Ctrl-C, SIGTERM, a crash) and started again with the same
spec reads the finished stages back (``torch.load(weights_only=True)``: plain containers, numbers,
strings and tensors only, never code) and computes only the rest. Outside :func:`stage_cache`
(the library used directly), :func:`stage` just calls the function.

The key of a stage is a digest of the spec (every field but the ones that change no number:
``quiet``), advlab's version and the stage's name. A stage runs with torch's global random stream
forked and seeded from that key (restored afterwards, so the caller's stream is untouched): the
bundled runners seed their work explicitly, but a stage that draws from the global stream (an
unseeded dropout, a ``torch.randperm`` without a generator) then still gives the same numbers
whether it runs in an uninterrupted run or in a resumed one, where the stages before it were read
back instead of computed (torch seeds its global stream afresh in every process). ``--fresh``
empties the cache first.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from .. import __version__
from .._util import AdvlabError, atomic_path

__all__ = ["StageCache", "stage", "stage_cache", "active_cache", "STAGE_FOLDER"]

#: the cache's folder inside a report folder
STAGE_FOLDER = ".stages"
#: spec fields that change no number (left out of the key)
_VOLATILE = ("quiet",)

_ACTIVE: contextvars.ContextVar[Optional["StageCache"]] = contextvars.ContextVar("advlab_stage_cache", default=None)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()


def _plain(value: Any, where: str = "value") -> Any:
    """``value`` as what ``torch.load(weights_only=True)`` reads back: dicts, lists, tuples,
    tensors, numbers, strings, None; numpy scalars and arrays become Python numbers and tensors.
    Anything else is an error naming where it sits (a stage must hold data, never objects)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if isinstance(value, list) else tuple(out)
    mod = type(value).__module__
    if mod == "numpy":
        import numpy as np

        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise AdvlabError(f"stage value {where} is a {type(value).__name__}: a stage may hold only dicts, lists, "
                      f"tuples, tensors, numbers and strings")


class StageCache:
    """The finished stages of one reproduction, kept in ``out_dir/.stages``."""

    def __init__(self, out_dir, spec: Dict[str, Any], fresh: bool = False):
        self.folder = Path(out_dir) / STAGE_FOLDER
        if fresh and self.folder.exists():
            shutil.rmtree(self.folder)
        keyed = {k: v for k, v in spec.items() if k not in _VOLATILE}
        try:
            text = json.dumps(keyed, sort_keys=True, default=str)
        except (TypeError, ValueError) as e:  # a spec is parsed YAML: this would be a bug
            raise AdvlabError(f"the spec cannot key a stage cache: {e}") from None
        self.spec_key = _digest(text.encode(), __version__.encode())
        self.hits: List[str] = []
        self.computed: List[str] = []

    def key(self, name: str) -> str:
        return _digest(self.spec_key.encode(), name.encode())[:16]

    def path(self, name: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:60] or "stage"
        return self.folder / f"{slug}-{self.key(name)}.pt"

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        path = self.path(name)
        if path.is_file():
            try:
                value = torch.load(path, map_location="cpu", weights_only=True)["value"]
            except Exception:  # truncated or foreign file: recompute it
                path.unlink(missing_ok=True)
            else:
                self.hits.append(name)
                return value
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(int(self.key(name), 16) % (2 ** 63))
            value = _plain(fn())
        buf = io.BytesIO()
        torch.save({"name": name, "value": value}, buf)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buf.getvalue())
        self.computed.append(name)
        return value

    def clean_partial(self) -> None:
        """Remove temporary files a killed process left behind (never a finished stage)."""
        if self.folder.is_dir():
            for p in self.folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)


@contextlib.contextmanager
def stage_cache(out_dir, spec: Dict[str, Any], fresh: bool = False) -> Iterator[StageCache]:
    """Make :func:`stage` cache into ``out_dir/.stages`` for the block (see the module docstring)."""
    cache = StageCache(out_dir, spec, fresh=fresh)
    cache.clean_partial()
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def active_cache() -> Optional[StageCache]:
    """The stage cache of the reproduction running now, if any."""
    return _ACTIVE.get()


def stage(name: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or its value from the active stage cache (see :func:`stage_cache`). Inside a cache,
    the value is stored as plain data: dicts, lists, tuples, tensors (moved to the CPU), numbers and
    strings; it is returned in that form on the first run too, so both runs see the same value."""
    cache = _ACTIVE.get()
    if cache is None:
        return fn()
    return cache.run(name, fn)
