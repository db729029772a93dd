"""BPDA and EoT (advlab.adaptive.bpda; Athalye, Carlini & Wagner 2018, section 4): gradient
killers are found and approximated, PGD through the wrappers breaks the masked / randomized
LeNet-5 of the 8x8 digits, and the wrapped model is left as it was."""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advlab import REJECT
from advlab._util import AdvlabError
from advlab.adaptive.bpda import BPDA, EoT, StraightThrough, auto_bpda, find_gradient_killers, straight_through
from advlab.attacks import PGD
from advlab.eval.checks import zero_gradient_fraction


# ---------------------------------------------------------------------------------------------- models
def quantise(x):
    return torch.round(x * 4) / 4


class Quantise(nn.Module):
    """Input quantiser to 5 grey levels: its gradient is zero almost everywhere (shattered)."""

    def forward(self, x):
        return quantise(x)


class Sign(nn.Module):
    def forward(self, h):
        return torch.sign(h)


class Saturate(nn.Module):
    """A clamp with a tiny linear zone: the gradient is zero unless |h| < 1e-3."""

    def forward(self, h):
        return torch.clamp(h, -1e-3, 1e-3) * 1e3


class Threshold(nn.Module):
    """``(h > 0)`` computed off the graph: the output does not depend on the input for autograd."""

    def forward(self, h):
        return h.detach().gt(0).float()


class SignedLinear(nn.Module):
    """A container whose own forward code kills the gradient (functional sign after a child)."""

    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc

    def forward(self, h):
        return torch.sign(self.fc(h))


class Scale(nn.Module):
    """A temperature: ``log_softmax(1000 z)`` saturates (vanishing, not shattered, gradients)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, z):
        return z * self.factor


class Noisy(nn.Module):
    """Adds Gaussian noise to the input at every forward pass, eval mode included (per-row draws)."""

    randomized = True

    def __init__(self, model: nn.Module, sigma: float = 0.5, seed: int = 0):
        super().__init__()
        self.model, self.sigma = model, sigma
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x):
        return self.model(x + self.sigma * torch.randn(x.shape, generator=self.gen).to(x.device))


class Rejecting(nn.Module):
    """A defended toy: ``predict`` abstains (REJECT) with probability ``p`` per row and draw."""

    def __init__(self, model: nn.Module, p: float, seed: int = 0):
        super().__init__()
        self.model, self.p = model, p
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x):
        return self.model(x)

    @torch.no_grad()
    def predict(self, x):
        pred = self.model(x).argmax(1)
        rej = torch.rand(x.shape[0], generator=self.gen).to(x.device) < self.p
        return torch.where(rej, torch.full_like(pred, REJECT), pred)

    def detect(self, x):
        return self.model(x).logsumexp(1)


def quantised(net):
    return nn.Sequential(OrderedDict(quant=Quantise(), net=net)).eval()


def with_layer(net, name, layer, after):
    """``net``'s layers with ``layer`` inserted after the one called ``after``."""
    items = []
    for n, m in net.named_children():
        items.append((n, m))
        if n == after:
            items.append((name, layer))
    return nn.Sequential(OrderedDict(items)).eval()


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def input_grad(model, x, y):
    """The CE input gradient (and nothing left in the parameters' ``.grad``)."""
    xd = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xd), y, reduction="sum"), xd)
    return g


def no_hooks(model):
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            if getattr(m, attr, None):
                return False
    return True


@pytest.fixture(scope="module")
def digits_test():
    from advlab.data import load_dataset

    ds = load_dataset("digits", split="test")
    return ds.images[:200], ds.labels[:200]


@pytest.fixture()
def net(lenet_digits):
    assert no_hooks(lenet_digits)
    return lenet_digits.eval()


