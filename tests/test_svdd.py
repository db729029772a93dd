"""SVDDLayer (K-A3 paper eq. 10-12) against hand-computed values and a per-class reference."""

import math

import pytest
import torch

from advlab._util import AdvlabError
from advlab.nn import SVDDLayer


def tiny_layer():
    """Two classes, 2-d features, two projections each, gamma = 0.5."""
    layer = SVDDLayer(2, 2, projections=2, gamma=0.5)
    with torch.no_grad():
        layer.O.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [2.0, 2.0]]]))
        layer.u.copy_(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        layer.R.copy_(torch.tensor([0.8, 1.0]))
    return layer


def test_eq10_hand_computed():
    layer = tiny_layer()
    f = torch.tensor([[0.0, 0.0]])
    # class 0: k~ = [e^-0.5, e^-0.5]; K~ = [[1, e^-1], [e^-1, 1]]; u = [.5, .5]
    d2_0 = 1 - 2 * math.exp(-0.5) + 0.5 * (1 + math.exp(-1))            # 0.470878
    # class 1: k~ = [e^-2, e^-4]; u = [1, 0] -> u^T K~ u = 1
    d2_1 = 1 - 2 * math.exp(-2) + 1                                      # 1.729329
    assert d2_0 == pytest.approx(0.470878, abs=1e-6)
    d2 = layer.sq_distance(f).detach()
    assert d2[0].tolist() == pytest.approx([d2_0, d2_1], abs=1e-6)
    svdd = layer.svdd(f).detach()
    assert svdd[0].tolist() == pytest.approx([0.64 - d2_0, 1.0 - d2_1], abs=1e-6)   # beta R^2 - d^2
    r = layer(f).detach()
    assert r[0].tolist() == pytest.approx([(0.64 - d2_0) / 0.64, 1.0 - d2_1], abs=1e-6)
    layer.set_beta([0.5, 2.0])
    assert layer.svdd(f)[0].detach().tolist() == pytest.approx([0.5 * 0.64 - d2_0, 2.0 - d2_1], abs=1e-6)
    assert layer(f)[0].detach().tolist() == pytest.approx([0.5 - d2_0 / 0.64, 2.0 - d2_1], abs=1e-6)


def test_eq11_eq12_hand_computed():
    layer = tiny_layer()
    layer.set_beta(0.3)  # the losses are defined with beta = 1 whatever beta is set to
    f = torch.tensor([[0.0, 0.0], [2.0, 1.0]])
    y = torch.tensor([1, 0])
    e = math.exp
    d2_0_a = 1 - 2 * e(-0.5) + 0.5 * (1 + e(-1))
    d2_1_a = 1 - 2 * e(-2) + 1
    # f = (2, 1): class 0: ||f-o||^2 = 2 and 4; class 1: 1 and 1
    d2_0_b = 1 - 2 * 0.5 * (e(-1) + e(-2)) + 0.5 * (1 + e(-1))
    d2_1_b = 1 - 2 * e(-0.5) + 1
    lp, ln = (t.detach() for t in layer.losses(f, y))
    # sample a is class 1 (positive of SVDD 1, negative of SVDD 0); b is class 0
    assert lp.tolist() == pytest.approx([max(0, d2_1_a - 1.0), max(0, d2_0_b - 0.64)], abs=1e-6)
    assert ln.flatten().tolist() == pytest.approx([max(0, 0.64 - d2_0_a), 0.0, 0.0, max(0, 1.0 - d2_1_b)], abs=1e-6)
    assert lp[0] > 0 and ln[0, 0] > 0 and ln[1, 1] > 0      # the example exercises every hinge
    lp_only, none = layer.losses(f, y, negatives=False)
    assert none is None and torch.equal(lp_only.detach(), lp)


def test_batched_matches_per_class_loop():
    torch.manual_seed(0)
    layer = SVDDLayer(4, 6, projections=5, gamma=0.3)
    with torch.no_grad():
        layer.u.normal_()
        layer.R.uniform_(0.5, 1.5)
    layer.set_beta(torch.tensor([0.9, 1.0, 1.1, 1.2]))
    f = torch.randn(7, 6)
    out = layer.svdd(f)
    for c in range(4):
        o, u = layer.O[c], layer.u[c]
        kt = torch.exp(-0.3 * torch.cdist(f, o) ** 2)
        kk = torch.exp(-0.3 * torch.cdist(o, o) ** 2)
        ref = layer.beta[c] * layer.R[c] ** 2 - 1 + 2 * kt @ u - u @ kk @ u
        assert torch.allclose(out[:, c], ref, atol=1e-5)


def test_gradients_reach_every_parameter_and_cache_follows_updates():
    torch.manual_seed(0)
    layer = SVDDLayer(3, 4, projections=3, gamma=1.0)
    f, y = torch.randn(9, 4), torch.arange(9) % 3
    lp, ln = layer.losses(f, y)
    (lp.mean() + ln.mean() + layer(f).sum()).backward()
    for p in (layer.O, layer.u, layer.R):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)
    for p in layer.parameters():  # frozen: the quadratic term is cached, and refreshed after a change
        p.requires_grad_(False)
    before = layer(f)
    with torch.no_grad():
        layer.u.mul_(2.0)
    after = layer(f)
    ref = layer.beta - (1 - 2 * torch.einsum("ncm,cm->nc", layer.kernel_vectors(f), layer.u)
                        + torch.einsum("cm,cmk,ck->c", layer.u, layer.kernel_matrices(), layer.u)) / layer.R ** 2
    assert not torch.allclose(before, after) and torch.allclose(after, ref, atol=1e-6)


