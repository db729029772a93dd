import json
import math

import pytest
import torch

from advlab._util import AdvlabError
from advlab.eval.figures import bar_chart, example_grid, line_chart
from advlab.eval.report import Report, format_value, markdown_table, with_paper
from advlab.eval.specs import apply_quick, deep_update, load_spec


def test_markdown_table_and_formatting():
    md = markdown_table([{"a": 1, "b": 0.123456}, {"a": "x|y", "b": float("nan")}], ["a", "b"])
    assert md.splitlines()[0] == "| a | b |"
    assert "| 1 | 0.1235 |" in md and "x\\|y" in md and "| - |" in md
    assert format_value(None) == "-" and format_value(True) == "yes" and format_value(12.3456) == "12.35"


def test_report_writes_every_artifact(tmp_path):
    rep = Report(tmp_path / "r", "test report", spec={"k": 1}, seed=3)
    rep.add_text("Some **text**.")
    rep.add_table("Accuracy table", [with_paper({"model": "m", "acc": 0.9}, {"acc": 0.95}, ["acc"])])
    rep.add_table("Accuracy table", [{"x": torch.tensor(2.5)}])  # same title twice gets its own key
    rep.add_figure("grid", example_grid(torch.rand(3, 1, 8, 8), {"a": torch.rand(3, 1, 8, 8)}))
    rep.add_figure("bars", bar_chart({"s": [0.1, 0.2]}, ["1", "2"]))
    rep.add_figure("lines", line_chart({"s": ([0, 1], [1, 0])}))
    rep.results["tensor"] = torch.arange(3)
    rep.results["nan"] = math.nan
    out = rep.save()
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "report.md", "accuracy-table.csv", "accuracy-table-2.csv", "grid.png", "bars.png",
            "lines.png"} <= names
    data = json.loads((out / "results.json").read_text())
    assert data["spec"] == {"k": 1} and data["seed"] == 3 and data["results"]["tensor"] == [0, 1, 2]
    assert data["results"]["nan"] is None and "torch" in data["environment"]
    assert data["tables"]["accuracy-table"]["rows"][0]["acc (paper)"] == 0.95
    md = (out / "report.md").read_text()
    assert "| model | acc | acc (paper) |" in md and "![grid](grid.png)" in md
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("*.tmp"))
    # a later report into the same folder removes the tables and figures it no longer has, nothing else
    (out / "notes.txt").write_text("mine")
    again = Report(out, "second report")
    again.add_table("Accuracy table", [{"acc": 1.0}])
    again.save()
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "report.md", "accuracy-table.csv", "notes.txt"} <= names
    assert not names & {"accuracy-table-2.csv", "grid.png", "bars.png", "lines.png"}


def test_spec_attack_entries_with_unknown_keys_are_rejected():
    """An unquoted name with ', ' in a YAML flow mapping splits into two keys: the spec is refused,
    in the top level, nested and quick: lists alike, and every bundled spec passes."""
    from advlab.papers import list_reproductions, resolve_spec

    split = load_spec("attacks:\n  - {name: C&W (l2, ART defaults), kind: cw}\n")
    assert set(split["attacks"][0]) == {"name", "ART defaults)", "kind"}      # what YAML makes of it
    with pytest.raises(AdvlabError, match=r"spec.attacks\[0\] has unknown key\(s\) \['ART defaults\)'\].*quote"):
        apply_quick(split, "spec")
    quoted = load_spec('attacks:\n  - {name: "C&W (l2, ART defaults)", kind: cw}\n')
    assert apply_quick(quoted, "spec")["attacks"][0]["name"] == "C&W (l2, ART defaults)"
    with pytest.raises(AdvlabError, match=r"spec.graybox.attacks\[1\] has unknown key\(s\) \['stpes'\]"):
        apply_quick(load_spec("graybox:\n  attacks:\n    - {name: a, eps: 1}\n    - {name: b, stpes: 3}\n"), "spec")
    with pytest.raises(AdvlabError, match=r"spec.quick.attacks\[0\].name must be a string"):
        apply_quick(load_spec("quick:\n  attacks:\n    - {name: [1], kind: pgd}\n"), "spec")
    for name, _ in list_reproductions():
        assert resolve_spec(name)["name"] == name and resolve_spec(name, quick=True)["quick"] is True


def test_specs_parse_and_merge(tmp_path):
    spec = load_spec("runner: x\nn: 5\nquick:\n  n: 1\n")
    assert spec["quick"] == {"n": 1}
    assert deep_update({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    with pytest.raises(AdvlabError, match="bad experiment spec"):
        load_spec("a: [1, 2")
    with pytest.raises(AdvlabError, match="mapping"):
        load_spec("- 1\n- 2\n")
