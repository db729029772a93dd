"""A griffe extension for advlab's API reference (mkdocs.yml, mkdocstrings ``extensions``).

advlab documents class attributes and dataclass fields with Sphinx's ``#:`` comments on the lines
above them, which griffe does not read: an attribute without a docstring gets those comment lines
as its docstring here.

advlab's docstrings show examples as doctest lines (``>>> ...`` and ``... ...``) and as
reStructuredText ``.. code-block:: LANG`` directives, neither of which Markdown renders as code:
a ``[0]["key"]`` in an example would even be read as a link. This extension turns each run of
doctest lines, and each indented code-block directive, into a fenced code block before
mkdocstrings renders the docstring. The source files are not changed.
"""

from __future__ import annotations

import re

import griffe

_DIRECTIVE = re.compile(r"^(\s*)\.\. code-block::\s*(\w+)\s*$")


def fence(text: str) -> str:
    """``text`` with its doctest runs and code-block directives as Markdown fences."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        m = _DIRECTIVE.match(line)
        if m:
            indent, lang = len(m.group(1)), m.group(2)
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            block = []
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
            width = min((len(b) - len(b.lstrip()) for b in block if b.strip()), default=0)
            out += [f"```{lang}", *[b[width:] for b in block], "```", ""]
            i = j
            continue
        if line.lstrip().startswith(">>>"):
            indent = len(line) - len(line.lstrip())
            block = []
            while i < len(lines) and lines[i].lstrip().startswith((">>>", "...")) and lines[i].strip():
                block.append(lines[i][indent:])
                i += 1
            out += ["```python", *block, "```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def attribute_comment(lines, lineno: int):
    """The ``#:`` comment lines right above line ``lineno`` (1-based) of ``lines``, joined, or None."""
    found, i = [], lineno - 2
    while i >= 0 and lines[i].lstrip().startswith("#:"):
        found.append(lines[i].lstrip()[2:].strip())
        i -= 1
    return " ".join(reversed(found)) or None


class DoctestFences(griffe.Extension):
    """Fence the doctest examples and code-block directives of every docstring; give attributes
    their ``#:`` comments as docstrings."""

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs) -> None:
        if attr.docstring is None and attr.lineno:
            try:
                text = attribute_comment(attr.lines_collection[attr.filepath], attr.lineno)
            except (KeyError, TypeError, IndexError, AttributeError):
                text = None
            if text:
                attr.docstring = griffe.Docstring(text, lineno=attr.lineno, parent=attr)

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence(obj.docstring.value)
