"""Square attack: exact threat-model constraints, no gradients, seeding, query accounting,
strength on LeNet-5/digits (untargeted and targeted, L-inf and L2), argument errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from advlab._util import AdvlabError
from advlab.attacks.square import Square, p_schedule
from advlab.metrics.robustness import is_success
from advlab.train import predict
from helpers import tiny_model, images

# --------------------------------------------------------------------------- helpers and fixtures




class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward called: Square must be score-based")


class BlackBox(nn.Module):
    """Wraps a model so that any backward pass through its input raises."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(_NoBackward.apply(x))


class _Count:
    """Counts the images passed forward through a model."""

    def __init__(self, model: nn.Module):
        self.images = 0
        self.h = model.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.images += inputs[0].shape[0]


def _counted_run(atk, model, x, y):
    """``atk(x, y)`` with the images passed forward through ``model`` counted: (x_adv, count)."""
    count = _Count(model)
    try:
        return atk(x, y), count
    finally:
        count.h.remove()


@pytest.fixture(scope="module")
def digits_correct(lenet_digits, digits_data):
    """The first 100 digits test images that the LeNet-5 classifies correctly."""
    _, test = digits_data
    x, y = test.images, test.labels
    ok = predict(lenet_digits, x) == y
    return x[ok][:100], y[ok][:100]


def success_rate(model, x_adv, y, target=None) -> float:
    return float(is_success(predict(model, x_adv), y, target).float().mean())


# --------------------------------------------------------------------------- constraints

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(norm=st.sampled_from(["inf", "2"]),
       eps=st.one_of(st.sampled_from([0.0, 8 / 255, 0.1, 0.3, 1.0]), st.floats(0.0, 2.0, allow_subnormal=False)),
       queries=st.integers(1, 12), n=st.integers(1, 5), c=st.sampled_from([1, 3]), h=st.integers(1, 10),
       w=st.integers(1, 10), loss=st.sampled_from(["ce", "margin"]), targeted=st.booleans(),
       restarts=st.integers(1, 2), p_init=st.sampled_from([0.05, 0.3, 1.0]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2 ** 16))
def test_constraints_hold_exactly(norm, eps, queries, n, c, h, w, loss, targeted, restarts, p_init, dtype, seed):
    model = tiny_model(c, dtype=dtype).train()
    x = images(n, c, h, w, seed=seed, dtype=dtype)
    y = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(seed))
    target = (y + 1) % 5 if targeted else None
    atk = Square(model, eps=eps, norm=norm, queries=queries, p_init=p_init, restarts=restarts, loss=loss, seed=seed)
    x_adv = atk(x, y, target=target)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = x_adv - x
    if norm == "inf":
        assert delta.abs().max() <= eps
        assert (x_adv.double() - x.double()).abs().max() <= eps
    else:
        # absolute slack: rounding x + d to float32 moves each pixel by up to ~3e-8 whatever eps is
        assert delta.flatten(1).norm(dim=1).max() <= eps * (1 + 1e-5) + 1e-6
    # query budget: at most `queries` forward passes per sample and restart, the clean check included
    q = atk.last_queries
    assert q.device.type == "cpu" and q.shape == (n,)
    assert q.min() >= 1 and q.max() <= restarts * queries
    # model hygiene: mode restored, nothing on the parameters' .grad
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    # the same seed gives the same result
    again = Square(model, eps=eps, norm=norm, queries=queries, p_init=p_init, restarts=restarts, loss=loss,
                   seed=seed)(x, y, target=target)
    assert torch.equal(x_adv, again)


@pytest.mark.parametrize("norm,eps", [("inf", 0.3), ("2", 1.0)])
def test_linf_vertices_and_l2_sphere(lenet_digits, digits_correct, norm, eps):
    x, y = digits_correct[0][:20], digits_correct[1][:20]
    atk = Square(lenet_digits, eps=eps, norm=norm, queries=20, seed=0)
    delta = atk(x, y) - x
    if norm == "inf":
        # every pixel is on a face of the ball, or clipped at 0 or 1
        lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        x_adv = x + delta
        assert (torch.isclose(x_adv, lo, atol=1e-6) | torch.isclose(x_adv, hi, atol=1e-6)).all()
    else:
        # the whole budget is used, up to what clipping to [0, 1] takes away
        r = delta.flatten(1).norm(dim=1)
        assert r.max() <= eps * (1 + 1e-5) and r.median() > 0.9 * eps