# ---------------------------------------------------------------------------------------------- straight-through
def test_straight_through_forward_exact_backward_approx():
    x = torch.linspace(-1, 1, 11, dtype=torch.float64).requires_grad_(True)
    y = StraightThrough.apply(x, torch.round, None)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    x.grad = None
    straight_through(x, torch.round, lambda t: t ** 2).sum().backward()
    assert torch.allclose(x.grad, 2 * x.detach())
    # approx may change the shape like fn does
    x.grad = None
    straight_through(x, lambda t: t[:5].sign(), lambda t: 3 * t[:5]).sum().backward()
    assert torch.equal(x.grad, torch.tensor([3.0] * 5 + [0.0] * 6, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- 1. quantiser
def test_bpda_breaks_the_input_quantiser(net, digits_test):
    x, y = digits_test
    model = quantised(net)
    assert zero_gradient_fraction(model, x, y) == 1.0
    assert find_gradient_killers(model, x[:32]) == ["quant"]
    wrapped = BPDA(model, layers=["quant"])
    # forward values bit for bit; gradient = the network's gradient at the quantised input
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))
    assert torch.allclose(input_grad(wrapped, x, y), input_grad(net, quantise(x), y), atol=1e-6)
    assert zero_gradient_fraction(wrapped, x, y) == 0.0

    clean = accuracy(model, x, y)
    plain = accuracy(model, PGD(model, eps=0.3, steps=40, seed=0)(x, y), y)
    through = accuracy(model, PGD(wrapped, eps=0.3, steps=40, seed=0)(x, y), y)  # judged by the real model
    print(f"\nquantised LeNet: clean {clean:.3f}, PGD {plain:.3f}, PGD through BPDA {through:.3f}")
    assert clean > 0.9
    assert plain > 0.7          # the masked gradient makes PGD fail (only its random start does anything)
    assert through < 0.05       # BPDA fools (nearly) every image
    # the same with the quantiser as an input transform of the bare network, and with a module object
    tr = BPDA(net, input_transform=quantise)
    with torch.no_grad():
        assert torch.equal(tr(x), model(x))
    assert accuracy(model, PGD(tr, eps=0.3, steps=40, seed=0)(x, y), y) < 0.05
    assert BPDA(model, layers=[model.quant]).layer_names == ("quant",)
    assert BPDA(model, layers="quant").layer_names == ("quant",)


def test_custom_approx_scales_the_gradient(net, digits_test):
    x, y = digits_test[0][:16], digits_test[1][:16]
    model = quantised(net)
    g1 = input_grad(BPDA(model, ["quant"]), x, y)
    g2 = input_grad(BPDA(model, ["quant"], approx=lambda t: 2 * t), x, y)
    g3 = input_grad(BPDA(model, ["quant"], approx={"quant": lambda t: 2 * t}), x, y)
    assert torch.allclose(g2, 2 * g1) and torch.allclose(g3, g2)


# ---------------------------------------------------------------------------------------------- 2. auto
def test_auto_bpda(net, digits_test):
    x, y = digits_test
    model = quantised(net)
    wrapped, names = auto_bpda(model, x[:32], y[:32])
    assert names == ["quant"] and isinstance(wrapped, BPDA) and wrapped.model is model
    assert accuracy(model, PGD(wrapped, eps=0.3, steps=40, seed=0)(x, y), y) < 0.05
    same, names = auto_bpda(net, x[:32], y[:32])
    assert same is net and names == []
    assert no_hooks(model)


def test_auto_bpda_warns_on_vanishing_gradients(net, digits_test):
    x, y = digits_test[0][:32], digits_test[1][:32]
    hot = nn.Sequential(OrderedDict(net=net, temp=Scale(1000.0), out=nn.LogSoftmax(dim=1))).eval()
    assert zero_gradient_fraction(hot, x, y) > 0.5
    assert find_gradient_killers(hot, x) == []
    with pytest.warns(RuntimeWarning, match="vanishing"):
        same, names = auto_bpda(hot, x, y)
    assert same is hot and names == []


# ---------------------------------------------------------------------------------------------- 3. killers in the middle
@pytest.mark.parametrize("name,layer,after", [("sign", Sign(), "fc1"), ("sat", Saturate(), "fc1"),
                                              ("thr", Threshold(), "relu3")])
