"""Gradient-masking checks (advlab.eval.checks): each check fires on a model built to trigger it
and stays quiet on the plain LeNet-5 trained on the 8x8 digits."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from advlab._util import AdvlabError
from advlab.eval.checks import (
    Flag,
    attack_checks,
    eps_sweep_check,
    is_randomized,
    model_checks,
    output_kind,
    zero_gradient_fraction,
)


# ---------------------------------------------------------------------------------------------- models
class Quantise(nn.Module):
    """Input quantiser to 5 grey levels: its gradient is zero almost everywhere (shattered)."""

    def forward(self, x):
        return torch.round(x * 4) / 4


class Head(nn.Module):
    """``fn(model(x))``: a softmax / log-softmax / temperature left on top of the logits."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x):
        return self.fn(self.model(x))


class Noisy(nn.Module):
    """Adds Gaussian noise to the input at every forward pass, eval mode included."""

    def __init__(self, model: nn.Module, sigma: float = 0.05, seed: int = 0):
        super().__init__()
        self.model, self.sigma = model, sigma
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x):
        noise = torch.randn(x.shape, generator=self.gen).to(x.device)
        return self.model((x + self.sigma * noise).clamp(0, 1))


def names(flags):
    return [f.name for f in flags]


@pytest.fixture(scope="module")
def digits_test():
    from advlab.data import load_dataset

    d = load_dataset("digits", split="test")
    return d.images, d.labels


@pytest.fixture()
def plain(lenet_digits):
    return lenet_digits.eval()


# ---------------------------------------------------------------------------------------------- 1. zero gradients
def test_quantiser_zeroes_every_gradient(plain, digits_test):
    x, y = digits_test
    q = nn.Sequential(Quantise(), plain)
    frac = zero_gradient_fraction(q, x, y)
    assert frac == 1.0  # all 359 test images
    flags = model_checks(q, x, y)
    assert names(flags) == ["zero-gradients"]
    assert "100.0%" in flags[0].message and "359" in flags[0].message
    assert "BPDA" in flags[0].meaning


def test_plain_model_has_gradients(plain, digits_test):
    x, y = digits_test
    assert zero_gradient_fraction(plain, x, y) == 0.0
    assert zero_gradient_fraction(plain, x, y, loss="margin") == 0.0
    assert model_checks(plain, x, y) == []


def test_zero_gradient_fraction_is_batch_size_invariant(plain, digits_test):
    x, y = digits_test
    ls = Head(plain, lambda z: torch.log_softmax(1000 * z, 1))
    assert zero_gradient_fraction(ls, x, y, batch_size=37) == zero_gradient_fraction(ls, x, y, batch_size=512)


def test_zero_gradient_fraction_works_under_no_grad_and_for_constant_models(digits_test):
    x, y = digits_test
    x, y = x[:8], y[:8]
    const = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        const[1].weight.zero_()
    with torch.no_grad():  # the caller's no_grad must not hide the gradient
        assert zero_gradient_fraction(const, x, y) == 1.0

    class Detached(nn.Module):  # output not connected to x at all
        def forward(self, x):
            return torch.zeros(x.shape[0], 10)

    assert zero_gradient_fraction(Detached(), x, y) == 1.0


# ---------------------------------------------------------------------------------------------- 2. output kind
def test_log_softmax_with_temperature_is_flagged_and_saturates(plain, digits_test):
    x, y = digits_test
    ls = Head(plain, lambda z: torch.log_softmax(1000 * z, 1))
    assert output_kind(ls, x) == "log-probabilities"
    frac = zero_gradient_fraction(ls, x, y)
    # every correctly classified image saturates (p_y == 1.0 and the other exp() underflow to 0 in
    # float32); only the misclassified ones keep a gradient
    with torch.no_grad():
        acc = float((plain(x).argmax(1) == y).float().mean())
    assert frac > 0.9 and frac == pytest.approx(acc, abs=1 / len(y))
    assert names(model_checks(ls, x, y)) == ["zero-gradients", "log-probability-outputs"]
    # the logit margin does not saturate: the same model has gradients under it
    assert zero_gradient_fraction(ls, x, y, loss="margin") == 0.0


