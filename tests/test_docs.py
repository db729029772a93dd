"""The documentation runs (issue 24): every ```python block of README.md and docs/**/*.md is
executed, each page's blocks in order in one namespace (as a reader would paste them), in a
temporary working directory, so a page whose code no longer works fails CI.

A block is skipped only when the line before its fence is ``<!-- docs-test: skip -->`` (none is,
today). A failure names the page and the line in it. ``mkdocs build --strict`` (in .ci/run)
checks the rest: links, anchors, the API reference's ``:::`` blocks.
"""

from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SKIP = "<!-- docs-test: skip -->"


def python_blocks(text: str):
    """(first line number of the code, code) of every ```python block of a Markdown text."""
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if before.strip() == SKIP:
            continue
        yield text.count("\n", 0, m.start(1)) + 1, m.group(1)


def run_page(path: Path, text: str, namespace: dict) -> None:
    """Execute the page's blocks in order; a failure raises AssertionError naming ``path:line``."""
    for line, code in python_blocks(text):
        # pad with newlines so that tracebacks give the line in the Markdown file
        compiled = compile("\n" * (line - 1) + code, str(path), "exec")
        try:
            exec(compiled, namespace)
        except Exception:
            tb = traceback.format_exc(limit=-3)
            raise AssertionError(f"the code block at {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:"
                                 f"{line} fails:\n{tb}") from None


PAGES_WITH_CODE = [p for p in PAGES if list(python_blocks(p.read_text()))]


def _registries() -> list:
    """The registries a page may add to (a tutorial registers its own defense): restored after it."""
    from advlab.attacks.registry import ATTACKS
    from advlab.data import DATASETS
    from advlab.defenses import DEFENSES
    from advlab.models.loading import FORMATS

    return [ATTACKS, DATASETS, DEFENSES, FORMATS]


