"""VIB paper: the bound (nearest other-class neighbour, sigma = d / 2k), the effectiveness score,
the KL term of the defense, and the defense itself (train, save, load) on the embedded digits."""

from __future__ import annotations

import math

import pytest
import torch

from advlab import REJECT
from advlab._util import AdvlabError
from advlab.attacks.result import AttackResult
from advlab.metrics.bound import (bound_statistics, brute_force_nearest_other_class, effectiveness_score,
                                  nearest_other_class, perturbation_magnitude, sigma_bound, visual_bound)


pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_set():
    # 1 x 2 x 2 images; d = L1 / 4
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0],     # A class 0
                      [1.0, 1.0, 1.0, 1.0],     # B class 0
                      [0.5, 0.0, 0.0, 0.0],     # C class 1: nearest other-class A, |.|=0.5
                      [1.0, 1.0, 1.0, 0.2]]).reshape(4, 1, 2, 2)  # D class 1: nearest B, 0.8
    y = torch.tensor([0, 0, 1, 1])
    # A: C 0.5 (D 3.2) -> 0.125 ; B: D 0.8 (C 3.5) -> 0.2 ; C: A 0.5 -> 0.125 ; D: B 0.8 -> 0.2
    return x, y, torch.tensor([0.125, 0.2, 0.125, 0.2]), torch.tensor([2, 3, 0, 1])


@pytest.mark.parametrize("method", ["auto", "brute", "pruned"])
def test_bound_on_hand_made_set(method):
    x, y, d, idx = _hand_set()
    res = nearest_other_class(x, y, method=method, chunk_size=3, pools=[2] if method == "pruned" else None)
    torch.testing.assert_close(res.distance, d)
    assert res.index.tolist() == idx.tolist()
    vb = visual_bound(x, y, chunk_size=1)
    for k in (1, 2, 2.5, 3):
        torch.testing.assert_close(vb.sigma(k), d / (2 * k))
    stats = {r["k"]: r for r in vb.statistics()}
    assert stats[2.0]["min"] == pytest.approx(0.125 / 4) and stats[2.0]["max"] == pytest.approx(0.05)
    assert stats[1.0]["mean"] == pytest.approx((0.125 + 0.2) / 4)
    assert vb.sigma_mean(2.5) == pytest.approx((0.125 + 0.2) / 2 / 5)


def test_reference_set_and_cross_set():
    x, y, _, _ = _hand_set()
    q = torch.full((1, 1, 2, 2), 0.9)
    res = nearest_other_class(q, torch.tensor([1]), x, y)   # class 1 query: only A, B count
    assert res.index.tolist() == [1] and res.distance.item() == pytest.approx(0.1)


