"""``advlab compare``: a user's own defense beside a built-in one, the six registry rows, the
guarantees of the table (adaptive <= claimed, monotone in eps), errors as rows, resuming."""

import json
import sys
import textwrap

import pytest
import torch

from advlab import REJECT
from advlab._util import AdvlabError
from advlab.cli import main
from advlab.eval.compare import DEFAULT_DEFENSES, compare, load_defense_class

USER_DEFENSE = textwrap.dedent('''
    import torch
    from advlab import REJECT
    from advlab.defenses import Defense

    CALLS = {"predict": 0, "fit": 0}


    class Confident(Defense):
        """Rejects an image when the top softmax probability is below ``threshold``."""

        def __init__(self, model, threshold=0.9):
            super().__init__()
            self.model = model
            self.threshold = threshold

        def config(self):
            return {"threshold": self.threshold}

        @classmethod
        def fit(cls, model, dataset, threshold=0.9, seed=0):
            CALLS["fit"] += 1
            return cls(model, threshold).eval()

        def forward(self, x):
            return self.model(x)

        @torch.no_grad()
        def predict(self, x, batch_size=1024):
            CALLS["predict"] += 1
            conf, label = torch.softmax(self.model(x), 1).max(1)
            return torch.where(conf < self.threshold, torch.full_like(label, REJECT), label)


    class Broken(Defense):
        @classmethod
        def fit(cls, model, dataset, seed=0):
            raise RuntimeError("this defense cannot be fitted")
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module outside advlab, importable from the working directory (as a user's would be)."""
    (tmp_path / "my_defenses.py").write_text(USER_DEFENSE)
    monkeypatch.chdir(tmp_path)
    yield "my_defenses"
    sys.modules.pop("my_defenses", None)


def _cells(row):
    return [row["cells"][k] for k in sorted(row["cells"], key=lambda k: (k.split("/")[0], float(k.split("/")[1])))]


def test_user_defense_beside_a_builtin_one(user_module, tmp_path):
    out = compare(["none", f"{user_module}:Confident", f"{user_module}:Broken"], quick=True,
                  out_dir=tmp_path / "cmp", log=lambda m: None)
    rows = {r["defense"]: r for r in out.rows}
    assert set(rows) == {"none", "Confident", "Broken"}
    user, none = rows["Confident"], rows["none"]
    assert user["status"] == "ok" and none["status"] == "ok"
    mod = sys.modules[user_module]
    assert mod.CALLS["fit"] == 1 and mod.CALLS["predict"] > 0  # judged by its own predict
    # its clean rejections are exactly the share of the test set its own predict rejects (recomputed
    # on the base model, which the "none" row saved as it is)
    from advlab.data import load_dataset
    from advlab.models import load_model

    test = load_dataset("digits", split="test")
    again = mod.Confident(load_model(tmp_path / "cmp" / "defenses" / "none.pt").eval())
    rejected = float((again.predict(test.images) == REJECT).double().mean())
    assert 0.0 < user["clean_rejections"] == pytest.approx(rejected)
    assert user["clean_accuracy"] == pytest.approx(float((again.predict(test.images) == test.labels).double().mean()))
    # attacked adaptively: the battery ran, it knew the defense rejects, rejections count as detections
    cell = user["cells"]["inf/0.1"]
    assert "evaluate battery" in cell["stages"]
    assert "rejects-inputs" in cell["masking_flags"]
    assert cell["adaptive_detected"] > 0.0
    assert cell["adaptive_robust"] + cell["adaptive_detected"] <= cell["clean_accuracy"] + 1e-9
    assert user["claimed_threat"] == "white-box"
    # a defense that fails to fit is a row with its error, and the report is written
    assert rows["Broken"]["status"] == "error" and "cannot be fitted" in rows["Broken"]["error"]
    assert rows["Broken"]["where"] == "fit"
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert [r["defense"] for r in saved["results"]["rows"]] == ["none", "Confident", "Broken"]
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "Confident" in report and "cannot be fitted" in report


def test_cli_quick_six_rows_and_the_table_guarantees(tmp_path, capsys):
    """The CI smoke run: every registry row fits and is attacked; adaptive never above claimed, never
    rising with eps; the leaderboard is ranked by adaptive robust accuracy; figures written."""
    out_dir = tmp_path / "cmp"
    assert main(["compare", "--quick", "--quiet", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "| rank | defense |" in printed
    res = json.loads((out_dir / "results.json").read_text())["results"]
    rows = res["rows"]
    assert [r["defense"] for r in rows] == list(DEFAULT_DEFENSES)
    assert all(r["status"] == "ok" for r in rows), [(r["defense"], r.get("error")) for r in rows]
    threats = {r["defense"]: r["claimed_threat"] for r in rows}
    assert threats == {"none": "white-box", "madry": "white-box", "msvdd": "transfer", "pcl": "white-box",
                       "vib": "transfer", "idefender": "black-box"}
    for r in rows:
        for norm in ("inf", "2"):
            cells = [c for c in _cells(r) if c["norm"] == norm]
            assert cells
            for c in cells:
                assert c["adaptive_robust"] <= c["claimed_robust"] + 1e-9, (r["defense"], c)
                assert c["adaptive_robust"] <= c["clean_accuracy"] + 1e-9
            adaptive = [c["adaptive_robust"] for c in cells]
            assert adaptive == sorted(adaptive, reverse=True)
        assert r["fit_seconds"] >= 0.0 and r["inference_cost"] > 0.0
    # the defense-aware attacks joined the chains of the defenses advlab knows
    stages = {r["defense"]: set(r["cells"]["inf/0.1"]["stages"]) for r in rows}
    assert any("full-knowledge" in s for s in stages["msvdd"])
    assert any("likelihood hinge" in s for s in stages["idefender"])
    assert any("prototype" in s for s in stages["pcl"])
    assert stages["none"] == {"evaluate battery"}
    board = [b for b in res["leaderboard"] if b["rank"] != "-"]
    assert [b["rank"] for b in board] == list(range(1, 7))
    assert [b["adaptive robust"] for b in board] == sorted((b["adaptive robust"] for b in board), reverse=True)
    for name in ("report.md", "leaderboard.csv", "robust-accuracy-linf.png", "robust-accuracy-l2.png",
                 "clean-vs-adaptive.png", "defenses/madry.pt", "defenses/msvdd.pt"):
        assert (out_dir / name).is_file(), name
    # the saved adversarially trained model is a plain checkpoint `advlab evaluate` reads
    from advlab.models import load_model

    madry = load_model(out_dir / "defenses" / "madry.pt")
    assert madry(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_resume_reads_the_finished_stages(tmp_path):
    kw = dict(defenses=["none", "pcl"], quick=True, out_dir=tmp_path / "cmp", log=lambda m: None)
    first = compare(**kw)
    again = compare(**kw)
    def numbers(rows):  # every cell but its timing
        return [{k: {f: v for f, v in c.items() if f != "seconds"} for k, c in r["cells"].items()} for r in rows]
    assert numbers(first.rows) == numbers(again.rows)
    stages = json.loads((tmp_path / "cmp" / "results.json").read_text())["stages"]
    assert stages["computed"] == 0 and stages["read"] >= 5  # base model, two fits, four cells
    fresh = compare(**kw, fresh=True)
    assert numbers(fresh.rows) == numbers(first.rows)  # deterministic


def test_bad_input_fails_before_any_work(tmp_path):
    with pytest.raises(AdvlabError, match="unknown defense"):
        compare(["none", "no-such-defense"], quick=True, out_dir=tmp_path / "a")
    with pytest.raises(AdvlabError, match="headline"):
        compare(["none"], quick=True, headline=("inf", 0.3), out_dir=tmp_path / "b")
    with pytest.raises(AdvlabError, match="norms"):
        compare(["none"], quick=True, eps={"l1": [1.0]}, out_dir=tmp_path / "c")
    with pytest.raises(AdvlabError, match="labelled"):
        compare(["none", "none"], quick=True, out_dir=tmp_path / "d")
    with pytest.raises(AdvlabError, match="compare knows"):
        compare(["none"], dataset="cifar10", out_dir=tmp_path / "e")
    with pytest.raises(AdvlabError, match="not a class"):
        load_defense_class("advlab:REJECT")
    with pytest.raises(AdvlabError, match="no fit"):
        load_defense_class(torch.nn.Linear)
    assert not any((tmp_path / d).exists() for d in "abcde")
    assert main(["compare", "--quick", "--param", "madry-epochs=3", "--out", str(tmp_path / "f")]) == 2
    assert main(["compare", "--quick", "--headline", "0.1", "--out", str(tmp_path / "g")]) == 2
    assert not (tmp_path / "f").exists() and not (tmp_path / "g").exists()


def test_params_reach_the_fit_and_the_report(tmp_path):
    out = compare([{"name": "madry", "label": "madry-3", "params": {"epochs": 1, "steps": 2}}, "none"], quick=True,
                  out_dir=tmp_path / "cmp", log=lambda m: None)
    row = out.rows[0]
    assert row["defense"] == "madry-3" and row["params"]["epochs"] == 1 and row["params"]["steps"] == 2
    assert "epochs=1" in (tmp_path / "cmp" / "report.md").read_text()


def test_reject_counts_as_detection_never_as_robust():
    from advlab.attacks.result import AttackResult
    from advlab.eval.compare import _detected, _robust

    y = torch.tensor([0, 1, 2, 3])
    res = AttackResult(labels=y, clean_pred=torch.tensor([0, 1, 2, 0]), adv_pred=torch.tensor([0, REJECT, 1, 0]),
                       success=torch.tensor([False, False, True, False]), l0=torch.zeros(4), l2=torch.zeros(4),
                       linf=torch.zeros(4), seconds=0.0)
    assert _robust(res) == 0.25  # image 0 only; 1 rejected, 2 broken, 3 wrong when clean
    assert _detected(res) == 0.25


def test_yaml_spec_and_flags(tmp_path, capsys):
    spec = tmp_path / "cmp.yaml"
    spec.write_text("defenses:\n  - none\n  - {name: madry, label: at, params: {epochs: 1, steps: 2}}\n"
                    "eps: {inf: [0.05, 0.1]}\nheadline: {norm: inf, eps: 0.1}\nn: 16\n")
    out_dir = tmp_path / "out"
    assert main(["compare", "--quick", "--quiet", "--spec", str(spec), "--eps-l2", "", "--param", "at.lr=0.002",
                 "--out", str(out_dir)]) == 0
    res = json.loads((out_dir / "results.json").read_text())
    rows = res["results"]["rows"]
    assert [r["defense"] for r in rows] == ["none", "at"]
    # madry trains at the headline L-inf eps (0.1 here; its own default is 0.3 for one-channel images)
    assert rows[1]["params"] == {"epochs": 1, "steps": 2, "lr": 0.002, "eps": 0.1}
    assert sorted(rows[0]["cells"]) == ["inf/0.05", "inf/0.1"] and res["spec"]["n"] == 16
    bad = tmp_path / "bad.yaml"
    bad.write_text("defenses: [none]\nwhatever: 1\n")
    assert main(["compare", "--quick", "--spec", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "whatever" in capsys.readouterr().err


def test_the_users_own_model_as_the_base(lenet_digits, tmp_path):
    """--model: the user's trained model is the base every defense is fitted from (no training here)."""
    out = compare(["none", {"name": "madry", "params": {"epochs": 1, "steps": 2}}], model=lenet_digits,
                  dataset="digits", quick=True, out_dir=tmp_path / "cmp", log=lambda m: None)
    rows = {r["defense"]: r for r in out.rows}
    assert all(r["status"] == "ok" for r in rows.values())
    from advlab.data import load_dataset

    test = load_dataset("digits", split="test")
    expected = float((lenet_digits(test.images).argmax(1) == test.labels).double().mean())
    assert rows["none"]["clean_accuracy"] == pytest.approx(expected)  # the given model, as it is
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())["results"]
    assert res["base_model"]["trained_here"] is False
