"""APGD: the checkpoint schedule (paper and reference code), the step-size rule on scripted losses,
the momentum step, exact threat-model constraints, seeding, early stop and targets, EoT, strength
against PGD on LeNet-5/digits, argument errors."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from advlab._util import AdvlabError
from advlab.attacks import PGD
from advlab.attacks.apgd import APGD, APGDStep, apgd_checkpoints, dlr_loss, dlr_targeted_loss, eot_autograd
from advlab.attacks.loop import ActiveSet, AttackLoop, L2Projection, LinfProjection, autograd
from advlab.metrics.robustness import is_success
from advlab.train import predict
from helpers import tiny_model, images, labels

# --------------------------------------------------------------------------- helpers

pytestmark = pytest.mark.usefixtures("one_thread")



class Counting(nn.Module):
    """Counts forward calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


# --------------------------------------------------------------------------- (1) checkpoints

def reference_checkpoints(n_iter: int) -> list:
    """The iterations after which AutoAttack's ``autopgd_base.py`` checks the step size: ``k``
    starts at ``max(int(0.22 n), 1)`` and shrinks by ``max(int(0.03 n), 1)`` to at least
    ``max(int(0.06 n), 1)`` after each check; the check runs once ``counter3 == k`` iterations
    have passed since the last one, after evaluating ``x_(i+1)``."""
    k, k_min, decr = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    out, counter3 = [], 0
    for i in range(n_iter):
        counter3 += 1
        if counter3 == k:
            out.append(i + 1)
            k, counter3 = max(k - decr, k_min), 0
    return out


def test_checkpoints_100_steps():
    # by hand: p = 0, .22, .41 (.22 + .19), .57 (+.16), .70 (+.13), .80 (+.10), .87 (+.07), .93 (+.06),
    # .99 (+.06); the next, 1.05, is past the end. w_j = ceil(100 p_j).
    w = apgd_checkpoints(100)
    assert w == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    # AutoAttack's integer arithmetic gives the same checkpoints for 100 iterations
    assert reference_checkpoints(100) == w[1:]
    # scaling: exact, no float rounding (0.22 * 1000 = 220.00000000000003 in floats)
    assert apgd_checkpoints(1000) == [0, 220, 410, 570, 700, 800, 870, 930, 990]
    for n in (1, 2, 5, 10, 37, 250):
        w = apgd_checkpoints(n)
        assert w[0] == 0 and w == sorted(set(w)) and w[-1] <= n
    assert apgd_checkpoints(10) == [0, 3, 5, 6, 7, 8, 9, 10]


# --------------------------------------------------------------------------- (2) the step-size rule

def scripted(seq, steps=100, rho=0.75, eps=0.1, n=None, norm="inf"):
    """Run APGDStep on the loop with the loss of iterate ``x_k`` scripted as ``seq[k]`` (a number
    or one per sample) while its gradient is that of ``sum(v)`` (every step ascends towards 1).
    A script shorter than ``steps + 1`` is padded with 1000, 1001, ... Returns per iterate k the
    state right after ``observe`` (eta, v, x_best, f_max)."""
    seq = list(seq) + [1000.0 + k for k in range(len(seq), steps + 1)]
    vals = [torch.as_tensor(v, dtype=torch.float64).flatten() for v in seq]
    n = n or max(v.numel() for v in vals)
    x = torch.full((n, 1, 2, 2), 0.5, dtype=torch.float64)
    calls = [0]

    def objective(out, s, v):
        k = calls[0]
        calls[0] += 1
        vs = v.flatten(1).sum(1)
        return -(vals[k].expand(n) + (vs - vs.detach()))

    proj = LinfProjection(eps) if norm == "inf" else L2Projection(eps)
    rule = APGDStep(norm, eps, steps, proj, criterion=lambda out, s: torch.zeros(len(s), dtype=torch.bool), rho=rho)
    snaps = {}

    def observe(out, obj, s, t):
        r = rule.observe(out, obj, s, t)
        snaps[t - 1] = {k: s.get(k).clone() for k in ("eta", "v", "x_best", "f_max")}
        return r

    s = ActiveSet(n, x.device, v=x.clone(), x=x, y=torch.zeros(n, dtype=torch.long))
    AttackLoop(forward=lambda s, v: v, objective=objective, step=rule, project=proj, observe=observe,
               final_observe=True).run(s, steps)
    assert calls[0] == steps + 1  # one evaluation per iterate x_0 .. x_steps
    return snaps