def test_init_from_features():
    g = torch.Generator().manual_seed(0)
    f = torch.cat([torch.randn(20, 3), torch.randn(4, 3) + 5])
    y = torch.tensor([0] * 20 + [1] * 4)
    layer = SVDDLayer(2, 3, projections=8).init_from_features(f, y, generator=g)
    # class 0 has enough samples: its projections are 8 distinct rows of its own features
    rows0 = {tuple(r.tolist()) for r in layer.O[0]}
    assert len(rows0) == 8 and rows0 <= {tuple(r.tolist()) for r in f[:20]}
    # class 1 has 4: all of them plus noisy copies, all near class 1
    assert (layer.O[1] - 5).abs().mean() < 2.0
    assert torch.allclose(layer.u, torch.full((2, 8), 1 / 8))
    d2 = layer.sq_distance(f).detach()
    assert float(layer.R[0].detach()) ** 2 == pytest.approx(float(d2[:20, 0].median()), rel=1e-5)
    assert float(layer.gamma) > 0


def test_bad_arguments():
    with pytest.raises(AdvlabError, match="projections"):
        SVDDLayer(2, 3, projections=0)
    with pytest.raises(AdvlabError, match="gamma"):
        SVDDLayer(2, 3, gamma=-1.0)
    layer = SVDDLayer(2, 3, projections=4)
    with pytest.raises(AdvlabError, match="beta"):
        layer.set_beta([1.0, 2.0, 3.0])
    with pytest.raises(AdvlabError, match="beta"):
        layer.set_beta(0.0)
    with pytest.raises(AdvlabError, match="features"):
        layer(torch.zeros(5, 4))
    with pytest.raises(AdvlabError, match="no training samples"):
        layer.init_from_features(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))


def test_gradcheck_through_features_and_parameters():
    from torch.func import functional_call

    torch.manual_seed(0)
    layer = SVDDLayer(2, 3, projections=3, gamma=0.7).double()
    with torch.no_grad():
        layer.u.normal_()
    args = [torch.randn(4, 3, dtype=torch.float64)] + [t.detach().clone() for t in (layer.O, layer.u, layer.R)]
    args = [a.requires_grad_(True) for a in args]

    def fn(f, O, u, R):
        return functional_call(layer, {"O": O, "u": u, "R": R}, (f,))
    assert torch.autograd.gradcheck(fn, tuple(args), eps=1e-6, atol=1e-5)