def test_killers_in_the_middle(net, digits_test, name, layer, after):
    x, y = digits_test
    model = with_layer(net, name, layer, after)
    assert zero_gradient_fraction(model, x, y) > 0.9
    assert find_gradient_killers(model, x[:32]) == [name]
    wrapped, names = auto_bpda(model, x[:32], y[:32])
    assert names == [name]
    assert zero_gradient_fraction(wrapped, x, y) == 0.0
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))
    clean = accuracy(model, x, y)
    through = accuracy(model, PGD(wrapped, eps=0.3, steps=40, seed=0)(x, y), y)
    print(f"\n{name} after {after}: clean {clean:.3f}, PGD through BPDA {through:.3f}")
    assert clean > 0.6 and through < 0.05


def test_container_with_functional_killer_needs_an_approx(net, digits_test):
    x, y = digits_test
    items = [(n, SignedLinear(m) if n == "fc1" else m) for n, m in net.named_children()]
    model = nn.Sequential(OrderedDict(items)).eval()
    assert find_gradient_killers(model, x[:32]) == ["fc1"]  # the container, not its linear child
    assert find_gradient_killers(model, x[:32], names=["fc1.fc", "head"]) == []
    with pytest.warns(RuntimeWarning, match="change the shape"):
        same, names = auto_bpda(model, x[:32], y[:32])
    assert same is model and names == []
    with pytest.raises(AdvlabError, match="changes the shape"):
        BPDA(model, ["fc1"])(x.clone().requires_grad_(True))
    assert no_hooks(model)
    # sign(fc(h)) approximated by fc(h)
    wrapped = BPDA(model, ["fc1"], approx=lambda h: model.fc1.fc(h))
    assert zero_gradient_fraction(wrapped, x, y) == 0.0
    assert accuracy(model, PGD(wrapped, eps=0.3, steps=40, seed=0)(x, y), y) < 0.05


# ---------------------------------------------------------------------------------------------- 4. EoT
def test_eot_lowers_gradient_variance_and_strengthens_pgd(net, digits_test):
    x, y = digits_test
    noisy = Noisy(net, sigma=0.5, seed=0)

    def variance(model, repeats=20):
        g = torch.stack([input_grad(model, x[:16], y[:16]) for _ in range(repeats)])
        return float(g.var(dim=0).mean())

    v1, v10 = variance(noisy), variance(EoT(noisy, samples=10))
    judge = EoT(Noisy(net, sigma=0.5, seed=123), samples=100)  # independent draws, averaged logits
    clean = float((judge.predict(x) == y).float().mean())
    single = float((judge.predict(PGD(noisy, eps=0.1, steps=10, seed=0)(x, y)) == y).float().mean())
    eot = float((judge.predict(PGD(EoT(noisy, 10), eps=0.1, steps=10, seed=0)(x, y)) == y).float().mean())
    print(f"\nnoisy LeNet (sigma 0.5): gradient variance 1 draw {v1:.3g}, EoT-10 {v10:.3g} (ratio {v1 / v10:.1f}); "
          f"clean {clean:.3f}, PGD one draw {single:.3f}, PGD through EoT-10 {eot:.3f}")
    assert v10 < v1 / 4  # about 1/10 expected
    assert clean > 0.85
    assert eot <= single - 0.1


def test_eot_on_a_deterministic_model(net, digits_test):
    x = digits_test[0][:32]
    with torch.no_grad():
        z = net(x)
        assert torch.equal(EoT(net, samples=1)(x), z)
        assert torch.equal(EoT(net, samples=1, batched=False)(x), z)
        assert torch.allclose(EoT(net, samples=4)(x), z, atol=1e-5)
        assert torch.allclose(EoT(net, samples=4, batched=False)(x), z, atol=1e-5)
        lp = EoT(net, samples=3, average="probs")(x)
        assert torch.allclose(lp, F.log_softmax(z, 1), atol=1e-5)
        assert torch.equal(EoT(net, samples=3).predict(x), z.argmax(1))
    assert torch.allclose(input_grad(EoT(net, 3), x, digits_test[1][:32]), input_grad(net, x, digits_test[1][:32]),
                          atol=1e-5)


