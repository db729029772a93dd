"""The gradient-masking checks (advlab.eval.checks) on tiny hand-made models and hand-made numbers:
each check's decision at its boundaries, its batching, its errors, and every flag's full message
and meaning (what a report prints), pinned (sharp enough for mutation testing,
benchmarks/mutation.py)."""

import math

import pytest
import torch
from torch import nn

from advlab._util import AdvlabError
from advlab.eval.checks import (_TRUST_OTHERS, OUTPUT_KINDS, Flag, attack_checks, eps_sweep_check, is_randomized,
                                model_checks, output_kind, zero_gradient_fraction)

TRUST = _TRUST_OTHERS


class Fn(nn.Module):
    """A model from a function of the input."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


class Scripted(nn.Module):
    """Returns the rows of ``outs[k]`` for the images of the batch (their index is coded in pixel
    (1, 1), see :func:`batch`) on its k-th call, then the last one forever."""

    def __init__(self, *outs):
        super().__init__()
        self.outs, self.calls = list(outs), 0

    def forward(self, x):
        out = self.outs[min(self.calls, len(self.outs) - 1)]
        self.calls += 1
        return out[(x[:, 0, 1, 1] * 100).round().long()].clone()


def gated(x):
    """Logits with an exactly-zero input gradient on the rows whose first pixel is <= 0.5."""
    s = x.flatten(1).sum(1, keepdim=True)
    gate = (x.flatten(1)[:, :1] > 0.5).float()
    return torch.cat([s, -s, s * 0.5], 1) * gate


def batch(n=4, hot=(0,)):
    """Images whose first pixel is 0.75 (``hot``) or 0.25, with their index / 100 in pixel (1, 1)."""
    x = torch.full((n, 1, 2, 2), 0.25)
    for i in hot:
        x[i] = 0.75
    x[:, 0, 1, 1] = torch.arange(n) / 100
    return x


Y4 = torch.tensor([0, 1, 2, 0])


# ---------------------------------------------------------------------------- zero_gradient_fraction

def test_zero_gradient_fraction_counts_rows_across_batches():
    x = batch(5, hot=(0, 3))
    y = torch.tensor([0, 1, 2, 0, 1])
    for bs in (1, 2, 3, 256):
        assert zero_gradient_fraction(Fn(gated), x, y, batch_size=bs) == pytest.approx(3 / 5)
    assert zero_gradient_fraction(Fn(gated), x, y, loss="margin") == pytest.approx(3 / 5)
    assert zero_gradient_fraction(Fn(lambda v: v.flatten(1)[:, :3] * 2), x, y) == 0.0


def test_outputs_without_a_gradient_count_as_zero_in_every_batch():
    y = torch.tensor([0, 1, 2, 0, 1])
    const = Fn(lambda v: torch.zeros(v.shape[0], 3))  # no autograd path at all
    assert zero_gradient_fraction(const, batch(5), y, batch_size=2) == 1.0

    class Detached(nn.Module):  # depends on a tensor that requires grad, not on x: grad is None
        def __init__(self):
            super().__init__()
            self.w = torch.ones(1, 3, requires_grad=True)

        def forward(self, v):
            return self.w.expand(v.shape[0], 3) * 1.0

    assert zero_gradient_fraction(Detached(), batch(5), y, batch_size=2) == 1.0


def test_non_finite_gradients_are_not_zero():
    nan_grad = Fn(lambda v: torch.sqrt(v.flatten(1)[:, :3] - 0.25))  # d sqrt at 0 is inf
    assert zero_gradient_fraction(nan_grad, batch(4, hot=()), Y4) == 0.0


def test_zero_gradient_fraction_checks_labels_and_scores():
    m = Fn(gated)
    with pytest.raises(AdvlabError, match=r"^y holds labels outside \[0, 2\]: found range \[0, 3\]$"):
        zero_gradient_fraction(m, batch(4), torch.tensor([0, 1, 2, 3]), batch_size=2)
    with pytest.raises(AdvlabError, match=r"^y must have shape \(4,\)"):
        zero_gradient_fraction(m, batch(4), torch.tensor([0, 1]))
    with pytest.raises(AdvlabError, match="^loss must be one of"):
        zero_gradient_fraction(m, batch(4), Y4, loss="hinge")
    with pytest.raises(AdvlabError, match="^batch_size must be an integer >= 1, got 0$"):
        zero_gradient_fraction(m, batch(4), Y4, batch_size=0)


@pytest.mark.parametrize("call", ["zero", "kind", "random", "all"])
def test_every_model_check_validates_model_batch_and_scores(call):
    fns = {"zero": lambda m, x: zero_gradient_fraction(m, x, Y4[: x.shape[0]]), "kind": lambda m, x: output_kind(m, x),
           "random": lambda m, x: is_randomized(m, x), "all": lambda m, x: model_checks(m, x, Y4[: x.shape[0]])}
    fn = fns[call]
    with pytest.raises(AdvlabError, match="^model must be a torch.nn.Module, got function$"):
        fn(gated, batch(4))
    with pytest.raises(AdvlabError, match="^x is an empty batch: the checks need at least one image$"):
        fn(Fn(gated), batch(4)[:0])
    with pytest.raises(AdvlabError, match=r"^the model must return a tensor of scores of shape \(N, K\), got tuple$"):
        fn(Fn(lambda v: (gated(v),)), batch(4))
    with pytest.raises(AdvlabError, match=r"^the model must return scores of shape \(4, K\) for 4 images, "
                                          r"got shape \(4,\)$"):
        fn(Fn(lambda v: gated(v)[:, 0]), batch(4))
    with pytest.raises(AdvlabError, match=r"^the model must return scores of shape \(4, K\) for 4 images, "
                                          r"got shape \(3, 3\)$"):
        fn(Fn(lambda v: gated(v)[:3]), batch(4))
    with pytest.raises(AdvlabError, match=r"^the model must return floating-point scores, got dtype torch.int64 \(a model "
                                          r"that returns class indices has no gradient to check\)$"):
        fn(Fn(lambda v: gated(v).long()), batch(4))


def test_model_checks_restore_mode_and_grad_flags():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Dropout(0.5)).train()
    assert model_checks(net, batch(4), Y4) == []
    assert net.training and all(p.requires_grad and p.grad is None for p in net.parameters())


# ---------------------------------------------------------------------------- output_kind

def test_output_kind_decides_on_every_row_within_atol():
    assert OUTPUT_KINDS == ("logits", "probabilities", "log-probabilities")
    p = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    x = batch(2)
    assert output_kind(Scripted(p), x) == "probabilities"
    assert output_kind(Scripted(p.log()), x) == "log-probabilities"
    assert output_kind(Scripted(torch.tensor([[0.2, 0.3, 0.5], [2.0, -1.0, 0.0]])), x) == "logits"
    # atol: sums off by 0.5e-4 pass, by 2e-4 fail; a slightly negative probability passes
    assert output_kind(Scripted(torch.tensor([[0.2, 0.3, 0.50005], [1.0, 0.0, 0.0]])), x) == "probabilities"
    assert output_kind(Scripted(torch.tensor([[0.2, 0.3, 0.5002], [1.0, 0.0, 0.0]])), x) == "logits"
    assert output_kind(Scripted(torch.tensor([[-0.00005, 0.3, 0.70005], [1.0, 0.0, 0.0]])), x) == "probabilities"
    assert output_kind(Scripted(torch.tensor([[-0.0002, 0.3, 0.7002], [1.0, 0.0, 0.0]])), x) == "logits"
    assert output_kind(Scripted(torch.tensor([[0.2, 0.3, 0.5002], [1.0, 0.0, 0.0]])), x, atol=1e-3) == "probabilities"
    lp = p.log()
    assert output_kind(Scripted(torch.cat([lp[:1] + 0.00005, lp[1:]])), x) == "log-probabilities"
    assert output_kind(Scripted(torch.cat([lp[:1] + 0.0002, lp[1:]])), x) == "logits"
    # a positive log-probability within atol is allowed, beyond it is not
    assert output_kind(Scripted(torch.tensor([[0.00005, -30.0], [0.0, -40.0]])), x) == "log-probabilities"
    with pytest.raises(AdvlabError, match="^atol must be a finite number >= 0, got -1"):
        output_kind(Scripted(p), x, atol=-1)


def test_output_kind_carries_its_verdict_across_batches():
    p = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
    x = batch(4)
    mixed = torch.cat([p[:2], p[2:].log()])     # probabilities, then log-probabilities: neither
    assert output_kind(Scripted(mixed), x, batch_size=2) == "logits"
    assert output_kind(Scripted(torch.cat([p[:2].log(), p[2:]])), x, batch_size=2) == "logits"
    assert output_kind(Scripted(p), x, batch_size=1) == "probabilities"
    assert output_kind(Scripted(p.log()), x, batch_size=3) == "log-probabilities"
    # a logit row in the last batch only
    last = p.clone()
    last[3] = torch.tensor([3.0, -1.0, 0.5])
    assert output_kind(Scripted(last), x, batch_size=2) == "logits"


def test_output_kind_rejects_nan_scores():
    bad = torch.tensor([[0.2, float("nan"), 0.5], [1.0, 0.0, 0.0]])
    with pytest.raises(AdvlabError, match="^the model returned NaN scores; its outputs cannot be classified$"):
        output_kind(Scripted(bad), batch(2))
    ok_then_bad = torch.tensor([[3.0, 1.0, 0.5], [1.0, float("nan"), 0.0]])
    with pytest.raises(AdvlabError, match="NaN scores"):
        output_kind(Scripted(torch.tensor([[0.2, 0.3, 0.5], [1.0, float("nan"), 0.0]])), batch(2), batch_size=1)
    # logits in the first batch decide before the NaN is seen
    assert output_kind(Scripted(ok_then_bad), batch(2), batch_size=1) == "logits"


# ---------------------------------------------------------------------------- is_randomized

def test_is_randomized_tolerance_is_relative_to_the_row_norm():
    base = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]])   # row norms 5 and 1
    x = batch(2)
    assert not is_randomized(Scripted(base), x)
    small = base.clone()
    small[0, 2] += 4e-4        # 0.8e-4 of the row's norm 5
    assert not is_randomized(Scripted(base, small), x)
    large = base.clone()
    large[1, 2] += 2e-4        # 2e-4 of the row's norm 1
    assert is_randomized(Scripted(base, large), x)
    assert not is_randomized(Scripted(base, large), x, rtol=1e-3)
    zero = torch.zeros(2, 3)
    assert is_randomized(Scripted(zero, zero + 1e-13), x)          # a zero row: any change counts
    assert not is_randomized(Scripted(zero, zero), x)
    with pytest.raises(AdvlabError, match="^rtol must be a finite number >= 0, got -0.1"):
        is_randomized(Scripted(base), x, rtol=-0.1)


def test_is_randomized_other_signs_and_repeats():
    base = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]])
    x = batch(2)
    flipped = base.clone()
    flipped[1] = torch.tensor([1.0, 1.00001, 0.0])   # tiny move, but the class changes
    assert is_randomized(Scripted(base, flipped), x, rtol=1.0)
    nan1 = base.clone()
    nan1[0, 2] = float("nan")
    assert is_randomized(Scripted(base, nan1), x, rtol=1.0)
    assert not is_randomized(Scripted(nan1, nan1), x)
    assert is_randomized(Scripted(base, base[:, :2]), x, rtol=1.0)   # the shape changed
    # only the k-th pass differs: found with repeats >= k
    assert not is_randomized(Scripted(base, base, large_of(base)), x, repeats=2)
    assert is_randomized(Scripted(base, base, large_of(base)), x, repeats=3)
    with pytest.raises(AdvlabError, match="^repeats must be an integer >= 2, got 1$"):
        is_randomized(Scripted(base), x, repeats=1)


def large_of(t):
    out = t.clone()
    out[:, 2] += 1.0
    return out


def test_is_randomized_looks_at_every_batch():
    base = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 5.0]])

    class LastRowNoisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, v):
            self.calls += 1
            out = base[: v.shape[0]].clone() if v.shape[0] == 4 else base[int(v[0, 0, 0, 1] * 4 - 1):][: v.shape[0]].clone()
            if v.shape[0] < 4 and float(v[-1, 0, 0, 1]) == 1.0:
                out[-1, 2] += float(self.calls)
            return out

    x = batch(4, hot=())
    x[:, 0, 0, 1] = torch.tensor([0.25, 0.5, 0.75, 1.0])
    assert is_randomized(LastRowNoisy(), x, batch_size=2)
    assert is_randomized(LastRowNoisy(), x, batch_size=3)


# ---------------------------------------------------------------------------- model_checks

def test_model_checks_flags_in_full():
    x = batch(4)
    assert [f.to_dict() for f in model_checks(Fn(lambda v: v.flatten(1)[:, :3] * 0.0), x, Y4)] == EXPECTED_ZERO
    custom = model_checks(Fn(lambda v: v.flatten(1)[:, :3] * 0.0), x, Y4, loss=lambda z, yy, t: z.sum(1))
    assert [f.to_dict() for f in custom] == EXPECTED_ZERO_CUSTOM
    prob = model_checks(Fn(lambda v: torch.softmax(v.flatten(1)[:, :3] * 3, 1)), x, Y4)
    assert [f.to_dict() for f in prob] == EXPECTED_PROB
    logprob = model_checks(Fn(lambda v: torch.log_softmax(v.flatten(1)[:, :3] * 3, 1)), x, Y4)
    assert [f.to_dict() for f in logprob] == EXPECTED_LOGPROB
    g = torch.Generator().manual_seed(0)
    noisy = Fn(lambda v: v.flatten(1)[:, :3] + torch.randn(v.shape[0], 3, generator=g))
    assert [f.to_dict() for f in model_checks(noisy, x, Y4, repeats=5)] == EXPECTED_RAND
    assert all(isinstance(f, Flag) for f in prob)


def test_model_checks_zero_gradient_threshold_is_strict():
    x = batch(4, hot=(0, 1, 2))   # one row of four has a zero gradient
    assert model_checks(Fn(gated), x, Y4, zero_grad_threshold=0.25) == []
    flags = model_checks(Fn(gated), x, Y4, zero_grad_threshold=0.2)
    assert [f.name for f in flags] == ["zero-gradients"]
    assert flags[0].message == ("the ce-loss input gradient is exactly zero on 25.0% of 4 clean inputs (1 images; "
                                "threshold 20.0%)")
    assert model_checks(Fn(gated), x, Y4) != []                       # default threshold 0.1
    assert model_checks(Fn(gated), x, Y4, zero_grad_threshold=1) == []
    assert [f.name for f in model_checks(Fn(gated), x, Y4, zero_grad_threshold=0)] == ["zero-gradients"]
    margin = model_checks(Fn(gated), x, Y4, zero_grad_threshold=0.2, loss="margin")
    assert margin[0].message.startswith("the margin-loss input gradient")
    for bad in (True, -0.01, 1.01):
        with pytest.raises(AdvlabError, match=f"^zero_grad_threshold must be in \\[0, 1\\], got {bad}$"):
            model_checks(Fn(gated), x, Y4, zero_grad_threshold=bad)


def test_model_checks_pass_repeats_and_batch_size_on():
    base = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 5.0]])

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def forward(self, v):
            self.sizes.append(v.shape[0])
            return base[: v.shape[0]] + 1e-3 * v.flatten(1)[:, :3]

    m = Counting()
    assert model_checks(m, batch(4), Y4, repeats=4, batch_size=3) == []
    # zero gradients: 2 batches; output kind: logits seen in the first batch, done; randomized: 2 batches x 4 passes
    assert m.sizes == [3, 1] + [3] + [3, 3, 3, 3, 1, 1, 1, 1]


# ---------------------------------------------------------------------------- attack_checks

def test_single_step_beats_iterative_in_full():
    flags = attack_checks({"FGSM": 0.3, "fgsm-2": 0.1, "PGD": 0.5, "APGD-CE": 0.35}, single_step=("FGSM", "FGSM-2"),
                          tol=0.01)
    assert [f.to_dict() for f in flags] == EXPECTED_SS


def test_single_step_tolerance_is_strict_and_defaults_apply():
    assert attack_checks({"FGSM": 0.25, "PGD": 0.5}, tol=0.25) == []         # gap == tol: no flag
    assert [f.name for f in attack_checks({"FGSM": 0.25, "PGD": 0.51}, tol=0.25)] == ["single-step-beats-iterative"]
    assert [f.name for f in attack_checks({"FGSM": 0.3, "apgd-ce": 0.31})] == ["single-step-beats-iterative"]
    assert attack_checks({"FGSM": 0.3, "PGD": 0.3}) == []
    assert attack_checks({"FGSM": 0.3, "BIM": 0.5}) == []                    # BIM is not in the default iterative list
    assert [f.name for f in attack_checks({"FGSM": 0.3, "BIM": 0.5}, iterative="BIM")] == ["single-step-beats-iterative"]
    assert attack_checks({"FGSM": 0.3, "PGD": float("nan")}) == []
    assert attack_checks({}) == []


def test_black_box_beats_white_box_in_full():
    assert [f.to_dict() for f in attack_checks({"Square": 0.1, "PGD": 0.4, "CW": 0.3})] == EXPECTED_BB1
    two = attack_checks({"Square": 0.1, "T": 0.2, "PGD": 0.4, "CW": 0.3}, transfer=("t",), tol=0.05)
    assert [f.to_dict() for f in two] == EXPECTED_BB2


def test_black_box_needs_to_beat_every_white_box_attack_by_more_than_tol():
    assert attack_checks({"Square": 0.25, "CW": 0.5}, tol=0.25) == []      # gap == tol
    assert [f.name for f in attack_checks({"Square": 0.25, "CW": 0.51}, tol=0.25)] == ["black-box-beats-white-box"]
    assert attack_checks({"Square": 0.1, "CW": 0.1}) == []
    assert attack_checks({"Square": 0.1, "PGD": 0.4, "CW": 0.05}) == []
    assert attack_checks({"Square": 0.1, "Other": 0.05}, black_box=("Square", "Other")) == []   # no white-box
    assert attack_checks({"PGD": 0.1}) == []                                                   # no black-box
    flags = attack_checks({"square": 0.1, "FGSM": 0.2, "PGD": 0.2})
    assert [f.name for f in flags] == ["black-box-beats-white-box"]
    assert flags[0].message.startswith("square 10.0% beats every white-box attack (best white-box: FGSM 20.0%;")


def test_attack_checks_errors():
    with pytest.raises(AdvlabError, match="^robust must be a dict of attack name -> robust accuracy, got list$"):
        attack_checks([("PGD", 0.1)])
    with pytest.raises(AdvlabError, match="^tol must be a finite number >= 0, got -0.1$"):
        attack_checks({"PGD": 0.1}, tol=-0.1)
    with pytest.raises(AdvlabError, match="^attack 'pgd' is listed both in iterative and in black_box$"):
        attack_checks({"PGD": 0.1}, black_box=("pgd",))
    with pytest.raises(AdvlabError, match="^attack 'X' is listed both in single_step and in transfer$"):
        attack_checks({"PGD": 0.1}, single_step=("X",), transfer=("X",))
    with pytest.raises(AdvlabError, match=r"^robust must be keyed by attack name \(str\), got key 3$"):
        attack_checks({3: 0.1})
    with pytest.raises(AdvlabError, match=r"^robust holds attack 'pgd' twice \(names are case-insensitive\)$"):
        attack_checks({"PGD": 0.1, "pgd": 0.2})
    with pytest.raises(AdvlabError, match=r"^robust\['PGD'\] must be a number in \[0, 1\], got 'high'$"):
        attack_checks({"PGD": "high"})
    with pytest.raises(AdvlabError, match=r"^robust\['PGD'\] must be a number in \[0, 1\], got None$"):
        attack_checks({"PGD": None})
    for bad in (1.5, -0.01, 45):
        with pytest.raises(AdvlabError, match=r"^robust\['PGD'\] must be a robust accuracy in \[0, 1\] \(a fraction, "
                                              rf"not a percentage\), got {bad}$"):
            attack_checks({"PGD": bad})
    assert attack_checks({"PGD": 0.0, "FGSM": 1.0}) == []   # the ends are allowed
    with pytest.raises(AdvlabError, match="^iterative must be a sequence of attack names, got 3$"):
        attack_checks({"PGD": 0.1}, iterative=3)
    with pytest.raises(AdvlabError, match=r"^single_step must hold attack names \(str\), got 1$"):
        attack_checks({"PGD": 0.1}, single_step=("FGSM", 1))


# ---------------------------------------------------------------------------- eps_sweep_check

def test_eps_sweep_check_in_full():
    flags = eps_sweep_check([0.3, 0.1, 0.5, 0.2], [0.2, 0.6, 0.4, 0.1], floor=0.1, tol=0.02)
    assert [f.to_dict() for f in flags] == EXPECTED_EPS


def test_eps_sweep_check_boundaries():
    assert eps_sweep_check([0.1, 0.2], [0.5, 0.05]) == []                   # at the default floor: fine
    assert [f.name for f in eps_sweep_check([0.1, 0.2], [0.5, 0.06])] == ["no-convergence-at-large-eps"]
    assert eps_sweep_check([0.1, 0.2], [0.5, 0.1], floor=0.1) == []
    assert eps_sweep_check([0.1, 0.2, 0.3], [0.25, 0.125, 0.25], floor=0.5, tol=0.125) == []   # a rise of tol
    assert [f.name for f in eps_sweep_check([0.1, 0.2, 0.3], [0.25, 0.125, 0.26], floor=0.5, tol=0.125)] == [
        "accuracy-rises-with-eps"]
    assert eps_sweep_check([0.1, 0.2, 0.3], [0.03, 0.02, 0.0295]) == []      # within the default tol 0.01
    assert [f.name for f in eps_sweep_check([0.1, 0.2, 0.3], [0.03, 0.02, 0.0305])] == ["accuracy-rises-with-eps"]
    # the rise is measured from the running minimum, not from the previous point
    flags = eps_sweep_check([0.1, 0.2, 0.3, 0.4], [0.3, 0.0, 0.005, 0.02], tol=0.01)
    assert [f.name for f in flags] == ["accuracy-rises-with-eps"]
    assert flags[0].message == ("robust accuracy rises with the budget: 0.0% at eps=0.2 but 2.0% at eps=0.4 "
                                "(tolerance 1.0%)")
    assert eps_sweep_check([0.0], [0.0]) == [] and eps_sweep_check((1,), (0,)) == []
    assert [f.name for f in eps_sweep_check([0.3], [1.0], floor=0.0)] == ["no-convergence-at-large-eps"]
    assert eps_sweep_check([0.3], [1.0], floor=1.0) == []


def test_eps_sweep_check_errors():
    cases = [
        (([0.1, "a"], [0.1, 0.2], {}), "^eps and robust_acc must be sequences of numbers$"),
        ((None, [0.1], {}), "^eps and robust_acc must be sequences of numbers$"),
        (([0.1], [None], {}), "^eps and robust_acc must be sequences of numbers$"),
        (([0.1, 0.2], [0.1], {}), "^eps and robust_acc must have the same length, got 2 and 1$"),
        (([], [], {}), r"^eps_sweep_check needs at least one \(eps, robust_acc\) point$"),
        (([-0.1], [0.1], {}), "^eps values must be finite and >= 0, got -0.1$"),
        (([float("inf")], [0.1], {}), "^eps values must be finite and >= 0, got inf$"),
        (([float("nan")], [0.1], {}), "^eps values must be finite and >= 0, got nan$"),
        (([0.1, 0.1], [0.1, 0.2], {}), r"^eps values must be distinct, got \[0.1, 0.1\]$"),
        (([0.1, 0.2], [0.1, float("nan")], {}), r"^robust_acc\[1\] is NaN \(an empty run\?\)$"),
        (([0.1, 0.2], [0.1, 2.0], {}), r"^robust_acc\[1\] must be a robust accuracy in \[0, 1\]"),
        (([0.1], [0.1], {"floor": float("nan")}), r"^floor must be a number in \[0, 1\], got nan$"),
        (([0.1], [0.1], {"floor": 5}), r"^floor must be a robust accuracy in \[0, 1\]"),
        (([0.1], [0.1], {"tol": -1}), "^tol must be a finite number >= 0, got -1"),
    ]
    for (e, a, kw), msg in cases:
        with pytest.raises(AdvlabError, match=msg):
            eps_sweep_check(e, a, **kw)


def test_flag_is_plain_data():
    f = Flag("n", "m", "x")
    assert f.to_dict() == {"name": "n", "message": "m", "meaning": "x"} and math.isfinite(len(f.to_dict()))


# ---------------------------------------------------------------------------- defaults, devices, names

class Sizes(nn.Module):
    """Linear logits of the first three pixels (a gradient everywhere, logits in the first batch,
    deterministic) or, with ``probs``, their softmax; records the size of every batch it sees."""

    def __init__(self, probs=False):
        super().__init__()
        self.sizes, self.probs = [], probs

    def forward(self, v):
        self.sizes.append(v.shape[0])
        z = v.flatten(1)[:, :3] * 2
        return z.softmax(1) if self.probs else z


def many(n=300):
    return torch.rand(n, 1, 2, 2, generator=torch.Generator().manual_seed(0))


def test_the_default_batch_size_is_256_and_the_default_repeats_3():
    x, y = many(300), torch.zeros(300, dtype=torch.long)
    m = Sizes()
    assert zero_gradient_fraction(m, x, y) == 0.0 and m.sizes == [256, 44]
    m = Sizes(probs=True)
    assert output_kind(m, x) == "probabilities" and m.sizes == [256, 44]
    m = Sizes()
    assert not is_randomized(m, x) and m.sizes == [256, 256, 256, 44, 44, 44]
    m = Sizes()
    assert model_checks(m, x, y) == []
    # zero gradients: 2 batches; output kind: logits in the first batch; randomized: 3 passes per batch
    assert m.sizes == [256, 44] + [256] + [256, 256, 256, 44, 44, 44]


def test_default_repeats_find_a_third_pass_that_differs_but_not_a_fourth():
    base = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]])
    x = batch(2)
    assert is_randomized(Scripted(base, base, large_of(base)), x)
    assert not is_randomized(Scripted(base, base, base, large_of(base)), x)
    # model_checks calls the model twice before is_randomized (zero gradients, output kind), which then
    # makes calls 2, 3 and 4 (Scripted has no gradient: the threshold of 1 keeps that flag quiet)
    flags = model_checks(Scripted(*[base] * 5, large_of(base)), x, Y4[:2], zero_grad_threshold=1)
    assert flags == []
    flags = model_checks(Scripted(*[base] * 4, large_of(base)), x, Y4[:2], zero_grad_threshold=1)
    assert [f.name for f in flags] == ["randomized"]
    assert flags[0].message == "3 forward passes in eval mode on the same 2 inputs gave different outputs"


class OnMeta(nn.Module):
    """A model whose parameter lives on the ``meta`` device: it records the device of its input and
    returns scores on the CPU (probabilities with ``probs``), so a check that forgets to move the
    batch to the model's device shows up without a GPU."""

    def __init__(self, probs=False):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, device="meta"))
        self.seen, self.probs = [], probs

    def forward(self, v):
        self.seen.append(v.device.type)
        out = torch.zeros(v.shape[0], 3)
        return out.softmax(1) if self.probs else out


