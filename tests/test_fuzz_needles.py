"""The bad-input catalogues themselves (``test_fuzz.CASES``, ``test_fuzz_cli.CLI_CASES``): every
needle (the regular expression a case's error message must match) has to name the argument at
fault, so that a message about something else cannot pass it. A needle fails here when one of its
alternatives has no anchor, an anchor being a literal word that is

- not a common English word (``STOP``: "must", "got", "value", ...),
- at least 3 characters long, or bounded on both sides (``\\bK\\b``, ``--n\\b``, ``^c must``), and
- bounded (by ``\\b``, ``^``, ``$`` or a literal non-word character) on each side where a longer
  word of the catalogues' vocabulary extends it (``eps`` inside ``steps``, ``samples`` inside
  ``eot_samples``, ``label`` inside ``labels``);

a needle also fails when it is shorter than 3 characters, and when a case named
``<entry point>/<argument>=<value>`` has a needle that never mentions ``<argument>``
(``sweep=negative`` passing on a message about ``eps``).
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Tuple

import pytest

#: common words that occur in almost every message: never enough to name an argument
STOP = frozenset("""
a an the and or not no of to in on at by for from with is are be must should got get gets given value values
error errors invalid bad wrong expected expect found one two any all none this that it its has have as if
number numbers integer integers float floats finite positive negative string text type shape size empty
""".split())

#: case ids whose argument is named otherwise than the id says (id -> reason)
NAMED_OTHERWISE: Dict[str, str] = {
    "ms_ssim/scales=6-without-weights": "the fault is the missing weights= (6 scales need 6 weights)",
    "visual_bound/ks=[0]": "the message names the offending k inside ks",
    "read_idx/ndim=0": "the id describes the file's header (0 dimensions), not an argument",
}

_BOUND, _LIT, _META = "\x00", "\x01", "\x02"


def _split_alternatives(needle: str) -> List[str]:
    """The top-level ``|`` alternatives of a regular expression."""
    out, depth, cur, i = [], 0, "", 0
    while i < len(needle):
        ch = needle[i]
        if ch == "\\" and i + 1 < len(needle):
            cur += needle[i:i + 2]
            i += 2
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "|" and depth == 0:
            out.append(cur)
            cur = ""
            i += 1
            continue
        cur += ch
        i += 1
    return out + [cur]


def _literal(alt: str) -> str:
    """``alt`` with ``\\b``, ``^`` and ``$`` as _BOUND, an escaped non-word character (``\\.``, ``\\(``) as _LIT, a
    character class or metacharacter as _META; other characters as themselves."""
    out, i = [], 0
    while i < len(alt):
        ch = alt[i]
        if ch == "\\" and i + 1 < len(alt):
            nxt = alt[i + 1]
            out.append(_BOUND if nxt == "b" else _META if nxt.isalnum() else _LIT)
            i += 2
            continue
        out.append(_BOUND if ch in "^$" else _META if ch in ".*+?()[]{}|" else ch)
        i += 1
    return "".join(out)


def _tokens(alt: str) -> Iterable[Tuple[str, bool, bool]]:
    """(word, bounded on the left, bounded on the right) for each literal word of a
    regular-expression alternative; a side is bounded by ``\\b`` or a literal non-word character
    (a space, ``-``, ``'``, ``\\.``), not by a metacharacter or the end of the alternative."""
    lit = _literal(alt)
    for m in re.finditer(r"[A-Za-z0-9_]+(?:\x01[A-Za-z0-9_]+)*", lit):   # a file name "x\\.pt" is one word
        left = lit[m.start() - 1] if m.start() > 0 else _META
        right = lit[m.end()] if m.end() < len(lit) else _META
        yield m.group().replace(_LIT, "."), left != _META, right != _META


def _words(text: str) -> List[str]:
    return re.findall(r"[A-Za-z0-9_]+", text)


def vocabulary(needles: Iterable[str], ids: Iterable[str]) -> set:
    """Every word of every needle and of every case id's bad input (its last part), lower case: the
    longer words a short needle could hide in."""
    vocab = set()
    for n in needles:
        vocab.update(w.lower() for alt in _split_alternatives(n) for w, _, _ in _tokens(alt))
    for cid in ids:
        vocab.update(w.lower() for w in _words(cid.split("/")[-1]))
    return vocab


def anchors(alt: str, vocab: set) -> List[str]:
    """The words of one alternative that name something specific (see the module docstring)."""
    out = []
    for w, left, right in _tokens(alt):
        lw = w.lower()
        if lw in STOP or lw.isdigit() or (len(w) < 3 and not (left and right)):
            continue
        # a longer word that extends this one on an unbounded side would match it too
        hidden = any(i >= 0 and ((i > 0 and not left) or (i + len(lw) < len(v) and not right))
                     for v in vocab if v != lw for i in _find_all(v, lw))
        if not hidden:
            out.append(w)
    return out


def _find_all(text: str, word: str) -> List[int]:
    return [m.start() for m in re.finditer(f"(?={re.escape(word)})", text)] or [-1]


def needle_problems(needle: str, vocab: set) -> List[str]:
    problems = []
    if len(needle) < 3:
        problems.append(f"needle {needle!r} is shorter than 3 characters")
    for alt in _split_alternatives(needle):
        if not anchors(alt, vocab):
            problems.append(f"alternative {alt!r} names nothing specific: common words, fewer than 3 characters "
                            "or a word that also occurs inside a longer one (bound it with \\b)")
    return problems


def argument_of(cid: str) -> List[str]:
    """The argument a case id names, as written and as its last ``-`` part ("pgd/eps=nan" -> eps,
    "cli/attack/c=0-cw" -> c, "msvdd/fit-svdd_epochs=-1" -> svdd_epochs, "cli/train/batch-size=0"
    -> batch-size or size); empty when the id names none ("load_checkpoint/missing")."""
    last = cid.split("/")[-1]
    if "=" not in last:
        return []
    name = last.split("=", 1)[0]
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
        return []
    return sorted({name, name.rsplit("-", 1)[-1]})


def names_argument(needle: str, args: List[str]) -> bool:
    """Whether every alternative of ``needle`` mentions one of ``args`` (``-`` and ``_`` alike)."""
    norm = lambda s: s.lower().replace("-", "_")  # noqa: E731
    return all(any(norm(a) in norm(_literal(alt).replace(_BOUND, "").replace(_LIT, "").replace(_META, " "))
                   for a in args) for alt in _split_alternatives(needle))


def _catalogues():
    from test_fuzz import CASES
    from test_fuzz_cli import CLI_CASES
    from test_fuzz_load import LOAD_CASES, LOAD_CLI_CASES

    return {cid: c.match for cat in (CASES, CLI_CASES, LOAD_CASES, LOAD_CLI_CASES) for cid, c in cat.items()}


def test_the_checker_catches_weak_needles():
    vocab = vocabulary([r"\bsteps\b", r"eot_samples", r"labels"], ["pgd/eps=1"])
    assert needle_problems(r"\beps\b", vocab) == []
    assert needle_problems("eps", vocab)                    # matches inside "steps"
    assert needle_problems("samples", vocab)                # inside "eot_samples"
    assert needle_problems(r"\bsamples\b", vocab) == []
    assert needle_problems("label", vocab)                  # inside "labels"
    assert needle_problems("x", vocab) and needle_problems("c", vocab)
    assert needle_problems(r"\bx\b", vocab) == [] and needle_problems(r"--n\b", vocab) == []
    assert needle_problems("must", vocab) and needle_problems(r"value.*error", vocab)
    assert needle_problems(r"theta|got", vocab)            # one alternative names nothing
    assert needle_problems(r"x\.pt", vocab) == []           # a file name bounded by the escaped dot
    assert argument_of("evaluate/sweep=negative") == ["sweep"] and argument_of("cli/attack/c=0-cw") == ["c"]
    assert argument_of("msvdd/fit-svdd_epochs=-1") == ["fit-svdd_epochs", "svdd_epochs"]
    assert argument_of("pgd/x=3d") == ["x"] and argument_of("load_checkpoint/missing") == []
    assert not names_argument("eps", ["sweep"]) and names_argument(r"--sweep", ["sweep"])
    assert names_argument(r"batch_size", ["batch-size", "size"]) and not names_argument(r"theta|nope", ["theta"])


@pytest.fixture(scope="module")
def catalogue() -> Dict[str, str]:
    return _catalogues()


def test_every_needle_names_something_specific(catalogue):
    vocab = vocabulary(catalogue.values(), catalogue)
    bad = {cid: p for cid, needle in catalogue.items() if (p := needle_problems(needle, vocab))}
    assert not bad, "\n".join(f"{cid}: {'; '.join(p)}" for cid, p in sorted(bad.items()))


def test_every_needle_names_the_argument_its_case_id_names(catalogue):
    bad = {cid: needle for cid, needle in catalogue.items()
           if (arg := argument_of(cid)) and cid not in NAMED_OTHERWISE and not names_argument(needle, arg)}
    assert not bad, "\n".join(f"{cid}: {needle!r} does not mention {' or '.join(argument_of(cid))}"
                              for cid, needle in sorted(bad.items()))
    # the exceptions are real and still needed
    assert all(not names_argument(catalogue[cid], argument_of(cid)) for cid in NAMED_OTHERWISE)