@pytest.mark.parametrize("c", [1, 3])
def test_linf_candidate_changes_one_shared_window_in_place(c):
    # one window position per iteration for the batch (colours per sample): the candidate differs
    # from the current point only inside that s x s window, and in every sample it does differ
    atk = Square(tiny_model(c), eps=0.2, seed=0)
    x = images(64, c, 10, 10)
    lo, hi = (x - 0.2).clamp(0, 1), (x + 0.2).clamp(0, 1)
    img = atk._linf_start(x, lo, hi)
    assert ((img == lo) | (img == hi)).all()
    for p, corner in ((0.3, [0.0, 0.999]), (0.05, [0.5, 0.25]), (0.01, [0.99, 0.0])):
        s = min(max(round((p * 100) ** 0.5), 1), 9)
        top, left = min(int(corner[0] * (11 - s)), 10 - s), min(int(corner[1] * (11 - s)), 10 - s)
        before = img.clone()
        window, old = atk._linf_patch(img, lo, hi, p, corner)
        assert window.shape == (64, c, s, s) and torch.equal(old, before[:, :, top:top + s, left:left + s])
        outside = torch.ones(10, 10, dtype=torch.bool)
        outside[top:top + s, left:left + s] = False
        assert torch.equal(img[:, :, outside], before[:, :, outside])
        assert (img != before).flatten(1).any(dim=1).all()  # every sample's candidate is new
        assert ((img == lo) | (img == hi)).all()  # still on the vertices of the ball
        # restoring the rejected samples' windows gives back their old images exactly
        keep = torch.arange(64) % 2 == 0
        window.copy_(torch.where(keep.view(-1, 1, 1, 1), window, old))
        assert torch.equal(img[~keep], before[~keep]) and not torch.equal(img[keep], before[keep])


def test_eps_zero_and_already_misclassified_samples_are_returned_unchanged(lenet_digits, digits_correct):
    x, y = digits_correct[0][:6], digits_correct[1][:6]
    wrong = (y + 1) % 10  # the model is right on x, so these labels are already "fooled"
    atk = Square(lenet_digits, eps=0.3, queries=50, seed=0)
    assert torch.equal(atk(x, wrong), x)
    assert atk.last_queries.tolist() == [1] * 6
    atk = Square(lenet_digits, eps=0.0, queries=50, seed=0)
    assert torch.equal(atk(x, y), x)
    assert atk.last_queries.tolist() == [1] * 6


# --------------------------------------------------------------------------- score-based, seeded, batched

def test_never_uses_gradients(lenet_digits, digits_correct):
    x, y = digits_correct[0][:30], digits_correct[1][:30]
    model = BlackBox(lenet_digits)
    xg = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="backward called"):
        torch.autograd.grad(model(xg).sum(), xg)
    for norm, eps in (("inf", 0.3), ("2", 1.5)):
        atk = Square(model, eps=eps, norm=norm, queries=100, seed=0)
        x_adv = atk(x.clone().requires_grad_(True), y)
        assert not x_adv.requires_grad
        assert success_rate(lenet_digits, x_adv, y) >= 0.8
    assert all(p.grad is None for p in lenet_digits.parameters())


def test_seeded_and_global_rng_untouched():
    model = tiny_model(3)
    x = images(6, 3, 8, 8)
    y = predict(model, x)
    for norm, eps in (("inf", 0.1), ("2", 0.5)):
        state = torch.random.get_rng_state()
        atk = Square(model, eps=eps, norm=norm, queries=30, seed=3)
        first, second = atk(x, y), atk(x, y)
        assert torch.equal(torch.random.get_rng_state(), state)
        assert not torch.equal(first, second)  # the stream goes on between calls
        atk.reset()
        assert torch.equal(atk(x, y), first)
        assert torch.equal(Square(model, eps=eps, norm=norm, queries=30, seed=3)(x, y), first)
        assert not torch.equal(Square(model, eps=eps, norm=norm, queries=30, seed=4)(x, y), first)


def test_queries_are_forward_passes_and_fooled_samples_leave_the_batch(lenet_digits, digits_correct):
    x, y = digits_correct[0][:40], digits_correct[1][:40]
    atk = Square(lenet_digits, eps=0.15, queries=100, restarts=2, seed=0)
    x_adv, count = _counted_run(atk, lenet_digits, x, y)
    q = atk.last_queries
    # the base class's one-image class-count probe, then exactly the recorded queries
    assert count.images == 1 + int(q.sum())
    fooled = is_success(predict(lenet_digits, x_adv), y)
    assert fooled.float().mean() >= 0.9   # measured 0.975 (39 of 40)
    assert (q[~fooled] == 2 * 100).all()  # the failures spent the whole budget of both restarts
    assert q[fooled].float().median() < 100  # the others stopped early


