"""FAB-T: the hyperplane-and-box projection (against linear programming for L-inf and the KKT
conditions for L2), the minimum distance to a linear model's decision hyperplane found within
FAB's overshoot, exact threat-model constraints, targets, reject-aware scores, one forward and
backward per step, seeding, strength on LeNet-5/digits, argument errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from advlab._util import AdvlabError
from advlab.attacks import FAB, build_attack
from advlab.attacks.fab import hyperplane_box_projection
from advlab.attacks.logits import merge_reject
from advlab.train import predict
from helpers import images, labels, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


class Counting(nn.Module):
    """Counts the images through forward, all and those with gradients enabled."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.images, self.grad_images = model, 0, 0

    def forward(self, x):
        self.images += x.shape[0]
        self.grad_images += x.shape[0] if torch.is_grad_enabled() else 0
        return self.model(x)


def linear(classes: int = 2, gap: float = 0.0, seed: int = 0) -> nn.Module:
    """A linear model on 1x4x4 images, random weights, every class scored 0 at the grey image
    except class 1, scored ``gap`` there (with 2 classes the decision hyperplane passes through
    the grey image for ``gap = 0``, at distance ``|gap| / ||w||`` from it otherwise)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(16, classes)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(classes, 16, generator=g))
        if classes == 2:
            lin.weight[0] = 0.0
        lin.bias.copy_(-0.5 * lin.weight.sum(1))
        lin.bias[1] += gap
    return nn.Sequential(nn.Flatten(), lin).eval()


def mid_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g) * 0.5 + 0.25


def dist(d: torch.Tensor, norm: str) -> torch.Tensor:
    d = d.flatten(1)
    return d.abs().amax(1) if norm == "inf" else d.norm(dim=1)


# --------------------------------------------------------------------------- (1) the projection

def random_problems(n=60, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, d, generator=g, dtype=torch.float64)
    p[p < 0.15], p[p > 0.9] = 0.0, 1.0                              # points on the faces of the box
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    w[torch.rand(n, d, generator=g) < 0.15] = 0.0                   # and normals with zero entries
    c = torch.randn(n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64) * 3
    return p, w, c


def reachable(p, w, c):
    """Whether the box around p holds a point of the hyperplane (the range of <w, delta> over the box)."""
    lo = (w * torch.where(w > 0, -p, 1 - p)).sum(1)
    hi = (w * torch.where(w > 0, 1 - p, -p)).sum(1)
    return (lo <= -c) & (-c <= hi)


def test_projection_linf_is_the_linear_program_optimum():
    p, w, c = random_problems()
    delta = hyperplane_box_projection(p, w, c, "inf")
    feasible = reachable(p, w, c)
    assert 10 < int(feasible.sum()) < len(c)                       # both cases occur
    assert ((p + delta) >= 0).all() and ((p + delta) <= 1).all()
    d = p.shape[1]
    for i in torch.nonzero(feasible).squeeze(1).tolist():
        assert abs(float(c[i] + w[i] @ delta[i])) < 1e-9           # on the hyperplane
        # min t  s.t.  -t <= delta_j <= t,  <w, delta> = -c,  -p <= delta <= 1 - p
        eye = np.eye(d)
        a_ub = np.block([[eye, -np.ones((d, 1))], [-eye, -np.ones((d, 1))]])
        lp = linprog(np.r_[np.zeros(d), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * d), A_eq=np.r_[w[i].numpy(), 0.0][None],
                     b_eq=[-float(c[i])], bounds=[(-float(v), 1 - float(v)) for v in p[i]] + [(0, None)])
        assert lp.status == 0
        assert float(delta[i].abs().max()) == pytest.approx(lp.fun, abs=1e-9)


def test_projection_l2_satisfies_kkt():
    p, w, c = random_problems(seed=1)
    delta = hyperplane_box_projection(p, w, c, "2")
    feasible = reachable(p, w, c)
    assert 10 < int(feasible.sum()) < len(c)
    lo, hi = -p, 1 - p
    assert (delta >= lo - 1e-12).all() and (delta <= hi + 1e-12).all()
    for i in torch.nonzero(feasible).squeeze(1).tolist():
        assert abs(float(c[i] + w[i] @ delta[i])) < 1e-9
        # KKT of min ||delta||^2 on the hyperplane and the box: delta = clip(-lam w, lo, hi) for one
        # multiplier lam (of the sign of c: the step lowers |c|)
        free = (w[i] != 0) & (delta[i] > lo[i] + 1e-12) & (delta[i] < hi[i] - 1e-12)
        lam = float((-delta[i][free] / w[i][free]).mean()) if free.any() else None
        assert lam is not None and lam * float(c[i]) >= 0
        assert torch.allclose(delta[i], (-lam * w[i]).clamp(lo[i], hi[i]), atol=1e-9)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_projection_out_of_reach_goes_to_the_corner(norm):
    p, w, c = random_problems(seed=2)
    delta = hyperplane_box_projection(p, w, c, norm)
    far = ~reachable(p, w, c)
    assert far.any()
    # every coordinate that moves the value towards the hyperplane is at its bound
    corner = torch.where(w * c[:, None] > 0, -p, 1 - p) * (w != 0)
    assert torch.allclose(delta[far], corner[far], atol=1e-12)
    # c = 0: already on the hyperplane, no step
    assert hyperplane_box_projection(p[:3], w[:3], torch.zeros(3, dtype=p.dtype), norm).abs().max() == 0


# --------------------------------------------------------------------------- (2) minimum norm on a linear model

@pytest.mark.parametrize("norm", ["inf", "2"])
def test_linear_model_minimum_distance(norm):
    model = linear()
    x = mid_images(32)
    y = predict(model, x)
    lin = model[1]
    w = (lin.weight[1] - lin.weight[0]).detach()
    f = (x.flatten(1) @ w + (lin.bias[1] - lin.bias[0])).detach()
    # the distance to the hyperplane: |f| / ||w||_1 (L-inf) or |f| / ||w||_2 (L2); the box does not bind
    exact = f.abs() / (w.abs().sum() if norm == "inf" else w.norm())
    step = -(torch.sign(f)[:, None] * (torch.sign(w) * exact[:, None] if norm == "inf" else w * exact[:, None] / w.norm()))
    assert ((x.flatten(1) + step) >= 0).all() and ((x.flatten(1) + step) <= 1).all()
    x_adv = FAB(model, norm=norm, steps=50)(x, y)
    assert (predict(model, x_adv) != y).all()
    found = dist(x_adv - x, norm)
    # never below the minimum; above it by FAB's overshoot (eta = 1.05, measured <= 0.9 %)
    assert (found >= exact * (1 - 1e-5)).all()
    assert (found <= exact * 1.02).all(), float((found / exact).max())


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_linear_model_where_the_box_binds(norm):
    """A far hyperplane: its closest point is outside [0, 1]; the minimum within
    the box is the projection of x (exact, checked above) and FAB finds it within its overshoot."""
    model = linear(gap=-6.0, seed=3)
    x = mid_images(32, seed=1)
    y = predict(model, x)
    lin = model[1]
    w = (lin.weight[1] - lin.weight[0]).detach()
    f = (x.flatten(1) @ w + (lin.bias[1] - lin.bias[0])).detach()
    free = f.abs() / (w.abs().sum() if norm == "inf" else w.norm())
    best = dist(hyperplane_box_projection(x.flatten(1).double(), w.double().expand(32, -1), f.double(), norm), norm)
    on_box = reachable(x.flatten(1).double(), w.double().expand(32, -1), f.double())
    x_adv = FAB(model, norm=norm, steps=100)(x, y)
    ok = predict(model, x_adv) != y
    assert bool((ok == on_box).all())                              # broken exactly where the box allows it
    binds = on_box & (best > free.double() * 1.05)
    assert int(binds.sum()) >= 3                                   # the box matters for several images
    found = dist(x_adv - x, norm).double()
    assert (found[on_box] >= best[on_box] * (1 - 1e-5)).all()
    assert (found[on_box] <= best[on_box] * 1.02).all()
    # further still: no point of the box crosses the hyperplane, so nothing is found
    far = linear(gap=-9.0, seed=3)
    assert not reachable(x.flatten(1).double(), w.double().expand(32, -1), f.double() - 3.0).any()  # its f: 3 lower
    assert torch.equal(FAB(far, norm=norm, steps=20)(x, y), x)


def test_multiclass_linear_targets_and_sweep():
    model = linear(classes=5, seed=4)
    x = mid_images(40, seed=2)
    y = predict(model, x)
    lin = model[1]
    wd = (lin.weight[None] - lin.weight[y][:, None]).detach()                         # (N, C, D)
    fd = (x.flatten(1)[:, None] * wd).sum(-1) + (lin.bias[None] - lin.bias[y][:, None]).detach()
    to_plane = fd.abs() / wd.norm(dim=-1).clamp_min(1e-12)                           # (N, C)
    to_plane[torch.arange(40), y] = float("inf")
    # explicit targets: reached, never closer than the hyperplane f_t = f_y
    t = (y + 1 + labels(40, classes=4, seed=5)) % 5
    xt = FAB(model, norm="2", steps=100)(x, y, target=t)
    assert (predict(model, xt) == t).all()
    assert (dist(xt - x, "2") >= to_plane[torch.arange(40), t] * (1 - 1e-5)).all()
    # FAB-T: misclassified, never closer than the nearest hyperplane
    xs = FAB(model, norm="2", steps=100)(x, y)
    assert (predict(model, xs) != y).all()
    assert (dist(xs - x, "2") >= to_plane.min(1).values * (1 - 1e-5)).all()


# --------------------------------------------------------------------------- (3) the threat model

@pytest.mark.parametrize("norm,eps", [("inf", 0.05), ("2", 0.3)])
def test_in_the_box_and_the_ball_failures_unchanged(norm, eps):
    model = tiny_model()
    x, y = images(24), labels(24)
    x_adv = FAB(model, eps=eps, norm=norm, steps=30, restarts=2)(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert (x_adv >= 0).all() and (x_adv <= 1).all()
    assert (dist(x_adv - x, norm) <= eps).all()
    pred, clean = predict(model, x_adv), predict(model, x)
    changed = (x_adv != x).flatten(1).any(1)
    assert (pred[changed] != y[changed]).all()                     # every change is an adversarial
    assert 0 < int(changed.sum()) < int((clean == y).sum())        # some broken, some not at this eps
    # eps = 0: nothing to do
    assert torch.equal(FAB(model, eps=0.0, norm=norm, steps=5)(x, y), x)


def test_misclassified_and_already_targeted_unchanged():
    model = tiny_model()
    x = images(16)
    pred = predict(model, x)
    y = (pred + 1) % 5                                              # every image misclassified
    assert torch.equal(FAB(model, steps=5)(x, y), x)
    assert torch.equal(FAB(model, steps=5)(x, (pred + 2) % 5, target=pred), x)   # already the target


class Rejecting(nn.Module):
    """Logits (z0, z1, z2, reject) on 1x4x4 images, with a = mean of the first 8 pixels - 0.5 and
    b = that of the last 8: z0 = 0, z1 = 10 a - 3, z2 = 10 b - 4, reject = 10 a - 2. Near the grey
    image class 0 wins; the rejection is the highest wrong class and is crossed first along a,
    where class 1 never beats it; class 2, along b, is the one way to a wrong class."""

    def forward(self, x):
        a = x.flatten(1)[:, :8].mean(1) - 0.5
        b = x.flatten(1)[:, 8:].mean(1) - 0.5
        return torch.stack((torch.zeros_like(a), 10 * a - 3, 10 * b - 4, 10 * a - 2), dim=1)


def test_scores_merge_reject():
    model = Rejecting()
    x = 0.45 + 0.1 * mid_images(32, seed=3)                         # near grey: z0 > reject > z1, z2
    y = torch.zeros(32, dtype=torch.long)
    assert (predict(model, x) == 0).all()
    # on the raw logits the first target is the rejection, and landing there counts as misclassified
    raw = predict(model, FAB(model, norm="2", steps=50, targeted_classes=1)(x, y))
    assert (raw == 3).all()
    # merged into the true class, the rejection is no way out: class 1 fails, class 2 succeeds
    x_adv = FAB(model, norm="2", steps=50, scores=merge_reject)(x, y)
    assert (predict(model, x_adv) == 2).all()
    # the one-hot sweep starts with class 1 (the highest merged wrong score), which cannot succeed
    only_first = FAB(model, norm="2", steps=50, scores=merge_reject, targeted_classes=1)(x, y)
    assert torch.equal(only_first, x)
    # an explicit target: a class of the scores, never the merged rejection column
    assert (predict(model, FAB(model, norm="2", steps=50, scores=merge_reject)(x, y, target=torch.full_like(y, 2)))
            == 2).all()
    with pytest.raises(AdvlabError, match=r"^target holds classes outside the 3 classes of the scores"):
        FAB(model, scores=merge_reject)(x, y, target=torch.full_like(y, 3))


# --------------------------------------------------------------------------- (4) cost and seeding

def test_one_forward_and_backward_per_step():
    model = Counting(linear(classes=5, seed=7))
    x = mid_images(8, seed=4)
    y = predict(model, x)
    model.images = model.grad_images = 0
    FAB(model, norm="inf", steps=10, targeted_classes=1)(x, y)
    # 10 steps with gradients; forwards without: the class count, the clean scores, the last
    # iterate and the check of the returned images
    assert model.grad_images == 10 * 8
    assert model.images == 10 * 8 + 1 + 3 * 8


def test_seeded_restarts_reproducible():
    model = tiny_model()
    x, y = images(16), labels(16)

    def make(seed):
        return FAB(model, eps=0.03, norm="inf", steps=5, restarts=3, seed=seed)
    a = make(1)
    first = a(x, y)
    assert torch.equal(first, make(1)(x, y))
    a.reset()
    assert torch.equal(first, a(x, y))
    # the random starts: at distance eps / 2 in the attack's norm (before clipping), seeded
    xm = torch.full((4, 1, 8, 8), 0.5)
    for norm, eps in (("inf", 0.2), ("2", 1.0)):
        atk = FAB(model, eps=eps, norm=norm, seed=3)
        atk._generator = torch.Generator().manual_seed(3)
        s1 = atk._start(xm)
        atk._generator = torch.Generator().manual_seed(3)
        assert torch.equal(s1, atk._start(xm))
        assert torch.allclose(dist(s1 - xm, norm), torch.full((4,), eps / 2), atol=1e-6)
        atk._generator = torch.Generator().manual_seed(4)
        assert not torch.equal(s1, atk._start(xm))


def test_random_start_moves_the_first_run():
    """random_start=True (an escalation round's FAB-T): the first run starts at a seeded random
    point too, so two seeds give different adversarials where one run from x gives one."""
    model = tiny_model()
    x = images(16)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image correct: each one is attacked

    def run(**kw):
        return FAB(model, eps=0.5, norm="inf", steps=10, early_stop=False, **kw)(x, y)
    plain = run()
    assert torch.equal(plain, run(seed=7))  # from x: the seed plays no part
    r1, r2 = run(random_start=True, seed=1), run(random_start=True, seed=2)
    assert not torch.equal(r1, r2) and not torch.equal(r1, plain)
    assert torch.equal(r1, run(random_start=True, seed=1))
    with torch.no_grad():
        assert bool((model(r1).argmax(1) != y).all())
    assert float((r1 - x).abs().max()) <= 0.5 + 1e-6


# --------------------------------------------------------------------------- (5) strength on LeNet-5 / digits

def test_breaks_lenet_on_digits(lenet_digits, digits_data):
    _, test = digits_data
    x, y = test.images[:200], test.labels[:200]
    ok = predict(lenet_digits, x) == y

    def broken(xa):
        return float(((predict(lenet_digits, xa) != y) & ok).sum() / ok.sum())
    # measured: 1.000 at L-inf 0.3 and L2 1.0; minimum norm 0.083 (L-inf) and 0.43 (L2) median,
    # the same as AutoAttack's fab_pt.py (0.083, 0.43) on these images
    assert broken(build_attack("fab", lenet_digits, eps=0.3)(x, y)) >= 0.95
    assert broken(build_attack("fab-l2", lenet_digits, eps=1.0)(x, y)) >= 0.95
    x_min = FAB(lenet_digits, norm="inf", steps=100)(x, y)
    success = (predict(lenet_digits, x_min) != y) & ok
    assert float(success.sum() / ok.sum()) >= 0.95
    assert float(dist(x_min - x, "inf")[success].median()) < 0.1


# --------------------------------------------------------------------------- (6) errors

@pytest.mark.parametrize("kwargs", [{"norm": "1"}, {"steps": 0}, {"steps": 2.5}, {"restarts": 0},
                                    {"targeted_classes": 0}, {"eps": -1.0}, {"alpha_max": 1.5},
                                    {"alpha_max": -0.1}, {"eta": 0.9}, {"eta": float("nan")}, {"beta": 0.0},
                                    {"beta": 1.5}, {"beta": "x"}, {"scores": "merge_reject"}])
def test_bad_arguments(kwargs):
    (name, value), = kwargs.items()
    # the message names the argument first and quotes the value given
    with pytest.raises(AdvlabError, match=rf"^{name} must be .*, got {re.escape(repr(value))}$"):
        FAB(tiny_model(), **kwargs)


def test_bad_calls():
    x, y = images(2), labels(2)
    with pytest.raises(AdvlabError, match=r"^restarts > 1 needs eps"):
        FAB(tiny_model(), restarts=2)
    with pytest.raises(AdvlabError, match=r"^random_start needs eps"):
        FAB(tiny_model(), random_start=True)
    with pytest.raises(AdvlabError, match="at least 2 classes"):
        FAB(tiny_model(classes=1))(x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(AdvlabError, match=r"^y must have shape \(2,\), got shape \(3,\)"):
        FAB(tiny_model())(x, labels(3))
    with pytest.raises(AdvlabError, match=r"^target holds labels outside \[0, 4\]"):
        FAB(tiny_model())(x, y, target=torch.tensor([0, 7]))
    with pytest.raises(AdvlabError, match="norm must be 'inf' or '2'"):
        hyperplane_box_projection(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1), "1")


def test_registry():
    model = tiny_model()
    assert build_attack("fab", model).norm == "inf" and build_attack("fab-l2", model).norm == "2"
    atk = build_attack("fab-l2", model, eps=0.5, steps=7)
    assert (type(atk), atk.eps, atk.steps, atk.targeted_classes) == (FAB, 0.5, 7, 9)