@pytest.mark.parametrize("shape,pools", [((1, 16, 16), None), ((3, 20, 18), [5, 2]), ((1, 8, 8), [2])])
def test_chunked_equals_brute_force(shape, pools):
    g = torch.Generator().manual_seed(0)
    n = 300
    x = torch.rand((n,) + shape, generator=g)
    x[: n // 2] *= torch.rand((n // 2, 1, 1, 1), generator=g)      # varied scales: non-trivial pruning
    y = torch.randint(0, 4, (n,), generator=g)
    bd, bi = brute_force_nearest_other_class(x, y)
    for method in ("brute", "pruned"):
        res = nearest_other_class(x, y, method=method, chunk_size=37, pools=pools, probe=3)
        torch.testing.assert_close(res.distance, bd, rtol=1e-5, atol=1e-7)
        assert res.index.tolist() == bi.tolist()
    res = nearest_other_class(x, y, method="pruned", max_tile_mb=0.05, pools=pools)
    assert res.chunk_size < n and res.exact_pairs < n * n
    torch.testing.assert_close(res.distance, bd, rtol=1e-5, atol=1e-7)


def test_real_images_pruned_equals_brute(digits_data):
    train, _ = digits_data
    x, y = train.images[:600], train.labels[:600]
    bd, _ = brute_force_nearest_other_class(x, y)
    res = nearest_other_class(x, y, method="pruned", pools=[2], chunk_size=64)
    torch.testing.assert_close(res.distance, bd, rtol=1e-5, atol=1e-7)
    # ties may pick another index with the same distance
    again = (x - x[res.index]).abs().flatten(1).mean(1)
    torch.testing.assert_close(again, bd, rtol=1e-5, atol=1e-7)


def test_fashion_subset_pruned_equals_brute(fashion_root):
    from advlab.data import load_dataset

    tr = load_dataset("fashion-mnist", fashion_root, "train").subset(1200, seed=3)
    bd, _ = brute_force_nearest_other_class(tr.images, tr.labels)
    res = nearest_other_class(tr.images, tr.labels)
    assert res.method == "pruned" and res.exact_pairs < 0.1 * 1200 ** 2
    torch.testing.assert_close(res.distance, bd, rtol=1e-5, atol=1e-6)


def _result(adv_pred, clean_pred, y, adv, targets=None):
    from advlab.metrics.robustness import is_success

    n = y.shape[0]
    z = torch.zeros(n)
    return AttackResult(labels=y, clean_pred=clean_pred, adv_pred=adv_pred,
                        success=is_success(adv_pred, y, targets), l0=z, l2=z, linf=z, seconds=0.0, targets=targets,
                        adversarials=adv)


def test_effectiveness_score_hand_made():
    x = torch.zeros(5, 1, 2, 2)
    mags = torch.tensor([0.1, 0.3, 0.1, 0.05, 0.01])
    adv = x + mags.reshape(5, 1, 1, 1)
    y = torch.tensor([0, 1, 2, 3, 4])
    clean = torch.tensor([0, 1, 2, 3, 9])          # the last is wrong when clean: not counted
    advp = torch.tensor([5, 6, 2, REJECT, 1])      # success, success (too big), failed, detected, -
    res = _result(advp, clean, y, adv)
    torch.testing.assert_close(perturbation_magnitude(x, adv), mags)
    s = effectiveness_score(res, x, 0.2)
    assert s["n_counted"] == 4 and s["n_success"] == 2 and s["n_effective"] == 1
    assert s["score"] == pytest.approx(25.0) and s["within_bound_of_successes"] == pytest.approx(50.0)
    assert s["asr"] == pytest.approx(50.0)
    # a per-image bound: the second image's bound now covers its 0.3
    s2 = effectiveness_score(res, x, torch.tensor([0.05, 0.3, 1.0, 1.0, 1.0]))
    assert s2["n_effective"] == 1 and s2["effective"].tolist() == [False, True, False, False, False]
    assert effectiveness_score(res, x, 1.0)["score"] == pytest.approx(50.0)
    assert effectiveness_score(res, x, 0.0)["score"] == 0.0
    # a targeted attack that lands on a wrong class other than its target still counts (untargeted)
    t = _result(torch.tensor([5, 6, 2, 3, 4]), clean, y, adv, targets=torch.tensor([7, 7, 7, 7, 7]))
    assert effectiveness_score(t, x, 1.0)["n_success"] == 2


def test_kl_term_against_hand_value():
    from advlab.defenses.vib import kl_to_teacher

    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    want = torch.tensor([0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), math.log(2.0)])
    torch.testing.assert_close(kl_to_teacher(p, logits), want)
    assert float(kl_to_teacher(p[:1], torch.log(p[:1]))) == pytest.approx(0.0, abs=1e-7)


def test_noisy_copies():
    from advlab.defenses.vib import noisy_copies

    x = torch.full((2, 1, 30, 30), 0.5)
    out = noisy_copies(x, torch.tensor([0.01, 0.1]), 4, torch.Generator().manual_seed(0))
    assert out.shape == (8, 1, 30, 30)
    assert float((out[:4] - 0.5).std()) == pytest.approx(0.01, rel=0.1)
    assert float((out[4:] - 0.5).std()) == pytest.approx(0.1, rel=0.1)
    assert float(noisy_copies(torch.zeros(1, 1, 4, 4), torch.tensor([0.5]), 3).min()) >= 0.0


