"""The paper reproductions: one module per paper (its protocol, tables and prose) and its spec in
``specs/NAME.yaml`` (parameters, the paper's numbers, ``quick:`` overrides).

This is the registry that ``advlab reproduce`` reads. Nothing below this floor imports it: the
engine (:mod:`advlab.eval`) runs a spec on whatever runner it is given and knows no paper. A new
paper is one module with ``run(spec, out_dir, data_root=None, device=None) -> Report`` plus one
YAML, and one line in :data:`PAPERS`.
"""

from __future__ import annotations

import importlib
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .._util import AdvlabError, unknown_name
from ..eval.specs import apply_quick, load_spec, resolve_user_spec, run_spec

#: bundled reproduction name (its spec's file stem) -> the module of advlab.papers that runs it
PAPERS: Dict[str, str] = {
    "ka3-attack": "ka3",
    "msvdd": "msvdd",
    "pcl": "pcl",
    "vib": "vib",
    "idefender": "idefender",
}

__all__ = ["PAPERS", "bundled_specs", "list_reproductions", "resolve_spec", "reproduce"]


def bundled_specs() -> Dict[str, Path]:
    """Spec file of every bundled reproduction, by name."""
    folder = resources.files(__name__) / "specs"
    found = {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}
    missing = set(PAPERS) - set(found)
    if missing:  # a packaging bug, not a user error
        raise AdvlabError(f"advlab is installed without the spec(s) of {', '.join(sorted(missing))}")
    return {name: found[name] for name in PAPERS}


def list_reproductions() -> List[Tuple[str, str]]:
    """(name, description) of every bundled reproduction."""
    return [(name, load_spec(path).get("description", "")) for name, path in sorted(bundled_specs().items())]


def resolve_spec(name: str, quick: bool = False, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A bundled reproduction by name, or a user's spec file by path (``.yaml``/``.yml``)."""
    specs = bundled_specs()
    if name in specs:
        return apply_quick(load_spec(specs[name]), name, quick, overrides)
    path = Path(str(name))
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return resolve_user_spec(path, quick, overrides)
    raise unknown_name("reproduction", name, specs)


def runner_for(name: str):
    """The ``run`` function of bundled reproduction ``name`` (None for a user spec)."""
    module = PAPERS.get(name)
    return None if module is None else importlib.import_module(f"{__name__}.{module}").run


def reproduce(name: str, out_dir, quick: bool = False, data_root=None, device=None, overrides=None,
              resume: bool = True, fresh: bool = False):
    """Run the bundled reproduction ``name`` (or a spec file) into ``out_dir``, resuming from the
    stages a previous run of the same spec into the same folder finished (``fresh``: start over)."""
    spec = resolve_spec(name, quick, overrides)
    return run_spec(spec, out_dir, runner_for(name), data_root, device, resume=resume, fresh=fresh)
