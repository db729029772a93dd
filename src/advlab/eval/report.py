"""Result folders: ``results.json`` (every number, the spec that made it, versions, seed, timings),
``report.md`` (Markdown tables), one CSV per table and PNG figures (matplotlib, Agg backend).

>>> rep = Report("results/demo", name="demo", spec={"dataset": "digits"})
>>> rep.add_table("Clean accuracy", [{"model": "lenet5", "acc": 0.97}])
>>> rep.add_figure("examples", fig)           # a matplotlib Figure
>>> rep.save()                                # writes everything atomically
"""

from __future__ import annotations

import contextlib

import csv
import io
import json
import math
import platform
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import __version__
from .._util import AdvlabError, atomic_write_bytes, atomic_write_text


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s or "table"


def format_value(v: Any, digits: int = 4) -> str:
    """Human formatting for table cells: floats to ``digits`` significant places, NaN as '-'."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(v)


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (dicts), columns in the given order."""
    if not rows:
        return "_(no rows)_\n"
    if columns is None:
        columns = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
    head = "| " + " | ".join(str(c).replace("|", "\\|") for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format_value(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() != 1 else obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        try:
            return obj.item()
        except Exception:
            return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def environment() -> Dict[str, str]:
    """Versions and machine facts recorded in every results.json."""
    import numpy

    env = {"advlab": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
           "python": platform.python_version(), "platform": platform.platform(),
           "threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


class Report:
    """Collects tables, figures, text and raw results; :meth:`save` writes the folder."""

    def __init__(self, out_dir, name: str, spec: Optional[Dict[str, Any]] = None, seed: Optional[int] = None):
        self.out_dir = Path(out_dir)
        self.name = name
        self.spec = dict(spec or {})
        self.seed = seed
        self.results: Dict[str, Any] = {}
        self.sections: List[tuple] = []  # ("table"|"figure"|"text", payload)
        self.tables: Dict[str, dict] = {}
        self.figures: Dict[str, bytes] = {}
        self.timings: Dict[str, float] = {}
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def use_threads(self, n: Optional[int]):
        """Run the block with ``n`` torch threads (None: as they are), record the number in the
        report, and restore the previous setting afterwards."""
        before = torch.get_num_threads()
        if n:
            torch.set_num_threads(int(n))
        self.results["torch_threads"] = torch.get_num_threads()
        try:
            yield self.results["torch_threads"]
        finally:
            torch.set_num_threads(before)

    # ------------------------------------------------------------------ building
    def add_text(self, markdown: str) -> None:
        self.sections.append(("text", markdown.rstrip() + "\n"))

    def add_table(self, title: str, rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None,
                  note: str = "", key: Optional[str] = None) -> str:
        """Add a table (Markdown in report.md, ``<key>.csv``, rows in results.json). Returns the key."""
        key = key or _slug(title)
        base, i = key, 2
        while key in self.tables:
            key, i = f"{base}-{i}", i + 1
        rows = [dict(r) for r in rows]
        if columns is None:
            columns = []
            for r in rows:
                columns.extend(k for k in r if k not in columns)
        self.tables[key] = {"title": title, "columns": list(columns), "rows": rows, "note": note}
        self.sections.append(("table", key))
        return key

    def add_figure(self, name: str, fig, caption: str = "", dpi: int = 110) -> str:
        """Render a matplotlib Figure to ``<name>.png`` and close it."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        fname = f"{_slug(name)}.png"
        self.figures[fname] = buf.getvalue()
        self.sections.append(("figure", (fname, caption or name)))
        return fname

    def time(self, label: str, seconds: float) -> None:
        self.timings[label] = self.timings.get(label, 0.0) + float(seconds)

    # ------------------------------------------------------------------ output
    def markdown(self) -> str:
        lines = [f"# {self.name}\n"]
        for kind, payload in self.sections:
            if kind == "text":
                lines.append(payload)
            elif kind == "table":
                t = self.tables[payload]
                lines.append(f"## {t['title']}\n")
                lines.append(markdown_table(t["rows"], t["columns"]))
                if t["note"]:
                    lines.append(t["note"].rstrip() + "\n")
            else:
                fname, caption = payload
                lines.append(f"![{caption}]({fname})\n")
        env = environment()
        if "torch_threads" in self.results:  # what the work ran with, not the restored setting
            env["threads"] = str(self.results["torch_threads"])
        lines.append("---\n")
        resumed = self._resumed()
        lines.append(f"advlab {env['advlab']}, torch {env['torch']}, {env['platform']}, "
                     f"{env['threads']} threads; total {time.perf_counter() - self._t0:.1f} s"
                     + (f" ({resumed['read']} of {resumed['read'] + resumed['computed']} stages read back from an "
                        "earlier run's stage cache: their timings are that run's, the total is this one's)"
                        if resumed and resumed["read"] else "") + ".\n")
        return "\n".join(lines)

    @staticmethod
    def _resumed() -> Optional[Dict[str, Any]]:
        """Which stages of the running reproduction were read back rather than computed."""
        from .stages import active_cache

        cache = active_cache()
        if cache is None:
            return None
        return {"read": len(cache.hits), "computed": len(cache.computed), "read_back": list(cache.hits)}

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "spec": self.spec, "seed": self.seed, "environment": environment(),
                "stages": self._resumed(),
                "timings": self.timings, "seconds_total": time.perf_counter() - self._t0,
                "tables": self.tables, "results": self.results,
                "figures": sorted(self.figures)}

    def save(self) -> Path:
        """Write results.json, report.md, the CSVs and PNGs into ``out_dir`` (each atomically)."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
            raise AdvlabError(f"cannot create the report folder {self.out_dir}: {why}") from None
        for key, t in self.tables.items():
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=t["columns"], extrasaction="ignore")
            w.writeheader()
            for r in t["rows"]:
                w.writerow({c: _jsonable(r.get(c)) for c in t["columns"]})
            atomic_write_text(self.out_dir / f"{key}.csv", buf.getvalue())
        for fname, data in self.figures.items():
            atomic_write_bytes(self.out_dir / fname, data)
        stale = self._earlier_outputs() - {f"{k}.csv" for k in self.tables} - set(self.figures)
        atomic_write_text(self.out_dir / "report.md", self.markdown())
        atomic_write_text(self.out_dir / "results.json", json.dumps(_jsonable(self.to_dict()), indent=2))
        for fname in stale:  # a table or figure an earlier report in this folder had and this one has not
            with contextlib.suppress(FileNotFoundError):
                (self.out_dir / fname).unlink()
        return self.out_dir

    def _earlier_outputs(self) -> set:
        """The CSV and PNG names the report already in ``out_dir`` wrote (from its results.json);
        nothing else in the folder is ever removed."""
        try:
            old = json.loads((self.out_dir / "results.json").read_text())
            names = {f"{k}.csv" for k in old.get("tables", {})} | set(old.get("figures", []))
        except (OSError, ValueError, AttributeError, TypeError):
            return set()
        return {n for n in names if isinstance(n, str) and n == Path(n).name and n.endswith((".csv", ".png"))}


def with_paper(ours: Dict[str, Any], paper: Dict[str, Any], keys: Sequence[str]) -> Dict[str, Any]:
    """Merge a row of our numbers with the paper's: for each key k, ``k`` (ours) and ``k (paper)``."""
    row = {k: v for k, v in ours.items() if k not in keys}
    for k in keys:
        row[k] = ours.get(k)
        row[f"{k} (paper)"] = paper.get(k)
    return row


def pct(v: Optional[float]) -> Optional[float]:
    """A fraction as a percentage for a table; None and NaN become None (an empty cell)."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else 100.0 * float(v)


def renamed(rows: Sequence[Dict[str, Any]], names: Dict[str, Optional[str]]) -> List[Dict[str, Any]]:
    """Display rows of result rows: each stable key renamed by ``names`` (a key mapped to None is
    dropped; unlisted keys stay), a nested mapping spread into one column per entry, named by
    formatting its key's name with the entry's key (``"FPR {}"``)."""
    out = []
    for r in rows:
        d: Dict[str, Any] = {}
        for k, v in r.items():
            name = names.get(k, k)
            if name is not None:
                d.update({name.format(q): w for q, w in v.items()} if isinstance(v, dict) else {name: v})
        out.append(d)
    return out
