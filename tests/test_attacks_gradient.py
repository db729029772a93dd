"""FGSM, BIM, MIM, PGD and IterativeL2: strength on LeNet-5/MNIST, exact threat-model constraints
(hypothesis), determinism, model hygiene, input errors, and the equivalences between them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from advlab._util import AdvlabError
from advlab.attacks import BIM, FGSM, MIM, PGD, IterativeL2
from advlab.attacks.gradient import attack_objective
from advlab.train import predict
from helpers import tiny_model, images, labels


# --------------------------------------------------------------------------- helpers and fixtures





def make_attack(kind, model, eps, steps=3, norm="inf", loss="ce", early_stop=False, restarts=1, seed=0):
    if kind == "FGSM":
        return FGSM(model, eps=eps, loss=loss)
    if kind == "BIM":
        return BIM(model, eps=eps, alpha=eps / 2, steps=steps, loss=loss, early_stop=early_stop)
    if kind == "MIM":
        return MIM(model, eps=eps, alpha=eps / 2, steps=steps, loss=loss, early_stop=early_stop)
    if kind == "PGD":
        return PGD(model, eps=eps, alpha=eps / 2, steps=steps, norm=norm, loss=loss, early_stop=early_stop,
                   restarts=restarts, seed=seed)
    if kind == "IterativeL2":
        return IterativeL2(model, eps=eps, alpha=eps / 2, steps=steps, loss=loss, early_stop=early_stop)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def mnist_correct(lenet_mnist, mnist_data):
    """The first 1000 mnist-10k test images that the LeNet-5 classifies correctly."""
    _, test = mnist_data
    x, y = test.images, test.labels
    ok = predict(lenet_mnist, x) == y
    return x[ok][:1000], y[ok][:1000]


def accuracy(model, x, y):
    return (predict(model, x) == y).float().mean().item()


# --------------------------------------------------------------------------- strength on LeNet-5

N_FAST = 100  # the fast tests use 100 images; test_full_1000_images (slow) runs the full 1000


def test_pgd_linf_robust_accuracy(lenet_mnist, mnist_correct):
    x, y = (t[:N_FAST] for t in mnist_correct)
    res = PGD(lenet_mnist, eps=0.3, alpha=0.01, steps=40, seed=0).run((x, y), batch_size=64)
    assert len(res) == N_FAST and res.clean_accuracy == 1.0
    assert res.robust_accuracy <= 0.02
    assert res.linf.max() <= 0.3


def test_fgsm_accuracy(lenet_mnist, mnist_correct):
    x, y = (t[:N_FAST] for t in mnist_correct)
    x_adv = FGSM(lenet_mnist, eps=0.3)(x, y)
    assert accuracy(lenet_mnist, x_adv, y) < 0.5


def test_l2_attacks_reasonable(lenet_mnist, mnist_correct):
    x, y = (t[:N_FAST] for t in mnist_correct)
    strong_adv = PGD(lenet_mnist, eps=3.0, alpha=0.5, steps=20, norm="2", seed=0)(x, y)
    strong = accuracy(lenet_mnist, strong_adv, y)
    weak = accuracy(lenet_mnist, IterativeL2(lenet_mnist, eps=1.5, alpha=0.2, steps=10)(x, y), y)
    # accuracy falls as the budget grows; an L2 budget of 3 (a few strokes' worth) breaks LeNet-5
    assert strong < weak < 1.0
    assert strong <= 0.05
    assert (strong_adv - x).flatten(1).norm(dim=1).max() <= 3.0 * (1 + 1e-5)


def test_iterative_beats_single_step(lenet_mnist, mnist_correct):
    x, y = (t[:N_FAST] for t in mnist_correct)
    fgsm = accuracy(lenet_mnist, FGSM(lenet_mnist, eps=0.15)(x, y), y)
    bim = accuracy(lenet_mnist, BIM(lenet_mnist, eps=0.15, alpha=0.03, steps=10)(x, y), y)
    mim = accuracy(lenet_mnist, MIM(lenet_mnist, eps=0.15, alpha=0.03, steps=10)(x, y), y)
    assert bim < fgsm and mim < fgsm


def test_targeted_reaches_target(lenet_mnist, mnist_correct):
    x, y = (t[:N_FAST] for t in mnist_correct)
    t = (y + 1 + torch.arange(len(y)) % 9) % 10  # every wrong class, spread over the batch
    for atk in (PGD(lenet_mnist, eps=0.3, alpha=0.03, steps=20, seed=0, loss="margin"),
                PGD(lenet_mnist, eps=4.0, alpha=0.4, steps=20, norm="2", seed=0)):
        x_adv = atk(x, y, target=t)
        assert (predict(lenet_mnist, x_adv) == t).float().mean() >= 0.9, atk


def test_margin_loss_not_weaker_on_fgsm(lenet_mnist, mnist_correct):
    x, y = (t[:N_FAST] for t in mnist_correct)
    ce = accuracy(lenet_mnist, FGSM(lenet_mnist, eps=0.2)(x, y), y)
    margin = accuracy(lenet_mnist, FGSM(lenet_mnist, eps=0.2, loss="margin")(x, y), y)
    assert margin <= ce + 0.02


def test_early_stop_and_restarts(lenet_mnist, mnist_correct):
    x, y = (t[:N_FAST] for t in mnist_correct)
    kw = dict(eps=0.15, alpha=0.02, steps=10, seed=0)
    base_adv = PGD(lenet_mnist, **kw)(x, y)
    base = predict(lenet_mnist, base_adv) != y
    early_adv = PGD(lenet_mnist, early_stop=True, **kw)(x, y)
    early = predict(lenet_mnist, early_adv) != y
    restart = predict(lenet_mnist, PGD(lenet_mnist, restarts=3, **kw)(x, y)) != y
    # the first restart is the plain run, so restarts only add successes
    assert bool((restart | ~base).all())
    assert early.float().mean() >= base.float().mean() - 0.02
    # early-stopped samples stop at their first successful iterate: smaller perturbations
    both = early & base
    norm = lambda a: (a - x)[both].flatten(1).norm(dim=1).mean()  # noqa: E731
    assert norm(early_adv) < norm(base_adv)


@pytest.mark.slow
def test_full_1000_images(lenet_mnist, mnist_correct):
    x, y = mnist_correct
    assert len(y) == 1000
    assert accuracy(lenet_mnist, PGD(lenet_mnist, eps=0.3, alpha=0.01, steps=40, seed=0)(x, y), y) <= 0.02
    assert accuracy(lenet_mnist, FGSM(lenet_mnist, eps=0.3)(x, y), y) < 0.5
    assert accuracy(lenet_mnist, PGD(lenet_mnist, eps=3.0, alpha=0.5, steps=20, norm="2", seed=0)(x, y), y) <= 0.05


# --------------------------------------------------------------------------- exact constraints (hypothesis)

KINDS = ["FGSM", "BIM", "MIM", "PGD", "IterativeL2"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), norm=st.sampled_from(["inf", "2"]),
       eps=st.one_of(st.sampled_from([0.0, 8 / 255, 0.1, 0.3, 1.0]), st.floats(0.0, 2.0, allow_subnormal=False)),
       steps=st.integers(1, 4), n=st.integers(1, 5), c=st.sampled_from([1, 3]), h=st.integers(3, 10),
       w=st.integers(3, 10), loss=st.sampled_from(["ce", "margin"]), targeted=st.booleans(),
       early_stop=st.booleans(), restarts=st.integers(1, 2), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2 ** 16))
def test_constraints_hold_exactly(kind, norm, eps, steps, n, c, h, w, loss, targeted, early_stop, restarts, dtype,
                                  seed):
    model = tiny_model(c, dtype=dtype).train()
    x, y = images(n, c, h, w, seed=seed, dtype=dtype), labels(n, seed=seed)
    target = (y + 1) % 5 if targeted else None
    atk = make_attack(kind, model, eps, steps, norm, loss, early_stop, restarts, seed)
    x_adv = atk(x, y, target=target)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = x_adv - x
    if atk.norm == "inf":
        assert delta.abs().max() <= eps
        assert (x_adv.double() - x.double()).abs().max() <= eps
    else:
        assert delta.flatten(1).norm(dim=1).max() <= eps * (1 + 1e-5)
    # model hygiene: mode restored, no gradient on parameters, BatchNorm statistics untouched
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    fresh = tiny_model(c, dtype=dtype)
    assert torch.equal(model[1].running_mean, fresh[1].running_mean)
    # the same seed gives the same result
    again = make_attack(kind, model, eps, steps, norm, loss, early_stop, restarts, seed)(x, y, target=target)
    assert torch.equal(x_adv, again)


def test_requires_grad_flags_restored_and_input_untouched():
    model = tiny_model()
    model[0].weight.requires_grad_(False)
    x, y = images(4), labels(4)
    x_copy = x.clone()
    PGD(model, eps=0.2, alpha=0.05, steps=3, seed=0)(x, y)
    assert torch.equal(x, x_copy)
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad


def test_works_under_no_grad_and_with_grad_requiring_input():
    model = tiny_model()
    x, y = images(4), labels(4)
    ref = PGD(model, eps=0.2, alpha=0.05, steps=3, seed=0)(x, y)
    with torch.no_grad():
        out = PGD(model, eps=0.2, alpha=0.05, steps=3, seed=0)(x, y)
    assert torch.equal(ref, out)
    out = PGD(model, eps=0.2, alpha=0.05, steps=3, seed=0)(x.clone().requires_grad_(True), y)
    assert torch.equal(ref, out) and not out.requires_grad


def test_seed_and_reset():
    model = tiny_model()
    x, y = images(6), labels(6)
    atk = PGD(model, eps=0.3, alpha=0.05, steps=2, seed=3)
    first, second = atk(x, y), atk(x, y)
    assert not torch.equal(first, second)  # the stream goes on between calls
    atk.reset()
    assert torch.equal(atk(x, y), first)
    assert not torch.equal(PGD(model, eps=0.3, alpha=0.05, steps=2, seed=4)(x, y), first)


def test_l2_random_start_inside_ball():
    model = tiny_model(3)
    x = torch.full((200, 3, 6, 6), 0.5)
    atk = PGD(model, eps=0.8, alpha=0.0, steps=1, norm="2", seed=0)
    start = atk(x, labels(200))  # alpha 0: the random start itself
    r = (start - x).flatten(1).norm(dim=1)
    assert r.max() <= 0.8 * (1 + 1e-5)
    # the radius is uniform in [0, eps] (not uniform in the 108-dimensional ball's volume, which
    # would put every start at ~eps): a quarter of the starts within eps / 4, a quarter beyond 3 eps / 4
    assert 0.15 < float((r < 0.2).float().mean()) < 0.35 and 0.15 < float((r > 0.6).float().mean()) < 0.35
    assert abs(float(r.mean()) - 0.4) < 0.05
    # the direction is uniform: the mean perturbation is near zero in every pixel
    assert float((start - x).mean(0).abs().max()) < 0.05


# --------------------------------------------------------------------------- equivalences and formulas

def test_equivalences():
    model = tiny_model(3)
    x, y = images(6, 3, 7, 7), labels(6)
    # FGSM is one BIM step of size eps
    assert torch.equal(FGSM(model, eps=0.1)(x, y), BIM(model, eps=0.1, alpha=0.1, steps=1)(x, y))
    # MIM without momentum: sign(g / ||g||_1) = sign(g), i.e. BIM
    assert torch.equal(MIM(model, eps=0.1, alpha=0.02, steps=4, decay=0.0)(x, y),
                       BIM(model, eps=0.1, alpha=0.02, steps=4)(x, y))
    # Metzen's iterative L2 is L2 PGD without a random start
    assert torch.equal(IterativeL2(model, eps=0.5, alpha=0.1, steps=4)(x, y),
                       PGD(model, eps=0.5, alpha=0.1, steps=4, norm="2", random_start=False)(x, y))
    # BIM is L-inf PGD without a random start
    assert torch.equal(BIM(model, eps=0.1, alpha=0.02, steps=4)(x, y),
                       PGD(model, eps=0.1, alpha=0.02, steps=4, random_start=False)(x, y))


def test_mim_momentum_matches_formula():
    model = tiny_model()
    x, y = images(3), labels(3)
    eps, alpha, decay = 0.2, 0.03, 0.7
    xa, g = x.clone(), torch.zeros_like(x)
    for _ in range(3):
        xr = xa.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xr), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xr)
        g = decay * g + grad / grad.abs().flatten(1).sum(1).view(-1, 1, 1, 1)
        xa = torch.min(torch.max(xa + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    out = MIM(model, eps=eps, alpha=alpha, steps=3, decay=decay)(x, y)
    assert torch.allclose(out, xa, atol=1e-6)


def test_l2_step_matches_formula():
    model = tiny_model()
    x, y = images(3), labels(3)
    eps, alpha = 0.4, 0.15
    xa = x.clone()
    for _ in range(4):
        xr = xa.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xr), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xr)
        xa = xa + alpha * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        d = xa - x
        d = d * torch.clamp(eps / d.flatten(1).norm(dim=1), max=1).view(-1, 1, 1, 1)
        xa = (x + d).clamp(0, 1)
    assert torch.allclose(IterativeL2(model, eps=eps, alpha=alpha, steps=4)(x, y), xa, atol=1e-5)


def test_objectives():
    z = torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, -1.0]])
    y = torch.tensor([0, 2])
    t = torch.tensor([1, 0])
    assert torch.allclose(attack_objective(z, y, loss="margin"), torch.tensor([1.0 - 2.0, 3.0 - (-1.0)]))
    assert torch.allclose(attack_objective(z, y, t, loss="margin"), torch.tensor([0.5 - 2.0, 0.0 - 3.0]))
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    assert torch.allclose(attack_objective(z, y, loss="ce"), ce)
    assert torch.allclose(attack_objective(z, y, t, loss="ce"), -torch.nn.functional.cross_entropy(
        z, t, reduction="none"))
    # the masked maximum sends gradient to exactly two logits
    zr = z.clone().requires_grad_(True)
    attack_objective(zr, y, loss="margin").sum().backward()
    assert torch.equal(zr.grad, torch.tensor([[-1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))


def test_zero_eps_returns_input():
    model = tiny_model()
    x, y = images(4), labels(4)
    for kind in KINDS:
        assert torch.equal(make_attack(kind, model, 0.0)(x, y), x)


def test_defaults():
    model = tiny_model()
    assert BIM(model, eps=0.3, steps=10).alpha == pytest.approx(0.03)
    assert PGD(model, eps=0.3, steps=10).alpha == pytest.approx(0.075)
    assert PGD(model).eps == pytest.approx(8 / 255) and PGD(model, norm="2").eps == 0.5
    assert FGSM(model, seed=1).eps == pytest.approx(8 / 255) and IterativeL2(model).eps == 0.5


def test_callable_loss():
    model = tiny_model()
    x, y = images(5), labels(5)
    t = (y + 2) % 5

    def ce(logits, yy, target):
        if target is None:
            return torch.nn.functional.cross_entropy(logits, yy, reduction="none")
        return -torch.nn.functional.cross_entropy(logits, target, reduction="none")

    for tgt in (None, t):
        assert torch.equal(PGD(model, eps=0.2, alpha=0.05, steps=3, loss=ce, seed=0)(x, y, target=tgt),
                           PGD(model, eps=0.2, alpha=0.05, steps=3, seed=0)(x, y, target=tgt))
    with pytest.raises(AdvlabError, match="one value per sample"):
        BIM(model, eps=0.1, loss=lambda z, yy, tt: z.sum())(x, y)


# --------------------------------------------------------------------------- input errors

@pytest.mark.parametrize("call, match", [   # the message names the argument first, then what was wrong
    (lambda m, x, y: PGD(m, eps=0.1)(x * float("nan"), y), r"^x contains NaN"),
    (lambda m, x, y: PGD(m, eps=0.1)(x + 1.5, y), r"^x must hold pixel values in \[0, 1\]"),
    (lambda m, x, y: PGD(m, eps=0.1)(x[0], y), r"^x must have shape \(N, C, H, W\)"),
    (lambda m, x, y: PGD(m, eps=0.1)((x * 255).long(), y), r"^x must be a floating-point tensor"),
    (lambda m, x, y: PGD(m, eps=0.1)(x, y + 10), r"^y holds labels outside \[0, 4\]"),
    (lambda m, x, y: PGD(m, eps=0.1)(x, y.float()), r"^y must be an integer tensor"),
    (lambda m, x, y: PGD(m, eps=0.1)(x, y[:2]), r"^y must have shape \(4,\), got shape \(2,\)"),
    (lambda m, x, y: PGD(m, eps=0.1)(x, y, target=y + 7), r"^target holds labels outside \[0, 4\]"),
    (lambda m, x, y: PGD(m, eps=-0.1), r"^eps must be a finite number >= 0, got -0\.1"),
    (lambda m, x, y: FGSM(m, eps=float("nan")), r"^eps must be a finite number >= 0, got nan"),
    (lambda m, x, y: PGD(m, eps=0.1, steps=0), r"^steps must be an integer >= 1, got 0"),
    (lambda m, x, y: BIM(m, eps=0.1, alpha=-1.0), r"^alpha must be"),
    (lambda m, x, y: PGD(m, eps=0.1, norm="1"), r"^norm must be 'inf' or '2', got '1'"),
    (lambda m, x, y: MIM(m, eps=0.1, loss="hinge"), r"^loss must be one of .*, got 'hinge'"),
    (lambda m, x, y: MIM(m, eps=0.1, decay=-1), r"^decay must be"),
    (lambda m, x, y: PGD(m, eps=0.1, restarts=3, random_start=False), r"^restarts > 1 needs random_start=True"),
    (lambda m, x, y: PGD(m, eps=0.1, restarts=0), r"^restarts must be an integer >= 1"),
    (lambda m, x, y: PGD("not a model", eps=0.1), r"^model must be a torch\.nn\.Module, got str"),
])
def test_bad_input(call, match):
    m, x, y = tiny_model(), images(4), labels(4)
    with pytest.raises(AdvlabError, match=match):
        call(m, x, y)


class Detached(nn.Module):
    def forward(self, x):
        return torch.zeros(x.shape[0], 5) + x.detach().mean()


def test_non_differentiable_model_is_reported():
    with pytest.raises(AdvlabError, match="does not depend differentiably"):
        PGD(Detached(), eps=0.1, seed=0)(images(2), labels(2))


def test_empty_batch():
    m = tiny_model()
    x = torch.zeros(0, 1, 8, 8)
    out = PGD(m, eps=0.1, seed=0)(x, torch.zeros(0, dtype=torch.long))
    assert out.shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda(kind):
    model = tiny_model(3).cuda()
    x, y = images(8, 3, 9, 9), labels(8)
    atk = make_attack(kind, model, 0.3, steps=3, norm="2" if kind == "IterativeL2" else "inf")
    out = atk(x.cuda(), y.cuda(), target=((y + 1) % 5).cuda())
    assert out.is_cuda and out.dtype == torch.float32
    if atk.norm == "inf":
        assert (out.cpu() - x).abs().max() <= 0.3
    else:
        assert (out.cpu() - x).flatten(1).norm(dim=1).max() <= 0.3 * (1 + 1e-5)
    # a CPU input to a CUDA model comes back on the CPU
    assert make_attack(kind, model, 0.3)(x, y).device.type == "cpu"
