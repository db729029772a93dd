"""Every public function and class of advlab's documented packages has a docstring (issue 24).

The public names are each package's ``__all__`` (the API reference in ``docs/api/`` documents
exactly those), plus the public functions and classes of :mod:`advlab.train` and
:mod:`advlab.eval.runner`, which the tutorials use. For a public class, every public method and
property defined on it needs a docstring too; a method that overrides a documented one (``forward``
of an ``nn.Module``, a ``Defense``'s ``config``) inherits that docstring, as ``inspect.getdoc``
does. A class whose only docstring is its base class's does not count. Every parameter of a
public function is named in its docstring (``PARAMETER_GAPS`` lists the exceptions left).
"""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

PACKAGES = ["advlab.attacks", "advlab.defenses", "advlab.eval", "advlab.metrics", "advlab.models", "advlab.data",
            "advlab.adaptive", "advlab.distributed", "advlab.nn"]
MODULES_WITHOUT_ALL = ["advlab.train", "advlab.eval.runner"]


def public_names(module_name: str):
    """(qualified name, object) of the public functions and classes of ``module_name``."""
    mod = importlib.import_module(module_name)
    names = getattr(mod, "__all__", None)
    if names is None:  # the functions and classes the module defines itself
        names = [n for n, o in vars(mod).items() if not n.startswith("_")
                 and (inspect.isfunction(o) or inspect.isclass(o)) and o.__module__ == module_name]
    for name in names:
        obj = getattr(mod, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield f"{module_name}.{name}", obj


def missing_docstrings(module_name: str) -> list:
    """The public names of ``module_name`` (and of its public classes' members) without a docstring."""
    missing = []
    for qual, obj in public_names(module_name):
        own = obj.__doc__ if inspect.isfunction(obj) else vars(obj).get("__doc__")
        if not (own or "").strip():
            missing.append(qual)
        if not inspect.isclass(obj):
            continue
        for attr, value in vars(obj).items():
            if attr.startswith("_"):
                continue
            if isinstance(value, property):
                doc = value.__doc__ or _inherited_property_doc(obj, attr)
            elif isinstance(value, (classmethod, staticmethod)) or inspect.isfunction(value):
                doc = inspect.getdoc(getattr(obj, attr))
            else:
                continue
            if not (doc or "").strip():
                missing.append(f"{qual}.{attr}")
    return missing


def _inherited_property_doc(cls, attr):
    for base in cls.__mro__[1:]:
        value = vars(base).get(attr)
        if isinstance(value, property) and value.__doc__:
            return value.__doc__
    return None


@pytest.mark.parametrize("module_name", PACKAGES + MODULES_WITHOUT_ALL)
def test_every_public_name_has_a_docstring(module_name):
    missing = missing_docstrings(module_name)
    assert not missing, f"public names of {module_name} without a docstring: {', '.join(missing)}"


#: public functions whose parameters are not all named in their docstring yet, with the reason; the
#: list may only shrink (a new public function names every parameter it takes)
PARAMETER_GAPS: dict = {}


def unnamed_parameters(module_name: str) -> dict:
    """{qualified name: parameters not named in the docstring} of the public functions of ``module_name``
    (``*args`` / ``**kwargs`` excepted)."""
    out = {}
    for qual, obj in public_names(module_name):
        if not inspect.isfunction(obj):
            continue
        doc = obj.__doc__ or ""
        params = [p.name for p in inspect.signature(obj).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]
        missing = {p for p in params if not re.search(rf"\b{re.escape(p)}\b", doc)}
        if missing:
            out[qual] = missing
    return out


@pytest.mark.parametrize("module_name", PACKAGES)
def test_every_parameter_of_a_public_function_is_named_in_its_docstring(module_name):
    """A public function's docstring names each of its parameters (with its units where it has some)."""
    gaps = {q: m - PARAMETER_GAPS.get(q, set()) for q, m in unnamed_parameters(module_name).items()}
    gaps = {q: m for q, m in gaps.items() if m}
    assert not gaps, "parameters not named in the docstring: " + "; ".join(
        f"{q}: {', '.join(sorted(m))}" for q, m in sorted(gaps.items()))


def test_the_parameter_gaps_are_still_gaps():
    """PARAMETER_GAPS lists only parameters that are still undocumented (it may only shrink)."""
    import advlab.eval  # noqa: F401

    for qual, names in PARAMETER_GAPS.items():
        module, _, _ = qual.rpartition(".")
        still = unnamed_parameters(module).get(qual, set())
        assert names <= still, f"{qual}: remove the documented ones from PARAMETER_GAPS"


def test_the_check_sees_a_missing_docstring(monkeypatch):
    """The check itself: a public function without a docstring in a package's ``__all__`` is reported."""
    import advlab.metrics as metrics

    def undocumented(x):
        return x

    monkeypatch.setattr(metrics, "undocumented", undocumented, raising=False)
    monkeypatch.setattr(metrics, "__all__", [*metrics.__all__, "undocumented"])
    assert "advlab.metrics.undocumented" in missing_docstrings("advlab.metrics")


def test_every_package_is_in_the_api_reference():
    """Each checked package has its page in docs/api/ (mkdocs --strict fails on a page that is missing from nav)."""
    from pathlib import Path

    pages = "\n".join(p.read_text() for p in (Path(__file__).parents[1] / "docs" / "api").glob("*.md"))
    for name in PACKAGES + MODULES_WITHOUT_ALL:
        assert f"::: {name}" in pages, f"{name} has no ::: block in docs/api/"
