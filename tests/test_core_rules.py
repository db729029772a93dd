"""The success rule, the ASR split, accuracy, norms (advlab.metrics.robustness) and AttackResult,
on hand-made tensors where every expected number is written down (sharp enough that mutation
testing, benchmarks/mutation.py, finds no change of these rules that the tests miss)."""

import math
import re

import pytest
import torch

from advlab import REJECT
from advlab._util import AdvlabError
from advlab.attacks.result import AttackResult
from advlab.metrics.robustness import (accuracy, attack_success_rate, is_success, l0_norm, l2_norm, linf_norm, outcome,
                                       perturbation_norms, robust_accuracy)

T = torch.tensor


def nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


# ---------------------------------------------------------------------------- the success rule

def test_is_success_untargeted_targeted_and_reject():
    y = T([0, 1, 2, 3, 4])
    pred = T([0, 2, REJECT, 3, 1])
    assert is_success(pred, y).tolist() == [False, True, False, False, True]
    target = T([0, 2, REJECT, 4, 2])
    # targeted: only the target counts, a wrong non-target class is no success, nor is a REJECT target
    assert is_success(pred, y, target).tolist() == [True, True, False, False, False]
    assert is_success(pred, y).dtype == torch.bool


def test_outcome_splits_every_sample_exactly_once():
    y = T([0, 0, 0, 0])
    pred = T([0, 1, REJECT, 2])
    o = outcome(pred, y)
    assert set(o) == {"success", "failed", "detected"}
    assert o["success"].tolist() == [False, True, False, True]
    assert o["failed"].tolist() == [True, False, False, False]
    assert o["detected"].tolist() == [False, False, True, False]
    t = outcome(pred, y, T([1, 1, 1, 1]))
    assert t["success"].tolist() == [False, True, False, False]
    assert t["failed"].tolist() == [True, False, False, True]
    assert t["detected"].tolist() == [False, False, True, False]


@pytest.mark.parametrize("kw,arg,msg", [
    ("pred", [0, 1], "pred must be a torch.Tensor of class indices, got list"),
    ("y", (0, 1), "y must be a torch.Tensor of class indices, got tuple"),
    ("target", [0, 1], "target must be a torch.Tensor of class indices, got list"),
    ("pred", T([[0, 1]]), "pred must have shape (N,), got shape (1, 2)"),
    ("pred", T(1), "pred must have shape (N,), got shape ()"),
    ("y", T([0, 1, 2]), "y must have shape (2,), got shape (3,)"),
    ("y", T([[0, 1]]), "y must have shape (2,), got shape (1, 2)"),
    ("target", T([0]), "target must have shape (2,), got shape (1,)"),
    ("pred", T([0.0, 1.0]), "pred must be an integer tensor of class indices, got dtype torch.float32"),
    ("y", T([True, False]), "y must be an integer tensor of class indices, got dtype torch.bool"),
    ("target", T([1 + 0j, 0j]), "target must be an integer tensor of class indices, got dtype torch.complex64"),
])
def test_is_success_names_the_bad_argument(kw, arg, msg):
    args = {"pred": T([0, 1]), "y": T([1, 1]), "target": T([1, 0])}
    args[kw] = arg
    with pytest.raises(AdvlabError, match="^" + re.escape(msg) + "$"):
        is_success(**args)


def test_integer_dtypes_of_every_width_are_accepted():
    for dt in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        assert is_success(T([1, 2], dtype=dt), T([1, 1], dtype=dt)).tolist() == [False, True]


# ---------------------------------------------------------------------------- accuracy