def test_eot_probs_averages_softmax(net, digits_test):
    x = digits_test[0][:8]
    noisy = Noisy(net, seed=1)
    with torch.no_grad():
        lp = EoT(noisy, samples=5, average="probs")(x)
        ref = Noisy(net, seed=1)
        p = F.softmax(ref(x.repeat(5, 1, 1, 1)).view(5, 8, -1), dim=-1).mean(0)
    assert torch.allclose(lp.exp().sum(1), torch.ones(8), atol=1e-5)
    assert torch.allclose(lp, p.log(), atol=1e-5)


@pytest.mark.parametrize("batched", [True, False])
def test_eot_predict_majority_vote_with_reject(net, digits_test, batched):
    x = digits_test[0][:32]
    with torch.no_grad():
        pred = net(x).argmax(1)
    mostly_ok = EoT(Rejecting(net, p=0.2), samples=25, batched=batched)
    assert torch.equal(mostly_ok.predict(x), pred)
    mostly_rej = EoT(Rejecting(net, p=0.8), samples=25, batched=batched)
    assert torch.equal(mostly_rej.predict(x), torch.full_like(pred, REJECT))
    assert mostly_ok.detect(x).shape == (32,)
    # BPDA delegates predict / detect
    b = BPDA(Rejecting(net, p=1.0), input_transform=quantise)
    assert bool((b.predict(x) == REJECT).all()) and b.has_detector
    assert torch.allclose(b.detect(x), net(quantise(x)).logsumexp(1))
    with pytest.raises(AdvlabError, match="no detector"):
        EoT(net).detect(x)


# ---------------------------------------------------------------------------------------------- 5. model untouched
@pytest.mark.parametrize("training", [False, True])
def test_wrappers_leave_the_model_unchanged(net, digits_test, training):
    x, y = digits_test[0][:32], digits_test[1][:32]
    model = quantised(net)
    noisy = Noisy(model)
    before = {k: v.clone() for k, v in noisy.state_dict().items()}
    flags = [p.requires_grad for p in noisy.parameters()]
    noisy.train(training)   # the shared LeNet inside too: back to eval mode in the finally, pass or fail
    try:
        for wrapper in (BPDA(model, ["quant"]), BPDA(net, input_transform=quantise), EoT(noisy, 4),
                        EoT(BPDA(noisy, ["model.quant"]), 3), BPDA(EoT(noisy, 2), ["model.model.quant"])):
            PGD(wrapper, eps=0.3, steps=3, seed=0)(x, y)
            input_grad(wrapper, x, y)
            find_gradient_killers(wrapper, x[:8])
            auto_bpda(wrapper, x[:8], y[:8])
            assert no_hooks(noisy)
            assert noisy.training == training and all(m.training == training for m in noisy.modules())
            assert [p.requires_grad for p in noisy.parameters()] == flags
            assert all(p.grad is None for p in noisy.parameters())
            for k, v in noisy.state_dict().items():
                assert torch.equal(v, before[k])
            assert set(vars(model.quant)) == set(vars(Quantise()))
    finally:
        noisy.eval()


