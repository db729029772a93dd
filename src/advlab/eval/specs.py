"""Experiment specs (YAML) and the registry of bundled paper reproductions.

A spec is a YAML mapping. A bundled reproduction ``NAME`` has ``specs/NAME.yaml`` with a top-level
``runner`` (a module of ``advlab.eval`` exposing ``run(spec, out_dir, data_root, device) -> Report``),
a ``description``, its parameters, and a ``quick:`` mapping of overrides applied by ``--quick``.
"""

from __future__ import annotations

import copy
import importlib
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List

import yaml

from .._util import AdvlabError, unknown_name


def load_spec(path_or_text) -> Dict[str, Any]:
    """Parse a YAML spec file (or text) into a dict, with a clear error on bad YAML."""
    p = Path(str(path_or_text)) if len(str(path_or_text)) < 4096 else None
    try:
        text = p.read_text() if p is not None and p.is_file() else str(path_or_text)
    except UnicodeDecodeError:
        raise AdvlabError(f"{p} is not a text (YAML) file") from None
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise AdvlabError(f"bad experiment spec: {e}") from None
    if not isinstance(spec, dict):
        raise AdvlabError("an experiment spec must be a YAML mapping")
    return spec


def deep_update(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def bundled_specs() -> Dict[str, Path]:
    folder = resources.files("advlab.eval") / "specs"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def list_reproductions() -> List[tuple]:
    """(name, description) of every bundled reproduction."""
    out = []
    for name, path in sorted(bundled_specs().items()):
        out.append((name, load_spec(path).get("description", "")))
    return out


def resolve_spec(name: str, quick: bool = False, overrides: Dict[str, Any] | None = None) -> Dict[str, Any]:
    """A bundled reproduction by name, or a user's spec file by path (``.yaml``/``.yml``); a spec
    without ``runner:`` runs on the generic :mod:`advlab.eval.experiment` runner."""
    specs = bundled_specs()
    path = Path(str(name))
    if name in specs:
        spec = load_spec(specs[name])
    elif path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise AdvlabError(f"spec file not found: {path}")
        spec = load_spec(path)
        spec.setdefault("runner", "experiment")
        name = spec.get("name", path.stem)
    else:
        raise unknown_name("reproduction", name, specs)
    quick_over = spec.pop("quick", {}) or {}
    if not isinstance(quick_over, dict):
        raise AdvlabError(f"spec key 'quick' must be a mapping of overrides, got {type(quick_over).__name__}")
    if quick:
        spec = deep_update(spec, quick_over)
    spec["quick"] = bool(quick)
    spec["name"] = name
    return deep_update(spec, overrides or {})


def run_spec(spec: Dict[str, Any], out_dir, data_root=None, device=None, resume: bool = True, fresh: bool = False):
    """Run a resolved spec with its runner module; returns the saved Report.

    ``resume``: keep finished stages in ``out_dir/.stages`` and reuse them when the same spec runs
    again into the same folder (:mod:`advlab.eval.stages`); ``fresh``: empty that cache first."""
    from .stages import stage_cache

    runner = spec.get("runner")
    if not runner:
        raise AdvlabError("spec has no 'runner'")
    try:
        mod = importlib.import_module(f"advlab.eval.{runner}")
    except ModuleNotFoundError:
        raise AdvlabError(f"spec runner {runner!r} is not an advlab.eval module") from None
    root = None if data_root is None else Path(data_root)
    if not resume:
        return mod.run(spec, Path(out_dir), data_root=root, device=device)
    with stage_cache(out_dir, spec, fresh=fresh):
        return mod.run(spec, Path(out_dir), data_root=root, device=device)


def reproduce(name: str, out_dir, quick: bool = False, data_root=None, device=None, overrides=None,
              resume: bool = True, fresh: bool = False):
    """Run the bundled reproduction ``name`` (or a spec file) into ``out_dir``, resuming from the
    stages a previous run of the same spec into the same folder finished (``fresh``: start over)."""
    return run_spec(resolve_spec(name, quick, overrides), out_dir, data_root, device, resume=resume, fresh=fresh)