def test_defense_trains_saves_loads(lenet_digits, digits_data, tmp_path):
    from advlab.defenses import DEFENSES
    from advlab.defenses.vib import VIBDefense
    from advlab.train import accuracy

    train, test = digits_data
    before = {k: v.clone() for k, v in lenet_digits.state_dict().items()}
    sub = train.subset(400, seed=0)
    d = VIBDefense.fit(lenet_digits, sub, k=2.0, samples=3, epochs=1, batch_size=32, seed=0)
    assert "vib" in DEFENSES and DEFENSES["vib"].cls is VIBDefense
    assert d.randomized is False and d.history["sigma_mean"] > 0
    assert all(torch.equal(before[k], v) for k, v in lenet_digits.state_dict().items())   # model untouched
    assert all(torch.equal(before[k], v) for k, v in d.surrogate.state_dict().items())    # teacher frozen
    assert any(not torch.equal(before[k], v) for k, v in d.net.state_dict().items())      # student trained
    acc = accuracy(d, test)
    assert acc > 0.85
    x = test.images[:16]
    x.requires_grad_(True)
    d(x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0      # forward is differentiable
    p = d.save(tmp_path / "vib.pt")
    d2 = VIBDefense.load(p)
    assert d2.k == 2.0 and d2.samples == 3 and d2.clip
    torch.testing.assert_close(d2(test.images[:32]), d(test.images[:32]).detach())
    # the same seed gives the same student
    d3 = VIBDefense.fit(lenet_digits, sub, k=2.0, samples=3, epochs=1, batch_size=32, seed=0)
    torch.testing.assert_close(d3(test.images[:8]), d(test.images[:8]).detach())


def test_bad_input():
    from advlab.defenses.vib import VIBDefense

    x, y, d, _ = _hand_set()
    with pytest.raises(AdvlabError, match=r"^k must be"):
        sigma_bound(d, 0)
    with pytest.raises(AdvlabError, match="method"):
        nearest_other_class(x, y, method="kd-tree")
    with pytest.raises(AdvlabError, match="ref_x and ref_y"):
        nearest_other_class(x, y, ref_x=x)
    with pytest.raises(AdvlabError, match="another class"):
        nearest_other_class(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(AdvlabError, match=r"^x must hold pixel values in \[0, 1\]"):
        nearest_other_class(x * 2, y)
    with pytest.raises(AdvlabError, match=r"^x must have shape \(N, C, H, W\)"):
        nearest_other_class(x.flatten(1), y)
    with pytest.raises(AdvlabError, match=r"^y must have shape"):
        nearest_other_class(x, y[:3])
    with pytest.raises(AdvlabError, match="distance"):
        bound_statistics(torch.tensor([]))
    res = _result(torch.tensor([1, 0, 1, 0]), y, y, None)
    with pytest.raises(AdvlabError, match="keep_adversarials"):
        effectiveness_score(res, x, 0.1)
    res = _result(torch.tensor([1, 0, 1, 0]), y, y, x)
    with pytest.raises(AdvlabError, match="clean images"):
        effectiveness_score(res, x[:2], 0.1)
    with pytest.raises(AdvlabError, match="sigma"):
        effectiveness_score(res, x, torch.ones(3))
    with pytest.raises(AdvlabError, match="AttackResult"):
        effectiveness_score(object(), x, 0.1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(AdvlabError, match=r"^k must be"):
        VIBDefense(model, k=-1)
    with pytest.raises(AdvlabError, match="samples"):
        VIBDefense(model, samples=0)
    with pytest.raises(AdvlabError, match="sigma must hold"):
        VIBDefense.fit(model, (x, y), sigma=torch.ones(3), epochs=1)
    with pytest.raises(AdvlabError, match="labels"):
        VIBDefense.fit(model, (x, torch.tensor([0, 1, 2, 3])), sigma=torch.ones(4), epochs=1)


def test_bound_command_and_defend_vib(lenet_digits, digits_data, tmp_path):
    import json

    from advlab.eval.defend import bound_command, defend_vib

    rep = bound_command("digits", None, tmp_path / "bound", ks=(1.0, 2.0), subset=300)
    out = tmp_path / "bound"
    assert (out / "bound-histogram.png").is_file() and (out / "report.md").is_file()
    res = json.loads((out / "results.json").read_text())["results"]
    assert len(res["distance"]) == 300 and [r["k"] for r in res["bound"]["statistics"]] == [1.0, 2.0]
    assert rep.tables
    train, test = digits_data
    rep = defend_vib(lenet_digits, train.subset(300, seed=0), test, tmp_path / "def", n=30, epochs=1, samples=2,
                     steps=5, square_queries=10, progress=False)
    assert (tmp_path / "def" / "vib.pt").is_file()
    acc = rep.results["accuracy"]
    assert acc["VIB"] > 80 and acc["undefended"] > 80
    assert any(r["threat model"] == "adaptive" for r in rep.results["attacks"])