def test_restarts_only_add_successes(lenet_digits, digits_correct):
    x, y = digits_correct
    one = Square(lenet_digits, eps=0.1, queries=40, seed=0)(x, y)
    three = Square(lenet_digits, eps=0.1, queries=40, restarts=3, seed=0)(x, y)
    ok_one = is_success(predict(lenet_digits, one), y)
    ok_three = is_success(predict(lenet_digits, three), y)
    assert (ok_three | ~ok_one).all()  # the first restart is the single run
    assert ok_three.sum() > ok_one.sum()


def test_p_schedule_matches_the_paper():
    # p_init halved after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10,000
    assert p_schedule(0.8, 10, 10000) == 0.8 and p_schedule(0.8, 11, 10000) == 0.4
    assert p_schedule(0.8, 9999, 10000) == 0.8 / 512
    # rescaled to the budget: at 1,000 queries the first halving comes after iteration 1
    assert [p_schedule(0.8, i, 1000) for i in (0, 1, 2, 5, 6)] == [0.8, 0.8, 0.4, 0.4, 0.2]


# --------------------------------------------------------------------------- strength on LeNet-5/digits

@pytest.mark.parametrize("norm,eps,queries,bound", [("inf", 0.3, 300, 0.9), ("2", 1.0, 500, 0.85)])
def test_untargeted_success(lenet_digits, digits_correct, norm, eps, queries, bound):
    # measured with seed 0: L-inf 1.00 (median 5 queries), L2 0.95 (median 12 queries)
    x, y = digits_correct
    atk = Square(lenet_digits, eps=eps, norm=norm, queries=queries, seed=0)
    x_adv = atk(x, y)
    fooled = is_success(predict(lenet_digits, x_adv), y)
    assert fooled.float().mean() >= bound
    assert atk.last_queries[fooled].float().median() <= 40
    # the random start alone (clean check + start = 2 queries) fools few: the search does the work
    start = Square(lenet_digits, eps=eps, norm=norm, queries=2, seed=0)(x, y)
    assert success_rate(lenet_digits, start, y) <= 0.4


@pytest.mark.parametrize("norm,eps,loss", [("inf", 0.3, "margin"), ("inf", 0.3, "ce"), ("2", 2.0, "margin")])
def test_targeted_success(lenet_digits, digits_correct, norm, eps, loss):
    # measured with seed 0 and 300 queries: 0.97, 0.97, 0.93
    x, y = digits_correct
    target = (y + 1) % 10
    atk = Square(lenet_digits, eps=eps, norm=norm, queries=300, loss=loss, seed=0)
    assert success_rate(lenet_digits, atk(x, y, target=target), y, target) >= 0.8


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,name", [
    ({"eps": -0.1}, "eps"), ({"eps": float("nan")}, "eps"), ({"queries": 0}, "queries"),
    ({"queries": 2.5}, "queries"), ({"norm": "l1"}, "norm"), ({"p_init": 0.0}, "p_init"),
    ({"p_init": 1.5}, "p_init"), ({"p_init": -0.2}, "p_init"), ({"p_init": "big"}, "p_init"), ({"restarts": 0}, "restarts"),
    ({"loss": "hinge"}, "loss"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(AdvlabError, match=rf"^{name} must be"):
        Square(tiny_model(), **kwargs)


def test_norm_spellings_and_defaults():
    model = tiny_model()
    assert Square(model).norm == "inf" and Square(model).eps == pytest.approx(8 / 255)
    assert Square(model, norm="L2").norm == "2" and Square(model, norm="l2").eps == 0.5
    assert Square(model, norm="Linf").norm == "inf"


def test_fooled_samples_ride_along_frozen_until_the_check(lenet_digits, digits_correct):
    # check_every > 1 (a GPU's default): a fooled sample's point is frozen and its queries stop
    # counting; it leaves the batch at the next check, so it costs fewer than check_every extra
    # forward passes and its result is still a success
    x, y = digits_correct[0][:40], digits_correct[1][:40]
    atk = Square(lenet_digits, eps=0.15, queries=100, seed=0, check_every=7)
    x_adv, count = _counted_run(atk, lenet_digits, x, y)
    q = atk.last_queries
    fooled = is_success(predict(lenet_digits, x_adv), y)
    assert fooled.float().mean() >= 0.9
    assert (q[~fooled] == 100).all() and q[fooled].float().median() < 100
    extra = count.images - 1 - int(q.sum())
    assert 0 < extra <= 6 * int(fooled.sum())