def test_hooks_are_removed_after_an_error(net, digits_test):
    x = digits_test[0][:4].clone().requires_grad_(True)
    with pytest.raises(AdvlabError, match="changes the shape"):
        BPDA(net, ["fc1"])(x)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.ReLU(inplace=True))
    with pytest.raises(AdvlabError, match="in place"):
        BPDA(relu, ["2"])(x)
    assert no_hooks(net) and no_hooks(relu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_wrappers_follow_the_model_device(net, digits_test):
    import copy

    x, y = digits_test
    gpu = copy.deepcopy(net).cuda()
    model = quantised(gpu)
    assert find_gradient_killers(model, x[:32]) == ["quant"]  # x on the CPU, model on the GPU
    wrapped, names = auto_bpda(model, x[:32], y[:32])
    assert names == ["quant"]
    x_adv = PGD(wrapped, eps=0.3, steps=40, seed=0)(x, y)
    assert accuracy(model, x_adv.cuda(), y.cuda()) < 0.05
    xc = x[:16].cuda()
    assert EoT(Noisy(gpu), 4)(xc).device.type == "cuda"
    assert EoT(Noisy(gpu), 4, average="probs").predict(xc).device.type == "cuda"
    assert EoT(Rejecting(gpu, p=0.2), 5).predict(xc).device.type == "cuda"
    assert input_grad(BPDA(gpu, input_transform=quantise), xc, y[:16].cuda()).abs().sum() > 0


# ---------------------------------------------------------------------------------------------- 6. bad input
def test_bad_input_raises(net, digits_test):
    x, y = digits_test[0][:8], digits_test[1][:8]
    model = quantised(net)
    with pytest.raises(AdvlabError, match="no layer named 'nope'.*quant"):
        BPDA(model, ["nope"])
    with pytest.raises(AdvlabError, match="not a submodule"):
        BPDA(model, [nn.ReLU()])
    with pytest.raises(AdvlabError, match="needs layers"):
        BPDA(model)
    with pytest.raises(AdvlabError, match=r"layer name must not be empty"):
        BPDA(model, [""])
    with pytest.raises(AdvlabError, match="torch.nn.Module"):
        BPDA(lambda t: t, ["quant"])
    with pytest.raises(AdvlabError, match="layers must hold"):
        BPDA(model, [3])
    with pytest.raises(AdvlabError, match="approx must be"):
        BPDA(model, ["quant"], approx=3)
    with pytest.raises(AdvlabError, match="not in layers"):
        BPDA(model, ["quant"], approx={"net": None})
    with pytest.raises(AdvlabError, match="input_transform must be"):
        BPDA(net, input_transform=5)
    with pytest.raises(AdvlabError, match="input_transform must return"):
        BPDA(net, input_transform=lambda t: t[..., :4])(x)
    with pytest.raises(AdvlabError, match="identity approximation"):
        BPDA(net, input_transform=lambda t: t[..., :4])(x.clone().requires_grad_(True))
    with pytest.raises(AdvlabError, match="approx must return"):
        xr = x.clone().requires_grad_(True)  # grad w.r.t. the input only: nothing left in the shared model's .grad
        torch.autograd.grad(F.cross_entropy(BPDA(model, ["quant"], approx=lambda t: t[..., :4])(xr), y), xr)
    with pytest.raises(AdvlabError, match="no detector"):
        BPDA(model, ["quant"]).detect(x)
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(AdvlabError, match=rf"^samples must be an integer >= 1, got {re.escape(repr(bad))}$"):
            EoT(net, samples=bad)
    with pytest.raises(AdvlabError, match="average must be"):
        EoT(net, average="mean")
    with pytest.raises(AdvlabError, match="batched"):
        EoT(net, batched="yes")
    with pytest.raises(AdvlabError, match="torch.nn.Module"):
        EoT(None)
    with pytest.raises(AdvlabError, match="no layer named"):
        find_gradient_killers(model, x, names=["nope"])
    with pytest.raises(AdvlabError, match=r"^x must hold pixel values in \[0, 1\]"):
        find_gradient_killers(model, x * 2)
    with pytest.raises(AdvlabError, match=r"^x is an empty batch"):
        find_gradient_killers(model, x[:0])
    with pytest.raises(AdvlabError, match="min_fraction"):
        find_gradient_killers(model, x, min_fraction=0)
    with pytest.raises(AdvlabError, match=r"^y must have shape \(8,\), got shape \(3,\)"):
        auto_bpda(model, x, y[:3])
    with pytest.raises(AdvlabError, match=r"^threshold must be in \[0, 1\)"):
        auto_bpda(model, x, y, threshold=1.0)
    with pytest.raises(AdvlabError, match="max_rounds"):
        auto_bpda(model, x, y, max_rounds=0)
    with pytest.raises(AdvlabError, match="callable"):
        straight_through(x, 3)
    assert no_hooks(model)
