"""MkDocs hooks of advlab's documentation (``hooks:`` in mkdocs.yml).

- The CLI reference (``docs/cli.md``) is generated at build time from the argparse parser of
  :mod:`advlab.cli`: the marker ``<!-- advlab-cli-reference -->`` is replaced by every command's
  ``--help``, so the page cannot drift from the code.
- Sphinx roles left in docstrings (``:func:`x```) are shown as plain code in the API reference.
"""

from __future__ import annotations

import os
import re

MARKER = "<!-- advlab-cli-reference -->"


def cli_reference() -> str:
    """Markdown of ``advlab --help`` and of every subcommand's ``--help``, in the parser's order."""
    import argparse

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width: fix it so the page is stable
    from advlab.cli import build_parser

    parser = build_parser()
    parts = ["### advlab", "", "```text", parser.format_help().rstrip(), "```", ""]
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subs:
        for name, sub in action.choices.items():
            parts += [f"### advlab {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files):
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_reference())
    return markdown


_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|obj|exc|py:\w+):<code>~?")


def on_page_content(html, page, config, files):
    return _ROLE.sub("<code>", html)
