"""I-defender: the torch log-likelihood equals scikit-learn's, gradients flow through it,
thresholds keep exactly the configured share of each class's training data, the decision and the
adversarial column agree, the adaptive attack beats the naive one, save/load, bad input."""

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
from advlab.metrics.detection import balanced_accuracy, detection_auc, roc, tpr_at_fpr


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
    for q in (0.95, 0.99):
        defense.set_keep(q)
        for c in range(10):
            n = int((y == c).sum())
            kept = int((ll[y == c, c] >= defense.thresholds[c]).sum())
            assert kept == n - math.floor((1 - q) * n + 1e-9)
    defense.set_keep(0.95)
    with pytest.raises(AdvlabError, match="keep"):
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
    adaptive = IDefenderAdaptive(defense, eps=0.1, steps=40, targets=2, seed=0).run((x, y), predict_fn=defense.predict)
    assert adaptive.success_rate > naive.success_rate + 0.1
    assert adaptive.detected_rate < naive.detected_rate
    feat = IDefenderAdaptive(defense, eps=0.1, steps=40, targets=2, mode="features", seed=0).run(
        (x, y), predict_fn=defense.predict)
    assert feat.success_rate > naive.success_rate
    gray = IDefenderGrayBox(defense, eps=0.2, steps=10, lam=0.1).run((x, y), predict_fn=defense.predict,
                                                                    keep_adversarials=True)
    assert 0.0 <= gray.success_rate <= 1.0
    assert float((gray.adversarials - x).abs().max()) <= 0.2 + 1e-6


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
    with pytest.raises(AdvlabError):
        IDefender.load(tmp_path / "missing.pt")


def test_bad_input(defense, lenet_digits, digits_data):
    train = digits_data[0]
    with pytest.raises(AdvlabError, match="layer"):
        IDefender.fit(lenet_digits, train, layers=["nope"])
    with pytest.raises(AdvlabError, match="covariance"):
        IDefender.fit(lenet_digits, train, covariance="tied")
    with pytest.raises(AdvlabError, match="rule"):
        IDefender.fit(lenet_digits, train, rule="all")
    with pytest.raises(AdvlabError, match="keeps"):
        IDefender.fit(lenet_digits, train, keeps=(1.5,))
    with pytest.raises(AdvlabError):
        defense.predict(torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(AdvlabError, match="mode"):
        IDefenderAdaptive(defense, mode="x")
    with pytest.raises(AdvlabError, match="IDefender"):
        IDefenderAdaptive(lenet_digits)
    with pytest.raises(AdvlabError):
        detection_auc([], [1.0])
    with pytest.raises(AdvlabError, match="fpr"):
        tpr_at_fpr([0.0], [1.0], 2.0)
    with pytest.raises(AdvlabError, match="boolean"):
        balanced_accuracy([0.5], [1])


def test_detection_metrics():
    nat, adv = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3.0, 4.0, float("inf")])
    assert detection_auc(nat, adv) == 1.0
    f, t, _ = roc(nat, adv)
    assert f[0] == 0 and t[-1] == 1
    assert tpr_at_fpr(nat, adv, 0.0) == 1.0
    assert balanced_accuracy(torch.tensor([False, True]), torch.tensor([True, True])) == 0.75
