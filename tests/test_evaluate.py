"""The honest-evaluation battery: worst case never above a single attack, masked models reported
at the robustness of the unmasked one with a flag naming the masking, defenses judged by their
own decision, the CLI's RobustBench-style results."""

import json

import pytest
import torch
from torch import nn

from advlab import REJECT
from advlab._util import AdvlabError
from advlab.attacks import APGD, FAB, Square
from advlab.eval import evaluate


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def xy(digits_data):
    test = digits_data[1]
    return test.images[:100], test.labels[:100]


class Quantise(nn.Module):
    def forward(self, x):
        return torch.round(x * 4) / 4


class Saturated(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.log_softmax(1000 * self.model(x), 1)


class Noisy(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.g = torch.Generator().manual_seed(0)

    def forward(self, x):
        return self.model((x + 0.1 * torch.randn(x.shape, generator=self.g)).clamp(0, 1))


FAST = {"steps": 20, "square_queries": 100}


def test_plain_model_battery_is_a_per_sample_worst_case(lenet_digits, xy):
    x, y = xy
    res = evaluate(lenet_digits, x, y, eps=0.1, seed=0, **FAST)
    assert res.flags == [] and res.detected == 0.0 and res.x_adv.shape == x.shape
    assert list(res.per_attack) == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
    accs = list(res.per_attack.values())
    assert all(a >= b for a, b in zip(accs, accs[1:])) and res.robust_accuracy == accs[-1]
    assert res.robust_accuracy <= res.clean_accuracy
    # never above any single attack's robust accuracy on the same images
    for atk in (APGD(lenet_digits, eps=0.1, steps=20, loss="ce"),
                APGD(lenet_digits, eps=0.1, steps=20, loss="dlr-targeted"),
                FAB(lenet_digits, eps=0.1, steps=20),
                Square(lenet_digits, eps=0.1, queries=100)):
        assert res.robust_accuracy <= atk.run((x, y)).robust_accuracy + 1e-9
    # x_adv holds, for every broken image, an adversarial in the ball that the model gets wrong
    broken = torch.tensor([s == "broken" for s in res.status])
    assert (res.x_adv - x).abs().max() <= 0.1 + 1e-6
    assert bool((lenet_digits(res.x_adv[broken]).argmax(1) != y[broken]).all())
    assert abs(float((~broken).float().mean()) - res.robust_accuracy - (1 - res.clean_accuracy)) < 1e-6


@pytest.mark.parametrize("targets, expected", [(None, 9), (1, 1), (3, 3), (20, 9)])
def test_apgd_t_runs_against_the_requested_number_of_targets(lenet_digits, xy, monkeypatch, targets, expected):
    import importlib

    ev = importlib.import_module("advlab.eval.evaluate")  # the module (advlab.eval.evaluate is the function)
    seen = []

    class Recording(APGD):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.append((self.loss, self.targeted_classes))

    monkeypatch.setattr(ev, "APGD", Recording)
    x, y = xy
    kw = {} if targets is None else {"targets": targets}
    res = evaluate(lenet_digits, x[:20], y[:20], eps=0.1, attacks=("APGD-T",), checks=False, steps=3, **kw)
    # 10 classes: at most the 9 wrong ones
    assert seen == [("dlr-targeted", expected)] and 0 <= res.robust_accuracy <= res.clean_accuracy


@pytest.mark.parametrize("masked, flag", [(lambda m: nn.Sequential(Quantise(), m), "zero-gradients"),
                                          (Saturated, "log-probability-outputs")])
def test_masked_models_are_reported_at_the_unmasked_robustness(lenet_digits, xy, masked, flag):
    x, y = xy
    plain = evaluate(lenet_digits, x, y, eps=0.2, **FAST, checks=False).robust_accuracy
    model = masked(lenet_digits)
    illusion = APGD(model, eps=0.2, steps=20).run((x, y)).robust_accuracy  # plain APGD-CE is fooled
    assert illusion > plain + 0.3
    res = evaluate(model, x, y, eps=0.2, **FAST)
    assert flag in {f.name for f in res.flags} and "zero-gradients" in {f.name for f in res.flags}
    assert res.robust_accuracy <= plain + 0.05
    if flag == "log-probability-outputs":   # APGD-CE alone is fooled by the saturation; the battery is not
        assert res.per_attack["APGD-CE"] > res.robust_accuracy + 0.5
    else:                                    # the quantiser was wrapped with BPDA
        assert any("BPDA" in n for n in res.notes)


def test_randomized_model_gets_eot(lenet_digits, xy):
    x, y = xy
    res = evaluate(Noisy(lenet_digits), x, y, eps=0.2, **FAST)
    assert "randomized" in {f.name for f in res.flags} and any("EoT" in n for n in res.notes)
    assert res.robust_accuracy <= 0.1


def test_defense_is_judged_by_its_own_decision(lenet_digits, digits_data, xy):
    from advlab.defenses import MSVDDDefense

    x, y = xy
    d = MSVDDDefense.fit(lenet_digits, digits_data[0], projections=16, svdd_epochs=2, finetune_epochs=1,
                         progress=False)
    d.tune_beta(digits_data[0], goal="defense")
    res = evaluate(d, x, y, eps=0.1, **FAST, checks=False)
    pred = d.predict(x)
    assert res.clean_accuracy == pytest.approx(float((pred == y).float().mean()))
    counts = {s: res.status.count(s) / len(y) for s in ("robust", "broken", "detected", "misclassified")}
    assert sum(counts.values()) == pytest.approx(1.0) and counts["robust"] == pytest.approx(res.robust_accuracy)
    assert res.detected == pytest.approx(counts["detected"])
    # the goal is "accepted as a wrong class": a broken image is accepted, never rejected
    broken = torch.tensor([s == "broken" for s in res.status])
    adv_pred = d.predict(res.x_adv)
    assert bool((adv_pred[broken] != REJECT).all() and (adv_pred[broken] != y[broken]).all())
    assert res.robust_accuracy < 0.2 and any("accepted as a wrong class" in n for n in res.notes)


def test_eps_sweep_and_bad_input(lenet_digits, xy):
    x, y = xy
    res = evaluate(lenet_digits, x[:40], y[:40], eps=0.1, sweep=[0.05, 0.3], attacks=("APGD-CE",), **FAST)
    assert res.sweep["eps"] == [0.05, 0.1, 0.3] and res.sweep["robust_accuracy"][-1] <= 0.05
    assert res.sweep["robust_accuracy"][0] >= res.sweep["robust_accuracy"][-1]
    with pytest.raises(AdvlabError, match=r"^eps must be a finite number >= 0, got -1"):
        evaluate(lenet_digits, x, y, eps=-1)
    with pytest.raises(AdvlabError, match="attacks"):
        evaluate(lenet_digits, x, y, attacks=("FAB",))
    with pytest.raises(AdvlabError, match=rf"^y must have shape \({len(y)},\), got shape \(3,\)"):
        evaluate(lenet_digits, x, y[:3])
    with pytest.raises(AdvlabError, match=r"^x must hold pixel values in \[0, 1\]"):
        evaluate(lenet_digits, x * 2, y)


def test_cli_evaluate_writes_robustbench_style_results(tmp_path, capsys):
    from advlab.cli import main

    ckpt = tmp_path / "m.pt"
    assert main(["train", "--model", "model-e", "--dataset", "digits", "--epochs", "4", "--out", str(ckpt),
                 "--quiet"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--eps", "0.1", "--n", "60", "--steps", "10",
                 "--square-queries", "50", "--reported", "0.5", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert res["robust_accuracy_reported"] == 0.5 and res["eps"] == 0.1 and res["n"] == 60
    assert list(res["per_attack"]) == ["APGD-CE", "APGD-T", "FAB-T", "Square"] and isinstance(res["flags"], list)
    assert res["sweep"]["eps"] == pytest.approx([0.025, 0.05, 0.1, 0.2])
    assert (out / "accuracy-vs-eps.png").is_file() and "robust accuracy" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--eps", "0.1", "--norm", "l1", "--out", str(out)]) == 2
    assert "norm" in capsys.readouterr().err