def test_every_model_check_moves_each_batch_to_the_model_device():
    x, y = batch(3), Y4[:3]
    m = OnMeta()
    assert zero_gradient_fraction(m, x, y, batch_size=2) == 1.0 and m.seen == ["meta", "meta"]
    m = OnMeta(probs=True)
    assert output_kind(m, x, batch_size=2) == "probabilities" and m.seen == ["meta", "meta"]
    m = OnMeta()
    assert not is_randomized(m, x, batch_size=2) and m.seen == ["meta"] * 6
    m = OnMeta()
    assert [f.name for f in model_checks(m, x, y)] == ["zero-gradients"] and set(m.seen) == {"meta"}


def test_zero_gradient_fraction_moves_the_labels_to_the_model_device_too():
    seen = []

    class Free(OnMeta):   # scores that need a gradient (through a tensor that is not a parameter), not through x
        def __init__(self):
            super().__init__()
            self.c = torch.ones(1, 3, requires_grad=True)

        def forward(self, v):
            super().forward(v)
            return self.c.expand(v.shape[0], 3) * 1.0

    def loss(z, yy, t):
        seen.append(yy.device.type)
        return z.sum(1)

    m = Free()
    assert zero_gradient_fraction(m, batch(3), Y4[:3], loss=loss, batch_size=2) == 1.0   # grad w.r.t. x is None
    assert m.seen == ["meta", "meta"] and seen == ["meta", "meta"]


