"""Experiment specs (YAML): parsing, ``quick:`` overrides and running one on a runner inside the
stage cache.

A spec is a YAML mapping with its parameters and an optional ``quick:`` mapping of overrides
applied by ``--quick``. A user's spec runs on the generic :mod:`advlab.eval.experiment` runner; the
bundled paper reproductions (:mod:`advlab.papers`) pass their own runner to :func:`run_spec`. The
engine knows no paper.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import yaml

from .._util import AdvlabError


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


#: the keys an entry of a spec's ``attacks`` list may have (the generic runner's and the bundled
#: reproductions' together); anything else is a typo or a YAML flow mapping split at a comma
ATTACK_ENTRY_KEYS = frozenset({"name", "kind", "params", "threat", "source", "targeted", "norm", "eps", "steps"})


def check_attack_entries(spec: Any, where: str = "spec") -> None:
    """Reject, anywhere in ``spec``, an ``attacks`` list entry with a key outside
    :data:`ATTACK_ENTRY_KEYS` or a name that is not a string. An unquoted name holding ", " in a
    YAML flow mapping (``{name: C&W (l2, ART defaults), ...}``) splits into two keys and would
    otherwise run under a wrong name."""
    if isinstance(spec, dict):
        for k, v in spec.items():
            if k == "attacks" and isinstance(v, list):
                for i, a in enumerate(v):
                    if not isinstance(a, dict):
                        continue
                    bad = sorted(str(x) for x in set(a) - ATTACK_ENTRY_KEYS)
                    if bad:
                        raise AdvlabError(f"{where}.attacks[{i}] has unknown key(s) {bad}; valid: "
                                          f"{', '.join(sorted(ATTACK_ENTRY_KEYS))} (quote a name that holds ', ' "
                                          f"or ': ' in a {{...}} entry)")
                    if "name" in a and not isinstance(a["name"], str):
                        raise AdvlabError(f"{where}.attacks[{i}].name must be a string, got {a['name']!r}")
            else:
                check_attack_entries(v, f"{where}.{k}")
    elif isinstance(spec, list):
        for i, v in enumerate(spec):
            check_attack_entries(v, f"{where}[{i}]")


def deep_update(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_quick(spec: Dict[str, Any], name: str, quick: bool = False,
                overrides: Dict[str, Any] | None = None) -> Dict[str, Any]:
    """``spec`` with its ``quick:`` overrides applied when ``quick``, then ``overrides``; records
    ``quick`` and ``name`` in it (the form a runner and the stage cache's key see)."""
    check_attack_entries(spec, name)
    spec = dict(spec)
    quick_over = spec.pop("quick", {}) or {}
    if not isinstance(quick_over, dict):
        raise AdvlabError(f"spec key 'quick' must be a mapping of overrides, got {type(quick_over).__name__}")
    if quick:
        spec = deep_update(spec, quick_over)
    spec["quick"] = bool(quick)
    spec["name"] = name
    return deep_update(spec, overrides or {})


def resolve_user_spec(path, quick: bool = False, overrides: Dict[str, Any] | None = None) -> Dict[str, Any]:
    """A user's spec file (``.yaml``/``.yml``), to run on the generic :mod:`advlab.eval.experiment`
    runner."""
    path = Path(str(path))
    if not path.is_file():
        raise AdvlabError(f"spec file not found: {path}")
    spec = load_spec(path)
    if "runner" in spec:
        raise AdvlabError(f"spec key 'runner' ({spec['runner']!r}) is not for user specs: a spec file runs on the "
                          f"generic experiment runner; a bundled paper reproduction is run by its name")
    return apply_quick(spec, str(spec.get("name", path.stem)), quick, overrides)


def run_spec(spec: Dict[str, Any], out_dir, runner: Optional[Callable] = None, data_root=None, device=None,
             resume: bool = True, fresh: bool = False):
    """Run a resolved spec with ``runner(spec, out_dir, data_root=, device=) -> Report`` (default: the
    generic experiment runner); returns the saved Report.

    ``resume``: keep finished stages in ``out_dir/.stages`` and reuse them when the same spec runs
    again into the same folder (:mod:`advlab.eval.stages`); ``fresh``: empty that cache first."""
    from .stages import stage_cache

    if runner is None:
        from .experiment import run as runner
    root = None if data_root is None else Path(data_root)
    if not resume:
        return runner(spec, Path(out_dir), data_root=root, device=device)
    with stage_cache(out_dir, spec, fresh=fresh):
        return runner(spec, Path(out_dir), data_root=root, device=device)