def test_softmax_output_is_flagged(plain, digits_test):
    x, y = digits_test
    sm = Head(plain, lambda z: torch.softmax(z, 1))
    assert output_kind(sm, x) == "probabilities"
    assert names(model_checks(sm, x, y)) == ["probability-outputs"]
    assert output_kind(plain, x) == "logits"
    # plain log_softmax (no temperature): log-probabilities, but gradients survive
    lsm = Head(plain, lambda z: torch.log_softmax(z, 1))
    assert output_kind(lsm, x) == "log-probabilities"
    assert names(model_checks(lsm, x, y)) == ["log-probability-outputs"]


def test_output_kind_on_tiny_random_models():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 4, 4, generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    assert output_kind(net, x) == "logits"
    assert output_kind(Head(net, lambda z: z.softmax(1)), x, batch_size=3) == "probabilities"
    assert output_kind(Head(net, lambda z: z.log_softmax(1)), x, batch_size=3) == "log-probabilities"
    # non-negative rows that do not sum to 1 are scores, not probabilities
    assert output_kind(Head(net, lambda z: z.softmax(1) * 2), x) == "logits"
    # one row off is enough to make the whole output logits
    assert output_kind(Head(net, lambda z: torch.cat([z[:1], z[1:].softmax(1)])), x) == "logits"


# ---------------------------------------------------------------------------------------------- 3. randomness
def test_noisy_model_is_randomized(plain, digits_test):
    x, y = digits_test
    noisy = Noisy(plain, sigma=0.05)
    assert is_randomized(noisy, x[:32])
    assert names(model_checks(noisy, x, y)) == ["randomized"]
    assert not is_randomized(plain, x)


def test_dropout_in_training_mode_is_switched_off_and_mode_restored(digits_test):
    x, y = digits_test
    x, y = x[:32], y[:32]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)).train()
    assert not is_randomized(net, x, repeats=4)  # run in eval mode: dropout is off
    assert model_checks(net, x, y) == []
    assert net.training
    assert all(p.requires_grad and p.grad is None for p in net.parameters())


# ---------------------------------------------------------------------------------------------- 4. attack numbers
def test_attack_checks_single_step_vs_iterative():
    flags = attack_checks({"FGSM": 0.3, "PGD": 0.5})
    assert names(flags) == ["single-step-beats-iterative"]
    assert "30.0%" in flags[0].message and "50.0%" in flags[0].message
    assert attack_checks({"FGSM": 0.5, "PGD": 0.2}) == []
    assert attack_checks({"FGSM": 0.5, "PGD": 0.5}) == []
    # case-insensitive names; tolerance
    assert names(attack_checks({"fgsm": 0.3, "pgd": 0.35, "APGD-CE": 0.2})) == ["single-step-beats-iterative"]
    assert attack_checks({"FGSM": 0.3, "PGD": 0.35}, tol=0.1) == []


def test_attack_checks_black_box_vs_white_box():
    flags = attack_checks({"Square": 0.1, "PGD": 0.4})
    assert names(flags) == ["black-box-beats-white-box"]
    assert "Square 10.0%" in flags[0].message and "PGD 40.0%" in flags[0].message
    # one white-box attack at least as strong as Square: no flag
    assert attack_checks({"Square": 0.1, "PGD": 0.4, "CW": 0.05}) == []
    # transfer attacks count too; unknown names are white-box
    assert names(attack_checks({"transfer-lenet": 0.1, "CW": 0.3}, transfer=("transfer-lenet",))) == [
        "black-box-beats-white-box"]
    # no white-box number: nothing to compare; NaN (empty run) entries are ignored
    assert attack_checks({"Square": 0.1}) == []
    assert attack_checks({"Square": 0.1, "PGD": float("nan")}) == []
    both = attack_checks({"FGSM": 0.2, "PGD": 0.5, "Square": 0.1})
    assert names(both) == ["single-step-beats-iterative", "black-box-beats-white-box"]


# ---------------------------------------------------------------------------------------------- 5. eps sweep
def test_eps_sweep_check():
    flags = eps_sweep_check([0.1, 0.3, 0.5], [0.8, 0.6, 0.5])
    assert names(flags) == ["no-convergence-at-large-eps"]
    assert "50.0%" in flags[0].message and "eps=0.5" in flags[0].message
    assert eps_sweep_check([0.1, 0.3, 0.5], [0.6, 0.1, 0.0]) == []
    assert names(eps_sweep_check([0.1, 0.3, 0.5], [0.6, 0.1, 0.3])) == [
        "accuracy-rises-with-eps", "no-convergence-at-large-eps"]
    assert names(eps_sweep_check([0.1, 0.2, 0.3, 0.5], [0.6, 0.1, 0.3, 0.0])) == ["accuracy-rises-with-eps"]
    # order of the points does not matter; small wiggles within tol are fine
    assert eps_sweep_check([0.5, 0.1, 0.3], [0.0, 0.6, 0.1]) == []
    assert eps_sweep_check([0.1, 0.2, 0.3], [0.2, 0.205, 0.0]) == []
    assert eps_sweep_check([0.1, 0.3, 0.5], [0.8, 0.6, 0.5], floor=0.5) == []