def test_output_kind_bounds_are_inclusive():
    x = batch(1)
    # with atol = 0.25 (exact in binary): an entry of -atol and a sum of 1 + atol are still probabilities
    assert output_kind(Scripted(torch.tensor([[-0.25, 0.5, 0.75]])), x, atol=0.25) == "probabilities"
    assert output_kind(Scripted(torch.tensor([[0.25, 0.5, 0.5]])), x, atol=0.25) == "probabilities"
    assert output_kind(Scripted(torch.tensor([[0.25, 0.5, 0.5001]])), x, atol=0.25) == "logits"
    # an entry of +atol with a logsumexp of atol is still a log-probability
    assert output_kind(Scripted(torch.tensor([[0.25, -100.0]])), x, atol=0.25) == "log-probabilities"
    assert output_kind(Scripted(torch.tensor([[0.25, -1.0]])), x, atol=0.25) == "logits"     # logsumexp 0.53


@pytest.mark.parametrize("call", ["zero", "kind", "random", "all"])
def test_a_bad_batch_size_is_named_in_every_model_check(call):
    fns = {"zero": lambda **kw: zero_gradient_fraction(Fn(gated), batch(4), Y4, **kw),
           "kind": lambda **kw: output_kind(Fn(gated), batch(4), **kw),
           "random": lambda **kw: is_randomized(Fn(gated), batch(4), **kw),
           "all": lambda **kw: model_checks(Fn(gated), batch(4), Y4, **kw)}
    for bad in (0, 2.5):
        with pytest.raises(AdvlabError, match=f"^batch_size must be an integer >= 1, got {bad}$"):
            fns[call](batch_size=bad)