def test_accuracy_counts_a_rejection_as_wrong():
    y = T([0, 1, 2, 3])
    assert accuracy(T([0, 1, 0, REJECT]), y) == 0.5
    assert accuracy(T([0, 1, 2, 3]), y) == 1.0
    assert accuracy(T([1, 2, 3, 0]), y) == 0.0
    assert robust_accuracy(T([0, 1, 2, REJECT]), y) == 0.75
    assert accuracy(T([0]), T([0])) == 1.0 and accuracy(T([1]), T([0])) == 0.0 and robust_accuracy(T([2]), T([2])) == 1.0
    assert isinstance(accuracy(T([0]), T([0])), float)
    assert nan(accuracy(T([], dtype=torch.long), T([], dtype=torch.long)))
    assert nan(robust_accuracy(T([], dtype=torch.long), T([], dtype=torch.long)))


def test_accuracy_checks_its_arguments():
    with pytest.raises(AdvlabError, match=r"^pred must have shape \(N,\), got shape \(1, 2\)$"):
        accuracy(T([[0, 1]]), T([0, 1]))
    with pytest.raises(AdvlabError, match=r"^y must have shape \(2,\), got shape \(1,\)$"):
        accuracy(T([0, 1]), T([0]))


# ---------------------------------------------------------------------------- the ASR split

def test_attack_success_rate_split_sums_to_one():
    y = T([0, 0, 0, 0, 0, 0, 0, 0])
    adv = T([1, 1, 1, REJECT, 0, 0, 0, 2])
    r = attack_success_rate(adv, y)
    assert r == {"success": 0.5, "failed": 0.375, "detected": 0.125, "n": 8}
    assert isinstance(r["n"], int)


def test_attack_success_rate_counts_only_the_clean_correct():
    y = T([0, 1, 2, 3, 4])
    adv = T([1, REJECT, 2, 0, 0])
    clean = T([0, 1, 2, 3, 0])  # the last one was wrong when clean: not counted
    r = attack_success_rate(adv, y, clean_pred=clean)
    assert r["n"] == 4
    assert r["success"] == 0.5 and r["detected"] == 0.25 and r["failed"] == 0.25


def test_attack_success_rate_targeted_indexes_the_targets_along():
    y = T([0, 0, 0, 0])
    adv = T([1, 2, 1, 3])
    target = T([1, 1, 3, 3])
    clean = T([5, 0, 0, 0])  # drops the first sample: its target must not be used for the second
    r = attack_success_rate(adv, y, target, clean_pred=clean)
    assert r == {"success": pytest.approx(1 / 3), "failed": pytest.approx(2 / 3), "detected": 0.0, "n": 3}
    assert attack_success_rate(adv, y, target)["success"] == 0.5


def test_attack_success_rate_of_one_sample():
    assert attack_success_rate(T([1]), T([0])) == {"success": 1.0, "failed": 0.0, "detected": 0.0, "n": 1}
    assert attack_success_rate(T([0, REJECT]), T([1, 0]), clean_pred=T([0, 0])) == {
        "success": 0.0, "failed": 0.0, "detected": 1.0, "n": 1}


def test_attack_success_rate_with_nothing_counted_is_nan():
    y = T([0, 1])
    r = attack_success_rate(T([1, 0]), y, clean_pred=T([1, 0]))
    assert r["n"] == 0 and set(r) == {"success", "failed", "detected", "n"}
    assert all(nan(r[k]) for k in ("success", "failed", "detected"))
    e = attack_success_rate(T([], dtype=torch.long), T([], dtype=torch.long))
    assert e["n"] == 0 and nan(e["success"])


def test_attack_success_rate_names_its_arguments():
    with pytest.raises(AdvlabError, match=r"^adv_pred must have shape \(N,\), got shape \(1, 1\)$"):
        attack_success_rate(T([[0]]), T([0]))
    with pytest.raises(AdvlabError, match=r"^clean_pred must have shape \(2,\), got shape \(3,\)$"):
        attack_success_rate(T([0, 1]), T([0, 1]), clean_pred=T([0, 1, 2]))
    with pytest.raises(AdvlabError, match=r"^clean_pred must be an integer tensor"):
        attack_success_rate(T([0, 1]), T([0, 1]), clean_pred=T([0.0, 1.0]))
    with pytest.raises(AdvlabError, match=r"^target must have shape \(2,\), got shape \(1,\)$"):
        attack_success_rate(T([0, 1]), T([0, 1]), T([1]))


