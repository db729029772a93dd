"""``advlab reproduce pcl`` end to end on the embedded digits (tiny settings): the eq. 8 row beside
Algorithm 1's, the training-budget curve with its control, the invariants of every curve point and
a resumed run that reads every stage back."""

import json

import pytest

from advlab.papers import reproduce

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "n": 8, "batch_size": 64, "threads": 1, "quiet": True,
    "train": {"warmup_epochs": 1, "pc_epochs": 1, "adv_epochs": 1, "adv_subset": 64, "batch_size": 64, "lr": 0.003},
    "blackbox_source": {"model": "lenet5", "epochs": 1},
    "cw": {"n": 2, "steps": 3},
    "adaptive": {"steps": 3, "margin_steps": 3, "restarts": 1, "square_queries": 10, "checks": False},
    "linf_battery": {"n": 6, "steps": 3, "square_queries": 10, "margin_steps": 3},
    "budget_curve": {"pc_epochs": [1, 2], "readings": ["algorithm1", "eq8", "softmax"], "eps": [0.1, 0.3], "n": 6},
    "experiments": [{"name": "digits", "dataset": "digits", "train_subset": 256, "test_subset": 96, "table9": False,
                     "sweep": False, "ablation": False, "budget_curve": True}],
}


def test_pcl_reproduction_runs_both_readings_and_the_budget_curve(tmp_path):
    out = tmp_path / "pcl"
    rep = reproduce("pcl", out, quick=True, data_root=tmp_path, overrides=TINY)
    res = json.loads((out / "results.json").read_text())["results"]
    rows = res["digits"]["rows"]
    assert {"Softmax", "PCL", "PCL (eq. 8)"} <= set(rows)
    for name in ("PCL", "PCL (eq. 8)"):   # the adaptive number is a per-sample worst case over the paper's
        assert rows[name]["adaptive"] <= rows[name]["paper_protocol_worst"] <= rows[name]["pgd"]
    (curve,) = res["budget_curve"]
    got = sorted((p["reading"], p["epochs"]) for p in curve["points"])
    assert got == sorted((r, e) for r in ("algorithm1", "eq8", "softmax") for e in (1, 2))
    for p in curve["points"]:
        assert p["n"] == 6 and 0 <= p["clean"] <= 100
        assert ("eq6_clean" in p) == (p["reading"] != "softmax")
        small, large = p["eps"]["0.1"], p["eps"]["0.3"]
        for cell in (small, large):
            assert cell["adaptive"] <= cell["paper_protocol_worst"] <= cell["pgd"]
        assert large["adaptive"] <= small["adaptive"]           # what broke at 0.1 counts at 0.3
    text = (out / "report.md").read_text()
    assert "## What the budget curve supports" in text and "| PCL (eq. 8) |" in text
    assert "Which reading of the loss the paper's numbers used" in text
    assert (out / "training-budget-curve-digits-robust-accuracy-as-the-pc-phase-grows.csv").is_file()
    assert (out / "budget-curve-digits-eps-0-3.png").is_file()
    # a second run with the same spec reads every stage back and renders the same numbers
    again = reproduce("pcl", out, quick=True, data_root=tmp_path, overrides=TINY)
    saved = json.loads((out / "results.json").read_text())
    assert saved["stages"]["computed"] == 0 and saved["stages"]["read"] > 0
    assert saved["results"]["budget_curve"] == res["budget_curve"]
    assert rep.out_dir == again.out_dir