# ---------------------------------------------------------------------------------------------- flags, errors
def test_flag_to_dict_is_json_ready():
    f = Flag("randomized", "m", "meaning")
    assert f.to_dict() == {"name": "randomized", "message": "m", "meaning": "meaning"}
    json.dumps([f.to_dict() for f in attack_checks({"FGSM": 0.3, "PGD": 0.5, "Square": 0.1})])


def test_bad_input_raises(plain, digits_test):
    x, y = digits_test
    x, y = x[:4], y[:4]
    for fn in (lambda m, xx, yy: zero_gradient_fraction(m, xx, yy), lambda m, xx, yy: output_kind(m, xx),
               lambda m, xx, yy: is_randomized(m, xx), lambda m, xx, yy: model_checks(m, xx, yy)):
        with pytest.raises(AdvlabError, match=r"^x is an empty batch"):
            fn(plain, x[:0], y[:0])
        with pytest.raises(AdvlabError, match=r"^x must hold pixel values in \[0, 1\]"):
            fn(plain, x * 2, y)
        with pytest.raises(AdvlabError, match=r"^x must have shape \(N, C, H, W\)"):
            fn(plain, x[:, 0], y)
        with pytest.raises(AdvlabError, match="torch.nn.Module"):
            fn(lambda t: t, x, y)
    for bad_y, needle in ((y[:3], r"^y must have shape \(4,\), got shape \(3,\)"),
                          (y.float(), r"^y must be an integer tensor"), (y + 10, r"^y holds labels outside \[0, 9\]")):
        with pytest.raises(AdvlabError, match=needle):
            zero_gradient_fraction(plain, x, bad_y)
        with pytest.raises(AdvlabError, match=needle):
            model_checks(plain, x, bad_y)
    with pytest.raises(AdvlabError, match="loss"):
        zero_gradient_fraction(plain, x, y, loss="hinge")
    with pytest.raises(AdvlabError, match="repeats"):
        is_randomized(plain, x, repeats=1)
    with pytest.raises(AdvlabError, match="zero_grad_threshold"):
        model_checks(plain, x, y, zero_grad_threshold=1.5)
    assert output_kind(nn.Flatten(), x) == "logits"  # (N, 64) scores are fine ...
    with pytest.raises(AdvlabError, match=r"model must return scores of shape \(4, K\)"):
        output_kind(nn.Identity(), x)  # ... (N, C, H, W) is not a score matrix
    with pytest.raises(AdvlabError, match="percentage"):
        attack_checks({"FGSM": 30.0, "PGD": 50.0})
    with pytest.raises(AdvlabError, match="both"):
        attack_checks({"FGSM": 0.3}, black_box=("FGSM",))
    with pytest.raises(AdvlabError, match="same length"):
        eps_sweep_check([0.1, 0.2], [0.5])
    with pytest.raises(AdvlabError, match="at least one"):
        eps_sweep_check([], [])
    with pytest.raises(AdvlabError, match="distinct"):
        eps_sweep_check([0.1, 0.1], [0.5, 0.4])
    with pytest.raises(AdvlabError, match=r"^robust_acc\[1\] must be a robust accuracy in \[0, 1\]"):
        eps_sweep_check([0.1, 0.2], [0.5, 1.4])
    with pytest.raises(AdvlabError, match="NaN"):
        eps_sweep_check([0.1, 0.2], [0.5, math.nan])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checks_follow_the_model_device(plain, digits_test):
    import copy

    x, y = digits_test
    gpu = copy.deepcopy(plain).cuda()
    q = nn.Sequential(Quantise(), gpu)
    assert zero_gradient_fraction(q, x, y) == 1.0  # x and y on the CPU, model on the GPU
    assert model_checks(gpu, x, y) == []
    assert names(model_checks(Head(gpu, lambda z: z.softmax(1)), x.cuda(), y.cuda())) == ["probability-outputs"]