def test_model_checks_measure_zero_gradients_with_the_given_loss():
    x = batch(4)
    linear = Fn(lambda v: v.flatten(1)[:, :3] * 2)           # ce and margin both have gradients
    flat = lambda z, yy, t: z.sum(1) * 0.0                  # noqa: E731 - a loss with no gradient at all
    assert zero_gradient_fraction(linear, x, Y4, loss=flat) == 1.0
    assert [f.to_dict() for f in model_checks(linear, x, Y4, loss=flat)] == EXPECTED_ZERO_CUSTOM
    assert model_checks(linear, x, Y4) == []


# ---------------------------------------------------------------------------- is_randomized, sharper

def test_is_randomized_class_change_alone_counts():
    base = torch.tensor([[1.0, 0.99999, 0.0], [1.0, 0.0, 0.0]])
    swapped = torch.tensor([[0.99999, 1.0, 0.0], [1.0, 0.0, 0.0]])   # moves by 1.4e-5, but the class changes
    assert is_randomized(Scripted(base, swapped), batch(2), rtol=1.0)
    assert not is_randomized(Scripted(base, base + 1e-5), batch(2), rtol=1.0)


def test_is_randomized_nan_pattern_alone_counts():
    nan = float("nan")
    first = torch.tensor([[nan, 1.0, 0.0]])
    more = torch.tensor([[nan, nan, 0.0]])     # same argmax (the first NaN), one more NaN
    assert torch.equal(first.argmax(1), more.argmax(1))
    assert is_randomized(Scripted(first, more), batch(1), rtol=1.0)