@pytest.mark.parametrize("path", PAGES_WITH_CODE, ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_CODE])
def test_page_code_runs(path, tmp_path, monkeypatch):
    # the pages are run "from the root of the repository": a scratch copy of it, with the committed
    # reports (read, never written) linked in
    (tmp_path / "reports").symlink_to(ROOT / "reports", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # a page may write a module (my_defense.py) and import it
    monkeypatch.setenv("ADVLAB_QUIET", "1")
    saved = [(reg, dict(reg)) for reg in _registries()]
    before = set(sys.modules)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pages' models are tiny: one thread is faster, and immune to a busy machine
    try:
        run_page(path, path.read_text(), {"__name__": f"docs_page_{path.stem.replace('-', '_')}"})
    finally:
        torch.set_num_threads(threads)
        for reg, copy in saved:
            reg.clear()
            reg.update(copy)
        for name in set(sys.modules) - before:  # modules the page wrote in tmp_path
            if str(tmp_path) in str(getattr(sys.modules[name], "__file__", None) or ""):
                del sys.modules[name]


def test_the_tutorials_and_the_readme_have_code():
    """The pages issue 24 asks to be executed do have python blocks (an empty page would pass silently)."""
    names = {str(p.relative_to(ROOT)) for p in PAGES_WITH_CODE}
    for page in ("README.md", "docs/tutorials/evaluate-your-model.md", "docs/tutorials/write-a-defense.md",
                 "docs/tutorials/write-an-attack.md", "docs/tutorials/reproduce-a-paper.md"):
        assert page in names, f"{page} has no ```python block"


def test_a_broken_example_fails(tmp_path):
    """The check itself: a page whose second block raises fails, naming the page and the block's line."""
    page = tmp_path / "broken.md"
    page.write_text("# A page\n\n```python\nx = 1\n```\n\ntext\n\n```python\ny = x + undefined_name\n```\n")
    with pytest.raises(AssertionError, match=r"broken\.md:10 fails") as e:
        run_page(page, page.read_text(), {})
    assert "NameError" in str(e.value)
    skipped = page.read_text().replace("text\n\n```python\ny", f"text\n{SKIP}\n```python\ny")
    run_page(page, skipped, {})  # the skip marker is honoured


def test_the_layout_page_names_every_module():
    """docs/layout.md names every module of src/advlab (the README's old layout had drifted)."""
    page = (ROOT / "docs" / "layout.md").read_text()
    src = ROOT / "src" / "advlab"
    missing = [str(f.relative_to(src)) for f in sorted(src.rglob("*.py"))
               if f.name != "__init__.py" and f"`{f.relative_to(src).as_posix()}`" not in page]
    assert not missing, f"docs/layout.md does not name: {', '.join(missing)}"


def test_the_readme_run_times_are_the_reports():
    """Each `advlab reproduce NAME`, X min heading of the README is its report's seconds_total (rounded to
    the shown precision, 0.5 min of slack), and docs/figures.md and docs/reproductions.md show the same time."""
    import json

    readme = (ROOT / "README.md").read_text()
    figures = (ROOT / "docs" / "figures.md").read_text()
    found = re.findall(r"`advlab reproduce ([a-z0-9-]+)`, ([0-9.]+) min\)", readme)
    assert {name for name, _ in found} == {"ka3-attack", "msvdd", "pcl", "idefender", "vib"}
    for name, shown in found:
        rep = json.loads((ROOT / "reports" / name / "results.json").read_text())
        seconds = rep["seconds_total"]
        if (rep.get("stages") or {}).get("read"):  # re-rendered from its stages: the time they took when computed
            seconds = sum(v for k, v in rep["timings"].items() if k != "total")
        assert abs(seconds / 60 - float(shown)) <= 0.5, f"README says {name} takes {shown} min, its report {seconds:.0f} s"
        assert re.search(rf"\| {re.escape(name)} \| [0-9,]+ s \| {re.escape(shown)} min \|", figures), name
    # the Reproductions page repeats each heading: the same times
    page = dict(re.findall(r"`advlab reproduce ([a-z0-9-]+)`, ([0-9.]+) min\)",
                           (ROOT / "docs" / "reproductions.md").read_text()))
    assert page == dict(found), f"docs/reproductions.md headings {page} differ from the README's {dict(found)}"


def test_the_readme_exam_table_is_the_committed_exam():
    """The README's exam table is reports/exam/the-exam.csv, cell for cell (the numbers as the CSV rounds them)."""
    import csv

    rows = {r["entry"]: r for r in csv.DictReader((ROOT / "reports" / "exam" / "the-exam.csv").open())}
    readme = (ROOT / "README.md").read_text()
    table = [line for line in readme.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in rows]
    assert len(table) == len(rows), "the README's exam table does not list every entry of the committed exam"
    for line in table:
        entry, what, naive, ours, truth, flags, verdict = [c.strip() for c in line.strip().strip("|").split("|")]
        row = rows[entry]
        assert (naive, ours, truth) == (row["naive PGD-CE"], row["evaluate"], row["adaptive (true robustness)"]), entry
        assert (what, flags, verdict) == (row["what masks"], row["flags"], row["verdict"]), entry


def test_the_readme_vib_table_is_the_committed_report():
    """The README's VIB rows (transfer: the paper's protocol, at k = 2 with 10 noise samples, the paper's
    columns k = 1, 2, 2.5, 3 per sample count; the adaptive battery rows) are reports/vib/results.json's,
    rounded as shown."""
    import json

    vib = json.loads((ROOT / "reports" / "vib" / "results.json").read_text())
    cells = vib["results"]["table4_cells"]["10/2.0"]
    original = vib["results"]["original"]
    paper = vib["spec"]["paper"]["table4"]
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### VIB"):].replace("*", "")

    def row(label):
        line = next(x for x in section.splitlines() if x.startswith(f"| {label} "))
        return [c.strip() for c in line.strip().strip("|").split("|")][1:]

    def close(shown, value):
        decimals = len(shown.split(".")[1]) if "." in shown else 0
        return abs(float(shown) - value) <= 0.5 * 10 ** -decimals + 1e-9

    for label, key, paper_key in [("clean", "clean", "Original"), ("DeepFool", "DeepFool", "DeepFool"),
                                  ("C&W L2", "C&W (l2)", "C&W (l2)"), ("FGSM eps 0.3", "FGSM (eps=0.3)", "FGSM (eps=0.3)")]:
        (u_ours, u_paper), (d_ours, d_paper) = [c.split(" / ") for c in row(label)]
        assert close(u_ours, original[key]) and close(d_ours, cells[key]), label
        assert close(u_paper, paper[paper_key]["original"]) and close(d_paper, paper[paper_key]["10"][1]), label
    battery = vib["results"]["battery"]
    for eps in ("0.1", "0.3"):
        undefended, defended = row(f"battery L-inf {eps}")
        assert close(undefended, 100 * battery[f"battery L-inf {eps} / f_theta1 (undefended)"]["robust_accuracy"])
        assert close(defended, 100 * battery[f"battery L-inf {eps} / VIB k=3 n=20"]["robust_accuracy"])


def _readme_row(section_title: str, label: str) -> list:
    """The cells (after the first) of the README table row starting with ``label`` in the section whose
    heading starts with ``section_title`` (bold markers dropped)."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(section_title)
    end = readme.find("\n### ", start + 1)
    section = readme[start: end if end > 0 else None].replace("*", "")
    line = next(x for x in section.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip().strip("|").split("|")][1:]


def _close(shown: str, value: float) -> bool:
    """``shown`` is ``value`` rounded to the decimals it shows (half a unit of the last digit)."""
    shown = shown.strip().rstrip("%")
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return abs(float(shown) - float(value)) <= 0.5 * 10 ** -decimals + 1e-9


def _csv(path: str) -> dict:
    import csv

    return {r[next(iter(r))]: r for r in csv.DictReader((ROOT / "reports" / path).open())}


def test_the_readme_ka3_table_is_the_committed_report():
    """K-A3 Table 2 (MNIST LeNet-5): SSIM, MSE x1e3, ASR (ours / paper) and p(2) are the report's CSV."""
    rows = _csv("ka3-attack/mnist-lenet-undefended-ssim-mse-asr.csv")
    for attack, r in rows.items():
        if "no CW-SSIM" in attack:
            continue
        ssim, mse, asr, p2 = _readme_row("### K-A3", attack)[:4]
        for shown, ours, paper in [(ssim, "SSIM", "SSIM (paper)"), (mse, "MSE x1e3", "MSE x1e3 (paper)"),
                                   (asr, "ASR %", "ASR % (paper)")]:
            a, b = shown.split(" / ")
            assert _close(a, r[ours]) and _close(b, r[paper]), (attack, ours)
        assert _close(p2, r["p(2)"]), attack


def test_the_readme_msvdd_table_is_the_committed_report():
    """M-SVDD-D Table 2 at beta = O_d: ASR and D (mean ± std over 3 seeds, ours / paper) are the report's."""
    import csv

    for column, model in ((0, "mnist-fc1"), (2, "mnist-lenet")):
        path = ROOT / "reports" / "msvdd" / f"table-2-over-3-training-seeds-{model}.csv"
        for r in csv.DictReader(path.open()):
            if r["beta"] != "O_d" or r["attack"].startswith(("PGD L-inf 0.1", "PGD L2", "full-knowledge PGD L-inf 0.1",
                                                              "full-knowledge PGD L2")):
                continue
            label = {"PGD L-inf 0.3": "PGD L-inf 0.3 (transfer; not in the paper)",
                     "full-knowledge PGD L-inf 0.3": "full-knowledge PGD L-inf 0.3",
                     "battery L-inf 0.3": "battery L-inf 0.3 (adaptive)",
                     "worst case": "worst case L-inf 0.3 (adaptive)"}.get(r["attack"], f"{r['attack']} (transfer)")
            cells = _readme_row("### M-SVDD-D", label)
            for shown, ours, paper in [(cells[column], r["ASR"], r["ASR (paper)"]),
                                       (cells[column + 1], r["D"], r["D (paper)"])]:
                mean_std, _, paper_shown = shown.partition(" / ")
                m, s = mean_std.split(" ± ")
                om, os_ = ours.split(" ± ")
                assert _close(m, om) and _close(s, os_), (model, label, shown, ours)
                if paper_shown:
                    assert _close(paper_shown, paper), (model, label, shown, paper)


def test_the_readme_pcl_budget_curve_is_the_committed_report():
    """The PCL training-budget curve in the README (clean / PGD-10 / adaptive at eps 0.3 for each
    reading and the softmax twin, per PC-phase length) is the report's CSV, every point of it."""
    import csv

    path = ROOT / "reports" / "pcl" / "training-budget-curve-mnist-robust-accuracy-as-the-pc-phase-grows.csv"
    rows = {(r["model"], int(r["PC-phase epochs"])): r for r in csv.DictReader(path.open())}
    models = ["PCL (Algorithm 1)", "PCL (eq. 8)", "softmax twin (CE only)"]
    epochs = sorted({e for _, e in rows})
    assert len(epochs) >= 4 and {m for m, _ in rows} == set(models)
    for e in epochs:
        cells = _readme_row("### PCL", f"{e} epochs")
        for cell, model in zip(cells, models):
            clean, pgd, adaptive = cell.split(" / ")
            r = rows[(model, e)]
            assert _close(clean, r["clean %"]) and _close(pgd, r["PGD-10 0.3"]), (model, e, cell)
            assert _close(adaptive, r["adaptive 0.3"]), (model, e, cell)


def test_the_readme_pcl_and_idefender_tables_are_the_committed_reports():
    """PCL (ours: clean, paper-protocol PGD, adaptive) and I-defender (AUCs, false positives, adaptive success)."""
    pcl = _csv("pcl/paper-number-vs-paper-protocol-vs-adaptive-mnist.csv")
    for model, label in [("Softmax", "Softmax (equal-budget twin)"), ("PCL", "PCL (Algorithm 1)"),
                         ("PCL (eq. 8)", "PCL (eq. 8)"),
                         ("PCL + AdvTrain FGSM", "PCL + AdvTrain FGSM"), ("PCL + AdvTrain PGD", "PCL + AdvTrain PGD")]:
        clean, paper_pgd, ours_pgd, adaptive = _readme_row("### PCL", label)
        r = pcl[model]
        assert _close(clean.split(" / ")[1], r["clean (test set)"]), model
        assert _close(paper_pgd, r["PGD (paper)"]) and _close(ours_pgd, r["PGD-10 (paper protocol)"]), model
        assert _close(adaptive, r["adaptive (worst case)"]), model
    import csv

    headline = ROOT / "reports" / "idefender" / "headline-paper-s-threat-models-beside-the-adaptive-one.csv"
    fpr = _csv("idefender/models-detector-and-clean-false-positive-rate.csv")
    rows = {"black-box": "black-box: FGSM eps 0.3 crafted on a Jacobian-augmented substitute E",
            "black-box pooled": "the same FGSM, the pooled score -log p (the first version's headline)",
            "gray-box": "gray-box eq. 6, Iter-L-inf, alpha 0.1, target detector (ours: model F at eps 0.15; paper: "
                        "CIFAR-10, WRN-34-8, eps 0.013)",
            "white-box fully": "fully adaptive (misclassify and be accepted), eps 0.3",
            "evaluate battery": "`evaluate` battery on the defense (reject-aware), eps 0.3"}
    for r in csv.DictReader(headline.open()):
        key = next(k for k in rows if r["threat model"].startswith(k.split(" pooled")[0]))
        if key == "black-box" and "pooled" in r["metric"]:
            key = "black-box pooled"
        cells = _readme_row("### I-defender", rows[key])
        shown = cells[1 if r["dataset"] == "MNIST" else 2].split(" / ")[0]
        assert _close(shown, r["ours"]), (r["dataset"], r["threat model"], r["metric"], shown)
    fp = _readme_row("### I-defender", "clean test images rejected (ID-95 / ID-99)")
    for i, dataset in ((1, "MNIST"), (2, "F-MNIST")):
        id95, id99 = fp[i].split(" / ")
        assert _close(id95, fpr[dataset]["clean test FPR ID-95 %"]) and _close(id99, fpr[dataset]["clean test FPR ID-99 %"])


def test_the_readme_msvdd_table_1_is_the_committed_report():
    """M-SVDD-D Table 1: mean ± sample standard deviation over the three seeds of table-1-test-accuracy.csv
    (ours / paper), and the library-defaults row (one seed)."""
    import csv
    import statistics

    rows = list(csv.DictReader((ROOT / "reports" / "msvdd" / "table-1-test-accuracy.csv").open()))
    columns = ["W-LC", "W~-LC", "W~-SVDD (beta=O_c)", "W~-SVDD (beta=O_d)"]
    for experiment, label in [("MNIST-FC1", "MNIST-FC1 (M = 512)"), ("MNIST-LeNet", "MNIST LeNet-5 (M = 256)")]:
        seeds = [r for r in rows if r["experiment"] == experiment]
        assert len(seeds) == 3, experiment
        for shown, column in zip(_readme_row("### M-SVDD-D", label), columns):
            values = [float(r[column]) for r in seeds]
            mean_std, paper = shown.split(" / ")
            m, s = mean_std.split(" ± ")
            assert _close(m, statistics.mean(values)) and _close(s, statistics.stdev(values)), (label, column)
            assert _close(paper, seeds[0][f"{column} (paper)"]), (label, column)
    defaults = next(r for r in rows if r["experiment"] == "MNIST-FC1 (library defaults)")
    for shown, column in zip(_readme_row("### M-SVDD-D", "MNIST-FC1, library defaults (1 seed)"), columns):
        assert _close(shown, defaults[column]), column


def test_the_readme_compare_table_is_the_committed_reports():
    """The README's compare table (claimed / adaptive at each report's headline eps, clean accuracy, detected)
    is reports/compare-mnist and reports/compare-fashion-mnist results.json's, and the madry row's
    `advlab evaluate` check is reports/compare-mnist/evaluate-madry's."""
    import json

    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Defenses compared under the same conditions")
    section = readme[start: readme.index("\n## ", start + 1)].replace("*", "")
    reports = [json.loads((ROOT / "reports" / f"compare-{d}" / "results.json").read_text())["results"]
               for d in ("mnist", "fashion-mnist")]
    shown = 0
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or cells[0] in ("defense", "---"):
            continue
        name, threat, clean_m, cell_m, clean_f, cell_f = cells
        for res, clean, cell in ((reports[0], clean_m, cell_m), (reports[1], clean_f, cell_f)):
            row = next(r for r in res["rows"] if r["defense"] == name)
            norm, eps = res["headline"]
            c = row["cells"][f"{norm}/{eps:g}"]
            assert row["claimed_threat"] == threat and _close(clean, 100 * row["clean_accuracy"]), name
            claimed, adaptive = cell.split(" (+")[0].split(" / ")
            assert _close(claimed, 100 * c["claimed_robust"]) and _close(adaptive, 100 * c["adaptive_robust"]), name
            if " (+" in cell:
                assert _close(cell.split(" (+")[1].split(" ")[0], 100 * c["adaptive_detected"]), name
            else:
                assert c["adaptive_detected"] == 0, name
        shown += 1
    assert shown == len(reports[0]["rows"]) == 6
    for res in reports:  # the guarantee of the table: adaptive never above claimed, never rising with eps
        for row in res["rows"]:
            assert row["status"] == "ok", row["defense"]
            for norm in ("inf", "2"):
                cells = sorted((c for c in row["cells"].values() if c["norm"] == norm), key=lambda c: c["eps"])
                assert all(c["adaptive_robust"] <= c["claimed_robust"] for c in cells), row["defense"]
                assert all(a["adaptive_robust"] >= b["adaptive_robust"] for a, b in zip(cells, cells[1:]))
    evaluated = json.loads((ROOT / "reports" / "compare-mnist" / "evaluate-madry" / "results.json").read_text())
    assert f"{100 * evaluated['results']['robust_accuracy']:.1f}%" in section.replace("\n", " ")