# ---------------------------------------------------------------------------- norms

def test_l0_counts_a_pixel_once_over_its_channels_and_respects_tol():
    d = torch.zeros(2, 3, 2, 2)
    d[0, :, 0, 0] = 0.5          # one pixel, three channels: counts once
    d[0, 1, 1, 1] = -0.25        # a negative change counts too
    d[1, 0, 0, 1] = 1e-6         # exactly tol: not a change
    d[1, 2, 1, 0] = 2e-6
    assert l0_norm(d).tolist() == [2, 1]
    assert l0_norm(d, tol=1e-7).tolist() == [2, 2]
    flat = torch.tensor([[0.0, 1e-6, -3e-6, 0.5], [0.0, 0.0, 0.0, 0.0]])
    assert l0_norm(flat).tolist() == [2, 0]
    three = torch.tensor([[[0.1, 0.0], [0.2, 0.0]]])  # (1, 2, 2): every element counts
    assert l0_norm(three).tolist() == [2]


def test_l2_and_linf_per_sample():
    d = torch.tensor([[[[3.0, -4.0]]], [[[0.0, -0.5]]]])
    assert l2_norm(d).tolist() == [5.0, 0.5]
    assert linf_norm(d).tolist() == [4.0, 0.5]
    empty = torch.zeros(3, 0)
    assert linf_norm(empty).tolist() == [0.0, 0.0, 0.0]
    assert linf_norm(empty).dtype == empty.dtype


def test_perturbation_norms_and_its_errors():
    d = torch.zeros(2, 1, 2, 2)
    d[0, 0, 0, 0], d[0, 0, 1, 1] = 0.3, -0.4
    out = perturbation_norms(d)
    assert set(out) == {"l0", "l2", "linf"}
    assert out["l0"].tolist() == [2, 0]
    assert torch.allclose(out["l2"], T([0.5, 0.0]))
    assert torch.allclose(out["linf"], T([0.4, 0.0]))
    e = perturbation_norms(torch.zeros(2, 0))
    assert e["linf"].tolist() == [0.0, 0.0] and e["l0"].tolist() == [0, 0]
    with pytest.raises(AdvlabError, match=r"^delta must be a torch.Tensor of shape \(N, \.\.\.\), got list$"):
        perturbation_norms([[0.0]])
    with pytest.raises(AdvlabError, match=r"^delta must have shape \(N, \.\.\.\) with one perturbation per row, "
                                          r"got shape \(3,\)$"):
        perturbation_norms(torch.zeros(3))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.zeros(2, 2)
        x[1, 1] = bad
        with pytest.raises(AdvlabError, match="^delta contains NaN or infinite values$"):
            perturbation_norms(x)


# ---------------------------------------------------------------------------- AttackResult

def make(labels, clean, adv, success, l2=None, detected=None, **kw):
    n = len(labels)
    l2 = T(l2 if l2 is not None else [0.0] * n, dtype=torch.float32)
    return AttackResult(labels=T(labels), clean_pred=T(clean), adv_pred=T(adv), success=T(success),
                        l0=kw.pop("l0", torch.arange(n)), l2=l2, linf=kw.pop("linf", l2 / 2), seconds=kw.pop("seconds", 1.5),
                        detected=None if detected is None else T(detected), **kw)


def test_attack_result_detected_defaults_to_reject_and_is_never_a_success():
    r = make([0, 0, 0, 0], [0, 0, 0, 0], [1, REJECT, 0, REJECT], [1, 1, 0, 0])
    assert r.detected.tolist() == [False, True, False, True]
    assert r.success.tolist() == [True, False, False, False]
    assert r.success.dtype == torch.bool
    assert r.failed.tolist() == [False, False, True, False]
    # an explicit detected mask wins over adv_pred
    e = make([0, 0], [0, 0], [1, 1], [1, 1], detected=[False, True])
    assert e.detected.tolist() == [False, True] and e.success.tolist() == [True, False]