def test_is_randomized_infinity_pattern_alone_counts():
    inf = float("inf")
    first = torch.tensor([[5.0, 1.0, 0.0]])
    for later in ([5.0, inf, 0.0], [5.0, 1.0, -inf]):          # same argmax, one entry turns infinite
        assert is_randomized(Scripted(first, torch.tensor([later])), batch(1), rtol=1e6), later
    flipped = torch.tensor([[inf, 1.0, 0.0]])
    assert is_randomized(Scripted(flipped, torch.tensor([[inf, 1.0, -inf]])), batch(1), rtol=1e6)
    # the same infinities in both passes (their difference is NaN, counted as no change)
    assert not is_randomized(Scripted(flipped, flipped.clone()), batch(1), rtol=0.0)


def test_is_randomized_tolerance_is_strict():
    base = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]])
    moved = base.clone()
    moved[0, 2] = 0.5                                           # exactly 0.1 of the row norm 5
    assert not is_randomized(Scripted(base, moved), batch(2), rtol=0.1)
    assert is_randomized(Scripted(base, moved), batch(2), rtol=0.0999)
    assert not is_randomized(Scripted(base, base), batch(2), rtol=0.0)   # identical passes with rtol 0


def test_is_randomized_scale_ignores_non_finite_entries_of_the_first_pass():
    inf, nan = float("inf"), float("nan")
    # the scale is the norm of the first pass's finite entries: 1 here (2 for the -inf row), not more
    for first, rtol in (([nan, 1.0, 0.0], 1.0), ([inf, 1.0, 0.0], 1.0), ([-inf, 2.0, 0.0], 0.55)):
        a = torch.tensor([first])
        b = a.clone()
        b[0, 2] = 1.2
        assert torch.equal(a.argmax(1), b.argmax(1))
        assert is_randomized(Scripted(a, b), batch(1), rtol=rtol), first
        assert not is_randomized(Scripted(a, b), batch(1), rtol=1.25 / first[1]), first   # 1.25 x the scale