def test_eta_halves_without_increase_and_stays_with_increase():
    # sample 0: the loss never increases -> condition 1 at every checkpoint, eta halves each time;
    # sample 1: the loss increases at every step -> eta stays 2 eps throughout.
    seq = [[0.0, float(k)] for k in range(101)]
    snaps = scripted(seq)
    eps = 0.1
    halvings = 0
    for k in range(101):
        if k in (22, 41, 57, 70, 80, 87, 93, 99):
            halvings += 1
        assert snaps[k]["eta"].tolist() == [2 * eps / 2 ** halvings, 2 * eps], k
    # the halving sample is moved back to its best point: x_0 (all later losses tie, none is higher)
    assert torch.equal(snaps[22]["v"][0], torch.full((1, 2, 2), 0.5, dtype=torch.float64))
    assert torch.equal(snaps[22]["x_best"][0], snaps[0]["v"][0])
    # the other keeps its iterate; its best point is the current one
    assert torch.equal(snaps[22]["v"][1], snaps[22]["x_best"][1])
    assert snaps[100]["f_max"].tolist() == [0.0, 100.0]


@pytest.mark.parametrize("m, halves", [(17, False), (16, True)])
def test_condition1_threshold(m, halves):
    # first interval: 22 comparisons f(x_k) > f(x_k-1), k = 1..22; rho * 22 = 16.5. The best loss
    # grows (to 10 m - (22 - m) > 0), so only condition 1 can act.
    seq = [0.0] + [-float(i) for i in range(1, 23 - m)] + [-(22.0 - m) + 10 * i for i in range(1, m + 1)]
    assert len(seq) == 23
    snaps = scripted(seq)
    assert snaps[21]["eta"].item() == 0.2
    assert snaps[22]["eta"].item() == (0.1 if halves else 0.2)


def test_condition2():
    # checkpoint 41 closes 19 steps (rho * 19 = 14.25). Second interval: 18 increases but no new best.
    second = [-100.0 + i for i in range(19)]  # k = 23..41
    # not reduced at checkpoint 22 (every step there increased the loss) -> condition 2 halves at 41
    snaps = scripted([float(k) for k in range(23)] + second)
    assert snaps[22]["eta"].item() == 0.2 and snaps[40]["eta"].item() == 0.2 and snaps[41]["eta"].item() == 0.1
    # reduced at checkpoint 22 (constant loss) -> condition 2 does not apply at 41, condition 1 neither
    snaps = scripted([0.0] * 23 + second)
    assert snaps[22]["eta"].item() == 0.1 and snaps[41]["eta"].item() == 0.1
    # the first checkpoint as in the paper: eta(w_0) = eta(w_1) and f_max(w_0) = f_max(w_1) -> halve,
    # although 21 of the 22 steps increased the loss (AutoAttack's code starts with
    # reduced_last_check = 1 and would keep eta here)
    snaps = scripted([100.0] + [float(i) for i in range(22)])
    assert snaps[22]["eta"].item() == 0.1


def test_momentum_step_matches_formula():
    torch.manual_seed(0)
    model = tiny_model(dtype=torch.float64)
    x, y = images(3, dtype=torch.float64), labels(3)
    eps = 0.3
    start = (x + 0.1 * torch.randn(x.shape, dtype=torch.float64)).clamp(x - eps, x + eps).clamp(0, 1)
    for norm, proj in (("inf", LinfProjection(eps)), ("2", L2Projection(eps))):
        def loss(v):
            return nn.functional.cross_entropy(model(v), y, reduction="none")

        def P(v):
            s = ActiveSet(3, x.device, v=v.clone(), x=x)
            proj.init(s)
            proj(s)
            return s.v

        def d(v):
            g = torch.autograd.grad(loss(v.requires_grad_(True)).sum(), v)[0]
            return g.sign() if norm == "inf" else g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

        # three steps by hand (no checkpoint before 22)
        xs = [start]
        for t in range(3):
            cur = xs[-1].detach()
            z = P(cur + 2 * eps * d(cur.clone()))
            a = 1.0 if t == 0 else 0.75
            prev = xs[-2] if t else cur
            xs.append(P(cur + a * (z - cur) + (1 - a) * (cur - prev)).detach())
        rule = APGDStep(norm, eps, 100, proj, criterion=lambda out, s: torch.zeros(len(s), dtype=torch.bool))
        s = ActiveSet(3, x.device, v=start.clone(), x=x, y=y)
        AttackLoop(forward=lambda s, v: model(v),
                   objective=lambda out, s, v: -nn.functional.cross_entropy(out, s.y, reduction="none"),
                   step=rule, project=proj, observe=rule.observe).run(s, 3)
        assert torch.allclose(s.v, xs[-1], atol=1e-12), norm