def test_a_criterion_set_later_still_cannot_count_a_rejection():
    r = make([0, 0, 0], [0, 0, 0], [1, REJECT, 0], [0, 0, 0])
    r.success = T([1, 1, 1])
    assert r.success.tolist() == [True, False, True]
    assert r.success.dtype == torch.bool
    r.seconds = 2.0  # other fields are set as given
    assert r.seconds == 2.0
    r.detected = T([True, False, False])
    r.success = T([True, True, False])
    assert r.success.tolist() == [False, True, False]


def test_attack_result_rates_are_over_the_clean_correct():
    # 6 samples, the last one wrong when clean
    r = make(labels=[0, 1, 2, 3, 4, 5], clean=[0, 1, 2, 3, 4, 0], adv=[1, REJECT, 2, 0, 4, 1],
             success=[1, 0, 0, 1, 0, 1], l2=[1.0, 9.0, 9.0, 3.0, 9.0, 100.0])
    assert len(r) == 6
    assert r.counted.tolist() == [True, True, True, True, True, False]
    assert r.clean_accuracy == pytest.approx(5 / 6)
    assert r.robust_accuracy == pytest.approx(2 / 6)   # samples 2 and 4 (a rejection is not correct)
    assert r.success_rate == pytest.approx(2 / 5)
    assert r.detected_rate == pytest.approx(1 / 5)
    assert r.failed_rate == pytest.approx(2 / 5)
    s = r.summary()
    assert list(s) == ["n", "clean_acc", "robust_acc", "asr", "failed", "detected", "mean_l2", "median_l2",
                       "mean_linf", "mean_l0", "seconds"]
    assert s["n"] == 6 and s["seconds"] == 1.5
    assert s["clean_acc"] == pytest.approx(5 / 6) and s["robust_acc"] == pytest.approx(2 / 6)
    assert s["asr"] == pytest.approx(0.4) and s["failed"] == pytest.approx(0.4) and s["detected"] == pytest.approx(0.2)
    # norms over the true successes among the counted: samples 0 and 3 (sample 5 is not counted)
    assert s["mean_l2"] == pytest.approx(2.0)
    assert s["median_l2"] == pytest.approx(1.0)   # torch's median of an even count is the lower one
    assert s["mean_linf"] == pytest.approx(1.0)
    assert s["mean_l0"] == pytest.approx(1.5)     # l0 = arange: 0 and 3


def test_attack_result_median_of_an_odd_count():
    r = make([0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1], l2=[5.0, 1.0, 2.0])
    assert r.summary()["median_l2"] == 2.0 and r.summary()["mean_l2"] == pytest.approx(8 / 3)


def test_attack_result_with_no_success_or_nothing_counted_gives_nan():
    r = make([0, 1], [0, 1], [0, 1], [0, 0], l2=[1.0, 2.0])
    s = r.summary()
    assert s["asr"] == 0.0 and s["failed"] == 1.0
    assert all(nan(s[k]) for k in ("mean_l2", "median_l2", "mean_linf", "mean_l0"))
    wrong = make([0, 1], [1, 0], [1, 0], [1, 1], l2=[1.0, 2.0])
    assert wrong.clean_accuracy == 0.0
    assert nan(wrong.success_rate) and nan(wrong.detected_rate) and nan(wrong.failed_rate)
    assert nan(wrong.summary()["mean_l2"])
    empty = make([], [], [], [])
    assert len(empty) == 0
    assert nan(empty.clean_accuracy) and nan(empty.robust_accuracy) and nan(empty.success_rate)


def test_attack_result_rates_are_exact_fractions():
    # 3 counted samples, 1 success: 1/3 computed in double, then a Python float
    r = make([0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 0, 0])
    assert r.success_rate == 1 / 3 and r.failed_rate == 2 / 3
    assert type(r.success_rate) is float and type(r.clean_accuracy) is float and type(r.robust_accuracy) is float
