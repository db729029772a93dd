"""Download a whole dataset: every official file of its splits, checked, and CIFAR-10's tarball
extracted. It sits above both the file downloads (:mod:`advlab.data.download`) and the CIFAR-10
reader (:mod:`advlab.data.cifar`), which uses the downloads, so that neither imports the other back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

from .._util import unknown_name
from .download import SOURCES, default_root, ensure_files


def download_dataset(name: str, root: str | os.PathLike | None = None, splits: Sequence[str] | None = None,
                     mirrors=None, timeout: float = 60.0, progress: Optional[bool] = None) -> List[Path]:
    """Download every official file of ``name`` (or of the given ``splits``) into ``root``
    (default :func:`default_root`), skipping files already there. Returns the paths.
    CIFAR-10's tarball is also extracted (after its checksum is verified).

    ``mirrors``: base URLs or folders that replace the official mirrors (also ``$ADVLAB_MIRROR``);
    ``timeout``: seconds per request; ``progress``: tqdm bars (default: on a terminal). Raises
    ``AdvlabError`` when a file cannot be fetched or fails its checksum."""
    root = Path(root) if root is not None else default_root(name)
    if name not in SOURCES:
        raise unknown_name("downloadable dataset", name, SOURCES)
    if name == "cifar10":
        from .cifar import ensure_cifar10

        return [ensure_cifar10(root, download=True, mirrors=mirrors, timeout=timeout, progress=progress)]
    paths: List[Path] = []
    for split in (splits or [s for s in SOURCES[name].files if s != "extra"]):
        for p in ensure_files(name, root, split, download=True, mirrors=mirrors, timeout=timeout,
                              progress=progress):
            if p not in paths:
                paths.append(p)
    return paths