def test_dlr_losses():
    z = torch.tensor([[5.0, 3.0, 1.0, 0.0, -2.0], [1.0, 4.0, 2.0, 3.0, 0.0]])
    y = torch.tensor([0, 0])
    # sample 0: -(5 - 3) / (5 - 1); sample 1 (misclassified): -(1 - 4) / (4 - 2)
    assert torch.allclose(dlr_loss(z, y), torch.tensor([-0.5, 1.5]))
    t = torch.tensor([2, 1])
    # targeted: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    assert torch.allclose(dlr_targeted_loss(z, y, t), torch.tensor([-4 / (5 - 0.5), 3 / (4 - 1.5)]))
    # invariant to shifting and (positive) scaling of the logits
    assert torch.allclose(dlr_loss(3 * z + 7, y), dlr_loss(z, y))


# --------------------------------------------------------------------------- (3) constraints

@pytest.mark.parametrize("norm, eps", [("inf", 0.1), ("inf", 8 / 255), ("2", 0.5), ("2", 2.0)])
@pytest.mark.parametrize("loss, targeted", [("ce", False), ("dlr", False), ("dlr-targeted", False), ("ce", True),
                                            ("dlr", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constraints_hold_exactly(norm, eps, loss, targeted, dtype):
    model = tiny_model(dtype=dtype).train()
    x, y = images(6, dtype=dtype), labels(6)
    target = (y + 1) % 5 if targeted else None
    x_adv = APGD(model, eps=eps, norm=norm, steps=12, loss=loss, restarts=2, targeted_classes=3)(x, y, target=target)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if norm == "inf":
        assert (x_adv - x).abs().max() <= eps
        assert (x_adv.double() - x.double()).abs().max() <= eps
    else:
        assert (x_adv.double() - x.double()).flatten(1).norm(dim=1).max() <= eps
    assert model.training and all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- (4) seeding

def test_seeded_and_global_rng_untouched():
    model = tiny_model()
    x = images(8)
    y = predict(model, x)  # every sample is attacked
    state = torch.get_rng_state()
    a = APGD(model, eps=0.1, steps=10, restarts=2, seed=5)(x, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(APGD(model, eps=0.1, steps=10, restarts=2, seed=5)(x, y), a)
    atk = APGD(model, eps=0.1, steps=10, restarts=2, seed=5)
    first, second = atk(x, y), atk(x, y)
    assert torch.equal(first, a) and not torch.equal(second, a)  # the stream goes on between calls
    atk.reset()
    assert torch.equal(atk(x, y), a)
    assert not torch.equal(APGD(model, eps=0.1, steps=10, restarts=2, seed=6)(x, y), a)
    b = APGD(model, eps=0.5, norm="2", steps=10, loss="dlr-targeted", targeted_classes=2, seed=1)(x, y)
    assert torch.equal(APGD(model, eps=0.5, norm="2", steps=10, loss="dlr-targeted", targeted_classes=2,
                            seed=1)(x, y), b)


# --------------------------------------------------------------------------- success, targets, EoT

def test_success_rules():
    model = tiny_model(classes=5)
    x, y = images(16, seed=3), labels(16)
    pred = predict(model, x)
    y[:4] = (pred[:4] + 1) % 5  # four samples already misclassified: returned unchanged
    for early_stop in (True, False):
        x_adv = APGD(model, eps=0.3, steps=20, early_stop=early_stop)(x, y)
        assert torch.equal(x_adv[:4], x[:4])
        ok = is_success(predict(model, x_adv), y)
        assert ok[:4].all() and int(ok[4:].sum()) >= 11, ok   # measured: 12 of 12, with and without early stop
    # targeted: the goal is the target class (this model only ever predicts classes 0 and 1)
    target = 1 - pred
    x_adv = APGD(model, eps=0.5, steps=30)(x, y, target=target)
    hit = predict(model, x_adv) == target
    assert hit.float().mean() >= 0.9   # measured 1.00 (16 of 16)
    # a success is exactly a hit of the target (another wrong class does not count)
    assert torch.equal(is_success(predict(model, x_adv), y, target), hit)


def test_eot_averages_and_counts_passes():
    torch.manual_seed(0)
    v = torch.randn(3, 1, 4, 4)
    fn = lambda u: (u, (u ** 2).flatten(1).sum(1))
    g1, _, o1 = autograd(fn, v)
    g3, _, o3 = eot_autograd(3)(fn, v)
    assert torch.allclose(g1, g3) and torch.allclose(o1, o3)
    # a randomized function: the gradient is the mean of the draws
    draws = iter([1.0, 2.0, 6.0])
    noisy = lambda u: (u, (next(draws) * u).flatten(1).sum(1))
    g, _, o = eot_autograd(3)(noisy, v)
    assert torch.allclose(g, torch.full_like(v, 3.0)) and torch.allclose(o, 3.0 * v.flatten(1).sum(1))
    # passes: 1 clean forward + steps * eot_iter forward/backward + 1 forward of the last iterate
    model = Counting(tiny_model())
    x, y = images(2), labels(2)
    y = predict(model.model, x)
    APGD(model, eps=1e-6, steps=5, eot_iter=3)(x, y)
    assert model.calls == 1 + 1 + 5 * 3 + 1  # + the class count probe of Attack.perturb


# --------------------------------------------------------------------------- (5) strength on LeNet-5 / digits

@pytest.fixture(scope="module")
def digits200(digits_data):
    _, test = digits_data
    return test.images[:200], test.labels[:200]


def test_stronger_than_pgd_on_digits(lenet_digits, digits200):
    x, y = digits200
    eps = 0.1

    def acc(xa):
        return float((predict(lenet_digits, xa) == y).float().mean())

    pgd = acc(PGD(lenet_digits, eps=eps, steps=100, seed=0)(x, y))
    ce = acc(APGD(lenet_digits, eps=eps, loss="ce", seed=0)(x, y))
    apgd_t = acc(APGD(lenet_digits, eps=eps, loss="dlr-targeted", seed=0)(x, y))
    # measured: clean 0.970, PGD-100 0.300, APGD-CE 0.280, APGD-T 0.265 (torchattacks.APGD CE: 0.280)
    assert acc(x) > 0.9
    assert ce <= pgd + 0.02, (ce, pgd)
    assert apgd_t <= pgd + 0.02, (apgd_t, pgd)


# --------------------------------------------------------------------------- (6) errors

@pytest.mark.parametrize("kwargs", [{"loss": "margin"}, {"loss": "dlr_targeted"}, {"norm": "1"}, {"steps": 0},
                                    {"restarts": 0}, {"rho": 1.5}, {"rho": -0.1}, {"targeted_classes": 0},
                                    {"eot_iter": 0}, {"eps": -1.0}, {"steps": 2.5}])
def test_bad_arguments(kwargs):
    (name, value), = kwargs.items()
    # the message names the argument first and quotes the value given: "rho must be in [0, 1], got 1.5"
    with pytest.raises(AdvlabError, match=rf"^{name} must be .*, got {re.escape(repr(value))}$"):
        APGD(tiny_model(), **kwargs)


def test_bad_calls():
    x, y = images(2), labels(2, classes=2)
    with pytest.raises(AdvlabError, match="3 classes"):
        APGD(tiny_model(classes=2), loss="dlr")(x, y)
    with pytest.raises(AdvlabError, match="4 classes"):
        APGD(tiny_model(classes=3), loss="dlr-targeted")(x, y)
    with pytest.raises(AdvlabError, match=r"^y must have shape \(2,\), got shape \(3,\)"):
        APGD(tiny_model())(x, labels(3))
    with pytest.raises(AdvlabError, match=r"^steps must be an integer >= 1, got 0"):
        apgd_checkpoints(0)