# ---------------------------------------------------------------------------- attack_checks / eps_sweep_check, sharper

def test_attack_checks_names_every_group_in_its_errors():
    for group in ("single_step", "iterative", "black_box", "transfer"):
        with pytest.raises(AdvlabError, match=f"^{group} must be a sequence of attack names, got 3$"):
            attack_checks({"PGD": 0.1}, **{group: 3})
        with pytest.raises(AdvlabError, match=rf"^{group} must hold attack names \(str\), got None$"):
            attack_checks({"PGD": 0.1}, **{group: ("A1", None)})


def test_attack_checks_groups_fold_case_as_the_results_do():
    # "ß" and "ss" are different names under str.lower() (as the keys of robust are folded), though
    # both upper-case to "SS": they are two attacks, not one listed twice
    flags = attack_checks({"ß": 0.1, "ss": 0.5}, single_step=("ß",), iterative=("ss",))
    assert [f.name for f in flags] == ["single-step-beats-iterative"]
    assert flags[0].message.startswith("single-step attacks leave lower robust accuracy than iterative ones: "
                                       "ß 10.0% < ss 50.0%")


def test_attack_checks_report_the_largest_gap_and_the_best_white_box():
    flags = attack_checks({"FGSM": 0.1, "PGD": 0.2, "APGD-CE": 0.5})
    assert flags[0].message == ("single-step attacks leave lower robust accuracy than iterative ones: FGSM 10.0% < "
                                "PGD 20.0%; FGSM 10.0% < APGD-CE 50.0% (largest gap 40.0%, tolerance 0.0%)")
    # the best white-box attack is the one with the lowest accuracy, not the first name
    assert attack_checks({"Square": 0.4, "APGD-CE": 0.5, "CW": 0.3}) == []
    flags = attack_checks({"Square": 0.1, "APGD-CE": 0.5, "CW": 0.3})
    assert flags[0].message == "Square 10.0% beats every white-box attack (best white-box: CW 30.0%; tolerance 0.0%)"


