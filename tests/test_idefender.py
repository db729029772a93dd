"""I-defender: the torch log-likelihood equals scikit-learn's, gradients flow through it,
thresholds keep exactly the configured share of each class's training data, the decision and the
adversarial column agree, the adaptive attack beats the naive one, save/load, bad input; the
Jacobian-augmented substitute (advlab.adaptive), the AUC's standard error, ``advlab defend
idefender``'s back end, and the reproduction's Table 6 calibration (through advlab.papers.reproduce)."""

import math

import numpy as np
import pytest
import torch

from advlab import REJECT
from advlab._util import AdvlabError
from advlab.adaptive.idefender import IDefenderAdaptive, IDefenderGrayBox
from advlab.attacks import FGSM, PGD
from advlab.defenses import DEFENSES
from advlab.defenses.idefender import IDefender, MixtureLogLik, threshold_for_keep
from advlab.metrics.detection import auc_standard_error, balanced_accuracy, detection_auc, roc, tpr_at_fpr


pytestmark = pytest.mark.usefixtures("one_thread")


def _sk_mixtures(cov, ks=(1, 3), d=4, seed=0):
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    out = []
    for c, k in enumerate(ks):
        z = rng.normal(size=(200, d)) @ rng.normal(size=(d, d)) + 3 * c
        out.append(GaussianMixture(k, covariance_type=cov, random_state=0, reg_covar=1e-4).fit(z))
    return out, rng.normal(size=(50, d)) * 2


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_torch_loglik_equals_sklearn(cov):
    gms, z = _sk_mixtures(cov)
    mod = MixtureLogLik.from_sklearn(gms, dtype=torch.float64)
    ll = mod(torch.as_tensor(z)).numpy()
    for c, gm in enumerate(gms):
        np.testing.assert_allclose(ll[:, c], gm.score_samples(z), rtol=1e-5, atol=1e-5)
    # float32 (what the defense runs in) is close too
    ll32 = MixtureLogLik.from_sklearn(gms)(torch.as_tensor(z, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(ll32, ll, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_gradcheck_tiny_mixture(cov):
    gms, z = _sk_mixtures(cov, ks=(2, 1), d=3)
    mod = MixtureLogLik.from_sklearn(gms, dtype=torch.float64)
    zt = torch.as_tensor(z[:4]).requires_grad_(True)
    assert torch.autograd.gradcheck(mod, (zt,), eps=1e-6, atol=1e-5)


def test_threshold_keeps_exactly():
    ll = torch.randn(137, dtype=torch.float64)
    for q in (0.95, 0.99, 0.5, 1.0):
        th = threshold_for_keep(ll, q)
        assert int((ll >= th).sum()) == 137 - math.floor((1 - q) * 137 + 1e-9)


@pytest.fixture(scope="module")
def defense(lenet_digits, digits_data):
    return IDefender.fit(lenet_digits, digits_data[0], components=(1, 2), covariance=("full", "diag"),
                         keeps=(0.95, 0.99), seed=0)


@pytest.fixture(scope="module")
def xy(digits_data):
    test = digits_data[1]
    return test.images[:120], test.labels[:120]


def test_fit_thresholds_and_registry(defense, digits_data):
    train = digits_data[0]
    assert DEFENSES["idefender"].cls is IDefender
    assert defense.history["covariance"] in ("full", "diag")
    assert defense.feature_dim == 120 + 84                       # lenet5's relu3 + relu4
    y = train.labels
    # re-evaluated in other batch sizes, each class keeps exactly n - floor((1 - q) n) of its data
    _, ll = defense.loglik_and_logits(train.images, batch_size=97)
    try:
        for q in (0.95, 0.99):
            defense.set_keep(q)
            for c in range(10):
                n = int((y == c).sum())
                kept = int((ll[y == c, c] >= defense.thresholds[c]).sum())
                assert kept == n - math.floor((1 - q) * n + 1e-9)
    finally:
        defense.set_keep(0.95)   # the module's defense, shared with the later tests
    with pytest.raises(AdvlabError, match=r"keep=0\.9 has no stored thresholds"):
        defense.set_keep(0.9)


def test_predict_detect_and_column(defense, lenet_digits, xy):
    x, y = xy
    pred = defense.predict(x)
    assert pred.shape == y.shape and bool(((pred >= 0) | (pred == REJECT)).all())
    clean_model = lenet_digits(x).argmax(1)
    assert bool((pred[pred != REJECT] == clean_model[pred != REJECT]).all())
    x_adv = FGSM(lenet_digits, eps=0.3)(x, y)
    for xs in (x, x_adv):
        with torch.no_grad():
            col = defense(xs)
        assert col.shape == (xs.shape[0], 11)
        am = col.argmax(1)
        am = torch.where(am == 10, torch.full_like(am, REJECT), am)
        assert torch.equal(am, defense.predict(xs))
    s_nat, s_adv = defense.detect(x), defense.detect(x_adv)
    assert s_nat.shape == (x.shape[0],) and torch.isfinite(s_nat).all()
    assert detection_auc(s_nat, s_adv) > 0.8
    assert (defense.predict(x_adv) == REJECT).float().mean() > (pred == REJECT).float().mean()
    # eq. 5 per class: TH_c - log p(H | c) of the predicted class, > 0 exactly where predict rejects
    for xs in (x, x_adv):
        t = defense.detect(xs, score="threshold")
        c = lenet_digits(xs).argmax(1)
        assert torch.allclose(t, defense.detect(xs) + defense.thresholds.double()[c])
        assert torch.equal(t > 0, defense.predict(xs) == REJECT)
    with pytest.raises(AdvlabError, match="score"):
        defense.detect(x, score="posterior")
    # forward has real gradients (no masking)
    xg = x[:8].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(defense(xg)[:, -1].sum(), xg)  # w.r.t. the input only: the shared LeNet keeps no .grad
    assert g.abs().sum() > 0
    # "accepted by any class" is more permissive: it rejects a subset of what the predicted rule does
    rej_pred = defense.predict(x_adv) == REJECT
    defense.set_rule("any")
    try:
        rej_any = defense.predict(x_adv) == REJECT
    finally:
        defense.set_rule("predicted")
    assert bool((rej_any <= rej_pred).all()) and int(rej_any.sum()) <= int(rej_pred.sum())


def test_adaptive_beats_naive(defense, lenet_digits, xy):
    x, y = xy
    naive = PGD(lenet_digits, eps=0.1, steps=20, seed=0).run((x, y), predict_fn=defense.predict)
    atk = IDefenderAdaptive(defense, eps=0.1, steps=40, targets=2, restarts=2, seed=0)
    adaptive = atk.run((x, y), predict_fn=defense.predict)
    assert adaptive.success_rate > naive.success_rate + 0.1
    assert adaptive.detected_rate < naive.detected_rate
    # every image broken is counted once, by the (target, start) run that broke it first
    assert set(atk.stats) <= {(t, r) for t in (1, 2) for r in (1, 2)} and atk.stats[(1, 1)] > 0
    assert sum(atk.stats.values()) == int(adaptive.success.sum())
    feat = IDefenderAdaptive(defense, eps=0.1, steps=40, targets=2, mode="features", seed=0).run(
        (x, y), predict_fn=defense.predict)
    assert feat.success_rate > naive.success_rate
    gray = IDefenderGrayBox(defense, eps=0.2, steps=10, lam=0.1).run((x, y), predict_fn=defense.predict,
                                                                    keep_adversarials=True)
    # measured: success 0.86, detected 0.13; without the detector term (lam=0) 0.71 and 0.29
    assert gray.success_rate >= 0.75
    assert float((gray.adversarials - x).abs().max()) <= 0.2 + 1e-6
    # every success is accepted by the detector (no REJECT) as a wrong class, re-judged from the images
    pred = defense.predict(gray.adversarials)
    assert gray.success.any() and bool((pred[gray.success] != REJECT).all())
    assert bool((pred[gray.success] != y[gray.success]).all()) and torch.equal(pred, gray.adv_pred)
    # eq. 6's detector term is what keeps the adversarials inside the class's GMM
    blind = IDefenderGrayBox(defense, eps=0.2, steps=10, lam=0.0).run((x, y), predict_fn=defense.predict)
    assert gray.detected_rate <= blind.detected_rate - 0.08, (gray.detected_rate, blind.detected_rate)
    assert gray.success_rate >= blind.success_rate + 0.08, (gray.success_rate, blind.success_rate)


def test_save_load(defense, xy, tmp_path):
    x, _ = xy
    defense.set_keep(0.99)
    try:
        path = defense.save(tmp_path / "idef.pt")
        back = IDefender.load(path)
        assert back.keep == pytest.approx(0.99)
        assert torch.equal(back.predict(x), defense.predict(x))
        assert torch.allclose(back.detect(x), defense.detect(x))
        back.set_keep(0.95)
    finally:
        defense.set_keep(0.95)
    with pytest.raises(AdvlabError, match=r"I-defender defense not found: .*missing\.pt"):
        IDefender.load(tmp_path / "missing.pt")


def test_bad_input(defense, lenet_digits, digits_data):
    train = digits_data[0]
    with pytest.raises(AdvlabError, match=r"no layer named 'nope'"):
        IDefender.fit(lenet_digits, train, layers=["nope"])
    with pytest.raises(AdvlabError, match="covariance"):
        IDefender.fit(lenet_digits, train, covariance="tied")
    with pytest.raises(AdvlabError, match="rule"):
        IDefender.fit(lenet_digits, train, rule="all")
    with pytest.raises(AdvlabError, match="keeps"):
        IDefender.fit(lenet_digits, train, keeps=(1.5,))
    with pytest.raises(AdvlabError, match=r"^x contains NaN"):
        defense.predict(torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(AdvlabError, match=r"^mode must be one of hinge, features, got 'x'"):
        IDefenderAdaptive(defense, mode="x")
    with pytest.raises(AdvlabError, match="IDefender"):
        IDefenderAdaptive(lenet_digits)
    with pytest.raises(AdvlabError, match=r"^natural is empty"):
        detection_auc([], [1.0])
    with pytest.raises(AdvlabError, match="fpr"):
        tpr_at_fpr([0.0], [1.0], 2.0)
    with pytest.raises(AdvlabError, match="boolean"):
        balanced_accuracy([0.5], [1])


def test_detection_metrics():
    nat, adv = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3.0, 4.0, float("inf")])
    assert detection_auc(nat, adv) == 1.0
    assert detection_auc(nat, adv[:0], allow_empty=True) is None
    with pytest.raises(AdvlabError, match=r"^adversarial is empty"):
        detection_auc(nat, adv[:0])
    # Hanley & McNeil (1982): Q1 = A / (2 - A), Q2 = 2 A^2 / (1 + A); A = 0.8, 50 + 50 scores
    q1, q2 = 0.8 / 1.2, 2 * 0.64 / 1.8
    se = math.sqrt((0.8 * 0.2 + 49 * (q1 - 0.64) + 49 * (q2 - 0.64)) / 2500)
    assert auc_standard_error(0.8, 50, 50) == pytest.approx(se) and se == pytest.approx(0.0445, abs=1e-4)
    assert auc_standard_error(1.0, 10, 10) == 0.0
    with pytest.raises(AdvlabError, match=r"^auc must be in \[0, 1\]"):
        auc_standard_error(1.2, 10, 10)
    f, t, _ = roc(nat, adv)
    assert f[0] == 0 and t[-1] == 1
    assert tpr_at_fpr(nat, adv, 0.0) == 1.0
    assert balanced_accuracy(torch.tensor([False, True]), torch.tensor([True, True])) == 0.75


class _CountingOracle(torch.nn.Module):
    """A tiny fixed classifier that counts the images it labels (the attacker's oracle queries)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(64, 10, generator=g), requires_grad=False)
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return (x.flatten(1) - 0.3) @ self.w


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jacobian_substitute_augmentation_and_queries(seed, digits_data, monkeypatch):
    from advlab.adaptive import substitute as R

    test = digits_data[1]
    n0, rounds, lam = 9 + seed, 3, 0.1
    perm = torch.randperm(len(test.labels), generator=torch.Generator().manual_seed(seed))
    seeds = test.images[perm[:n0]]
    oracle = _CountingOracle(seed)
    calls, real_fit = [], R.fit

    def spy(model, ds, *args, **kwargs):                       # what each round trains on, and the model
        calls.append((ds.tensors[0].clone(), ds.tensors[1].clone(), model))
        return real_fit(model, ds, *args, **kwargs)

    monkeypatch.setattr(R, "fit", spy)
    sub, queries = R.jacobian_substitute(oracle, seeds, 10, rounds=rounds, lam=lam, epochs=1, seed=seed)
    # the set doubles between rounds: n0, 2 n0, 4 n0 points; every point is labelled by one oracle query
    assert [c[0].shape[0] for c in calls] == [n0 * 2 ** r for r in range(rounds)]
    assert queries == n0 * (2 ** rounds - 1) == oracle.seen
    assert sub is calls[-1][2]
    assert torch.equal(calls[0][0], seeds)
    for r, (xr, yr, _) in enumerate(calls):
        with torch.no_grad():                                  # labels are the oracle's answers
            assert torch.equal(yr, ((xr.flatten(1) - 0.3) @ oracle.w).argmax(1))
        assert float(xr.min()) >= 0.0 and float(xr.max()) <= 1.0
        if r == 0:
            continue
        prev, prev_y, prev_sub = calls[r - 1]
        assert torch.equal(xr[: prev.shape[0]], prev)          # the old points stay
        # each new point is its parent moved by lam * sign(d z_label / dx) of the previous substitute
        xg = prev.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(prev_sub(xg).gather(1, prev_y[:, None]).sum(), xg)
        torch.testing.assert_close(xr[prev.shape[0]:], (prev + lam * g.sign()).clamp(0, 1), rtol=0, atol=1e-6)
        step = (xr[prev.shape[0]:] - prev).abs()
        assert float(step.max()) <= lam + 1e-6 and bool((step > 0).any())
    # one round: no augmentation, one query per seed
    oracle.seen = 0
    _, q1 = R.jacobian_substitute(oracle, seeds, 10, rounds=1, epochs=1, seed=seed)
    assert q1 == n0 == oracle.seen


def test_defend_idefender_back_end(lenet_digits, digits_data, tmp_path):
    from advlab.eval.defend import defend_idefender

    train, test = digits_data
    rep = defend_idefender(lenet_digits, train, test, tmp_path, n=40, components=(1,), covariance="diag", steps=5)
    rows = {r["attack"].split()[0]: r for r in rep.results["attacks"]}
    assert set(rows) == {"FGSM", "PGD", "adaptive"} and rows["adaptive"]["threat model"].startswith("white-box")
    assert all(r["auc"] is None or 0.0 <= r["auc"] <= 1.0 for r in rows.values())
    assert set(rep.results["fpr"]) == {"ID-95", "ID-99"} and (tmp_path / "report.md").is_file()
    back = IDefender.load(tmp_path / "idefender.pt")
    assert back.keep == pytest.approx(0.95) and back.predict(test.images[:5]).shape == (5,)


def test_reproduction_table6_calibration_bisects(tmp_path):
    """Table 6's strength calibration (the paper's protocol: strength chosen so that F's accuracy on
    the adversarials is the paper's Adv Acc) through the reproduction itself, on the digits."""
    import json

    from advlab.papers import reproduce

    col = {"name": "FGSM (50%)", "kind": "fgsm", "adv_acc": 50.0, "param": "eps", "grid": [0.0, 0.5], "params": {}}
    over = {"experiments": [{"name": "digits", "paper": "mnist", "dataset": "digits"}], "n": 60, "quiet": True,
            "fgsm_eps": [0.3], "other_attacks": [], "ablation_components": [], "graybox": {}, "battery": {},
            "adaptive": {"eps": [0.3], "steps": 5, "n": 20}, "substitute": {"seeds": 30, "rounds": 1, "epochs": 1},
            "table6": {"calibration_n": 1000, "refine": 4, "columns": [col]}}
    reproduce("idefender", tmp_path, quick=True, overrides=over, fresh=True)
    res = json.loads((tmp_path / "results.json").read_text())["results"]["digits"]
    # the attack-outcome check ran on PGD on F against the adaptive attack, and the report says what it found
    assert all(f["name"] == "black-box-beats-white-box" and f["eps"] == 0.3 for f in res["outcome_flags"])
    assert "Attack-outcome" in (tmp_path / "report.md").read_text()
    (row,) = res["table6"]
    assert row["calibrated_on"] == 60                          # calibration_n >= n: on every evaluated image
    vals = [v for v, _ in row["tried"]]
    assert len(vals) == 6 and vals == sorted(vals) and 0.0 < row["value"] < 0.5   # two grid points, four bisections
    ends = [a for v, a in row["tried"] if v in (0.0, 0.5)]
    assert abs(row["adv_acc"] - 50.0) <= min(abs(a - 50.0) for a in ends)
    assert dict(map(tuple, row["tried"]))[row["value"]] == row["adv_acc"]