def test_eps_sweep_rise_is_measured_from_the_first_eps_reaching_the_minimum():
    flags = eps_sweep_check([0.1, 0.2, 0.3], [0.1, 0.1, 0.5], floor=1.0)
    assert [f.message for f in flags] == ["robust accuracy rises with the budget: 10.0% at eps=0.1 but 50.0% at "
                                          "eps=0.3 (tolerance 1.0%)"]


# ---------------------------------------------------------------------------- the flags, in full

EXPECTED_ZERO = [
    {"name": 'zero-gradients',
     "message": 'the ce-loss input gradient is exactly zero on 100.0% of 4 clean inputs (4 images; threshold 10.0%)',
     "meaning": ('gradients are masked (shattered by a non-differentiable step or vanishing in a saturated softmax): '
        'gradient attacks take no step from these inputs, so white-box robust accuracy is an upper bound '
        'only; ') + TRUST},
]

EXPECTED_ZERO_CUSTOM = [
    {"name": 'zero-gradients',
     "message": ('the custom-loss input gradient is exactly zero on 100.0% of 4 clean inputs (4 images; threshold '
        '10.0%)'),
     "meaning": ('gradients are masked (shattered by a non-differentiable step or vanishing in a saturated softmax): '
        'gradient attacks take no step from these inputs, so white-box robust accuracy is an upper bound '
        'only; ') + TRUST},
]

EXPECTED_PROB = [
    {"name": 'probability-outputs',
     "message": ('every one of the 4 output rows is non-negative and sums to 1: the model returns probabilities, not '
        'logits'),
     "meaning": ('attacks treat outputs as logits and the cross-entropy of probabilities is nearly flat, so gradients '
        'are masked: the white-box numbers are unreliable; attack the pre-softmax logits (remove the '
        'softmax) or use the margin loss, and trust black-box / transfer numbers over white-box ones')},
]

EXPECTED_LOGPROB = [
    {"name": 'log-probability-outputs',
     "message": ('every one of the 4 output rows is <= 0 with logsumexp 0: the model returns log-probabilities, not '
        'logits'),
     "meaning": ('the cross-entropy of a log-softmax saturates (exactly zero gradient) once the softmax is confident, '
        'masking gradients, the more so behind a temperature: attack the pre-softmax logits or use the '
        'margin loss; until then the white-box numbers are unreliable and black-box / transfer numbers are '
        'the ones to trust')},
]

EXPECTED_RAND = [
    {"name": 'randomized',
     "message": '5 forward passes in eval mode on the same 4 inputs gave different outputs',
     "meaning": ('the model is randomized (stochastic gradients): single-sample gradients are noisy and the robust '
        'accuracy is itself random; attack with Expectation over Transformation (average gradients over many '
        'draws) and report the accuracy over several draws')},
]

EXPECTED_SS = [
    {"name": 'single-step-beats-iterative',
     "message": ('single-step attacks leave lower robust accuracy than iterative ones: FGSM 30.0% < PGD 50.0%; FGSM '
        '30.0% < APGD-CE 35.0%; fgsm-2 10.0% < PGD 50.0%; fgsm-2 10.0% < APGD-CE 35.0% (largest gap 40.0%, '
        'tolerance 1.0%)'),
     "meaning": ('the iterative attack is misled by the local gradient (gradients are masked or the attack is badly '
        'tuned), so its number is not an upper bound on true robustness: use the lowest robust accuracy over '
        'all attacks, rerun the iterative attack with restarts, more steps or the margin loss; ') + TRUST},
]

EXPECTED_BB1 = [
    {"name": 'black-box-beats-white-box',
     "message": 'Square 10.0% beats every white-box attack (best white-box: CW 30.0%; tolerance 0.0%)',
     "meaning": ('an attacker without gradients does better than one with them: gradients are masked and white-box '
        'attacks are unreliable; ') + TRUST},
]

EXPECTED_BB2 = [
    {"name": 'black-box-beats-white-box',
     "message": 'Square 10.0%, T 20.0% beat every white-box attack (best white-box: CW 30.0%; tolerance 5.0%)',
     "meaning": ('an attacker without gradients does better than one with them: gradients are masked and white-box '
        'attacks are unreliable; ') + TRUST},
]

EXPECTED_EPS = [
    {"name": 'accuracy-rises-with-eps',
     "message": ('robust accuracy rises with the budget: 10.0% at eps=0.2 but 20.0% at eps=0.3; 10.0% at eps=0.2 but '
        '40.0% at eps=0.5 (tolerance 2.0%)'),
     "meaning": ('a larger budget contains every smaller-budget adversarial, so the attack is failing where it '
        'succeeded before (masked gradients or a badly tuned attack): the curve is not a robustness '
        'measurement; take the running minimum over eps as the best estimate; ') + TRUST},
    {"name": 'no-convergence-at-large-eps',
     "message": ('robust accuracy is still 40.0% at the largest eps=0.5 (floor 10.0%; curve: 60.0% at 0.1, 10.0% at '
        '0.2, 20.0% at 0.3, 40.0% at 0.5)'),
     "meaning": ('a large enough budget breaks any classifier, so an attack that does not reach about 0% is failing '
        '(masked gradients, too few steps, or the budget is still small): the robust accuracies of this '
        'attack are not trustworthy; ') + TRUST},
]

