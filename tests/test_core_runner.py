"""The evaluation runner's core (advlab.eval.runner): worst case, one row, rejudging, results of
adversarials made elsewhere, the survivor chain and run_attacks, on hand-made judges and links
where every expected number can be written down (sharp enough for mutation testing,
benchmarks/mutation.py)."""

import math
from types import SimpleNamespace

import pytest
import torch

from advlab import REJECT
from advlab._util import AdvlabError
from advlab.attacks.base import Attack
from advlab.attacks.result import AttackResult
from advlab.attacks import FGSM, PGD
from advlab.eval.runner import (THREATS, AttackRun, Evaluation, adversarial_result, not_fooled, outcome_checks,
                                pick_images, random_targets, rejudge, result_row, run_attacks, similarity_scores,
                                survivor_chain, worst_case)

T = torch.tensor
Y = T([0, 1, 2, 0, 1, 2])


def nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def judge(x):
    """Pixel 0 says the answer (0 -> the true label, 0.5 -> a wrong class, 0.9 -> REJECT); pixel 1
    is the image's index into Y."""
    v, idx = x.flatten(1)[:, 0], x.flatten(1)[:, 1].round().long()
    true = Y[idx]
    return torch.where(v > 0.8, torch.full_like(true, REJECT), torch.where(v > 0.4, (true + 1) % 3, true))


def images():
    x = torch.zeros(6, 1, 1, 2)
    x[:, 0, 0, 1] = torch.arange(6).float()
    return x


def setting(values):
    def run(xs, ys):
        out = xs.clone()
        out[:, 0, 0, 0] = T([float(values[int(i)]) for i in xs[:, 0, 0, 1].round().long()])
        return out
    return run


def result(adv, success, labels=(0, 0, 0), clean=None, detected=None, l2=None, adversarials=None, seconds=1.0):
    n = len(labels)
    l2 = T(l2 if l2 is not None else [0.0] * n)
    return AttackResult(labels=T(list(labels)), clean_pred=T(list(clean if clean is not None else labels)),
                        adv_pred=T(adv), success=T(success), l0=torch.arange(n), l2=l2, linf=l2 * 10,
                        seconds=seconds, detected=None if detected is None else T(detected), adversarials=adversarials)


# ---------------------------------------------------------------------------- worst_case

def test_worst_case_prefers_success_then_wrong_then_rejection_then_the_first():
    labels = (0, 0, 0, 0, 0)
    # sample: 0 success in b; 1 wrong (missed target) in a, rejected in b; 2 rejected in b only;
    # 3 nothing anywhere (first attack kept); 4 success in both (the first success kept)
    a = result([0, 2, 0, 0, 1], [0, 0, 0, 0, 1], labels, l2=[1.0, 2.0, 3.0, 4.0, 5.0],
               adversarials=torch.full((5, 1), 0.1), seconds=1.5)
    a.success = T([False, False, False, False, True])
    b = result([1, REJECT, REJECT, 0, 1], [1, 0, 0, 0, 1], labels, l2=[10.0, 20.0, 30.0, 40.0, 50.0],
               adversarials=torch.full((5, 1), 0.2), seconds=2.0)
    w = worst_case([a, b])
    assert w.extras["attack_index"].tolist() == [1, 0, 1, 0, 0]
    assert w.success.tolist() == [True, False, False, False, True]
    assert w.adv_pred.tolist() == [1, 2, REJECT, 0, 1]
    assert w.detected.tolist() == [False, False, True, False, False]
    assert w.l2.tolist() == [10.0, 2.0, 30.0, 4.0, 5.0]
    assert w.linf.tolist() == [100.0, 20.0, 300.0, 40.0, 50.0]
    assert w.l0.tolist() == [0, 1, 2, 3, 4]
    assert w.adversarials[:, 0].tolist() == pytest.approx([0.2, 0.1, 0.2, 0.1, 0.1])
    assert w.seconds == 3.5
    assert w.labels is a.labels and w.clean_pred is a.clean_pred


def test_worst_case_detection_only_where_no_attack_succeeded():
    a = result([1, 0], [1, 0], (0, 0))
    b = result([REJECT, REJECT], [0, 0], (0, 0))
    w = worst_case([b, a])
    assert w.success.tolist() == [True, False]
    assert w.detected.tolist() == [False, True]
    assert w.failed.tolist() == [False, False]
    assert w.adversarials is None  # one result has none: none is kept


def test_worst_case_keeps_an_explicit_detection():
    # a detector flagged sample 0 although the model's class is wrong (not REJECT): still a detection
    a = result([1, 0], [0, 0], (0, 0), detected=[True, False])
    b = result([0, 0], [0, 0], (0, 0))
    w = worst_case([b, a])
    assert w.extras["attack_index"].tolist() == [1, 0]
    assert w.adv_pred.tolist() == [1, 0]
    assert w.detected.tolist() == [True, False] and w.success.tolist() == [False, False]
    assert w.failed.tolist() == [False, True]


def test_worst_case_of_one_and_of_none():
    a = result([1, 0], [1, 0], (0, 0), adversarials=torch.zeros(2, 3))
    w = worst_case(iter([a]))
    assert w.success.tolist() == [True, False] and w.extras["attack_index"].tolist() == [0, 0]
    assert torch.equal(w.adversarials, a.adversarials)
    with pytest.raises(AdvlabError, match="^worst_case needs at least one result$"):
        worst_case([])


# ---------------------------------------------------------------------------- result_row, similarity

def test_result_row_is_the_summary_plus_name_threat_and_similarity():
    x = torch.full((3, 1, 8, 8), 0.5)
    adv = x.clone()
    adv[0] += 0.1
    adv[1] += 0.2   # sample 1 is a success but was wrong when clean: not in the similarity
    r = result([1, 1, 0], [1, 1, 0], labels=(0, 0, 0), clean=(0, 1, 0), adversarials=adv)
    row = result_row("PGD", r, x, threat="transfer")
    assert list(row)[:2] == ["attack", "threat model"]
    assert row["attack"] == "PGD" and row["threat model"] == "transfer"
    for k, v in r.summary().items():
        assert row[k] == v or (nan(v) and nan(row[k]))
    assert row["mse"] == pytest.approx(0.01)
    from advlab.metrics.similarity import ssim
    assert row["ssim"] == pytest.approx(float(ssim(x[:1], adv[:1])))  # sample 0 only
    assert 0.9 < row["ssim"] < 1
    assert nan(row["ms_ssim"])                  # 8 px: too small for MS-SSIM
    plain = result_row("PGD", r)
    assert plain["threat model"] == "white-box" and "ssim" not in plain and "mse" not in plain
    no_adv = result_row("PGD", result([1, 1, 0], [1, 1, 0]), x)
    assert "mse" not in no_adv


def test_similarity_scores_average_the_masked_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 12, 12, generator=g)
    adv = (x + 0.1 * torch.randn(3, 1, 12, 12, generator=g)).clamp(0, 1)
    adv[2] = x[2]
    from advlab.metrics.similarity import ms_ssim, mse, ssim

    s = similarity_scores(x, adv, T([True, False, True]))
    keep = T([0, 2])
    assert set(s) == {"ssim", "ms_ssim", "mse"}
    assert s["ssim"] == pytest.approx(float(ssim(x[keep], adv[keep]).double().mean()))
    assert s["mse"] == pytest.approx(float(mse(x[keep], adv[keep]).double().mean()))
    assert s["ms_ssim"] == pytest.approx(float(ms_ssim(x[keep], adv[keep]).double().mean()))
    assert 0 < s["ssim"] < 1 and s["mse"] > 0
    none = similarity_scores(x, adv, T([False, False, False]))
    assert set(none) == {"ssim", "ms_ssim", "mse"} and all(nan(v) for v in none.values())


@pytest.mark.parametrize("h,w,has", [(11, 11, True), (10, 11, False), (11, 10, False), (12, 40, True)])
def test_ms_ssim_needs_eleven_pixels_a_side(h, w, has):
    x = torch.rand(2, 1, h, w, generator=torch.Generator().manual_seed(1))
    s = similarity_scores(x, (x * 0.9), T([True, True]))
    assert nan(s["ms_ssim"]) != has


# ---------------------------------------------------------------------------- rejudge, adversarial_result

def test_rejudge_recomputes_predictions_and_success():
    x = images()
    adv = setting([0.5, 0.9, 0.0, 0.5, 0.0, 0.0])(x, Y)
    res = adversarial_result(x, Y, adv, judge, seconds=4.0, targets=T([1, 2, 0, 2, 2, 0]))
    res.extras["k"] = T([1])
    other = lambda xb: torch.where(judge(xb) == REJECT, Y[xb.flatten(1)[:, 1].round().long()], judge(xb))  # noqa: E731
    r = rejudge(res, x, other)
    assert r.adv_pred.tolist() == [1, 1, 2, 1, 1, 2]
    assert r.clean_pred.tolist() == Y.tolist()
    assert r.success.tolist() == [True, False, False, False, False, False]  # targeted: only sample 0 hit its target
    assert torch.equal(r.targets, res.targets)
    u = rejudge(res, x, other, untargeted=True)
    assert u.targets is None
    assert u.success.tolist() == [True, False, False, True, False, False]
    assert u.detected.tolist() == [False] * 6
    assert torch.equal(u.l2, res.l2) and torch.equal(u.l0, res.l0) and torch.equal(u.linf, res.linf)
    assert u.seconds == 4.0 and u.adversarials is res.adversarials and u.labels is res.labels
    assert u.extras == res.extras and u.extras is not res.extras
    bare = AttackResult(**{**{f: getattr(res, f) for f in ("labels", "clean_pred", "adv_pred", "success", "l0", "l2",
                                                            "linf", "seconds")}})
    with pytest.raises(AdvlabError, match="^rejudge needs the adversarials: run the attack with keep_adversarials=True$"):
        rejudge(bare, x, judge)


def test_rejudge_judges_clean_and_adversarial_separately():
    x = images()
    x[2, 0, 0, 0] = 0.5   # wrong when clean
    adv = setting([0.5, 0.0, 0.5, 0.9, 0.0, 0.0])(x, Y)
    res = adversarial_result(x, Y, adv, lambda xb: Y.clone())
    assert res.success.tolist() == [False] * 6
    r = rejudge(res, x, judge)
    assert r.clean_pred.tolist() == [0, 1, 0, 0, 1, 2]
    assert r.adv_pred.tolist() == [1, 1, 0, REJECT, 1, 2]
    assert r.success.tolist() == [True, False, True, False, False, False]
    assert r.detected.tolist() == [False, False, False, True, False, False]


def test_adversarial_result_norms_labels_and_success():
    x = torch.full((2, 1, 2, 2), 0.5)
    adv = x.clone()
    adv[0, 0, 0, 0], adv[0, 0, 1, 1] = 0.8, 0.1
    y = T([3, 1])
    res = adversarial_result(x, y, adv, lambda xb: T([3, 2]) if bool((xb != 0.5).any()) else T([3, 1]), seconds=2.5)
    assert res.clean_pred.tolist() == [3, 1] and res.adv_pred.tolist() == [3, 2]
    assert res.success.tolist() == [False, True]
    assert res.l0.tolist() == [2, 0] and torch.allclose(res.l2, T([0.5, 0.0])) and torch.allclose(res.linf, T([0.4, 0.0]))
    assert res.seconds == 2.5 and res.targets is None and torch.equal(res.adversarials, adv)
    assert torch.equal(res.labels, y)
    t = adversarial_result(x, y, adv, lambda xb: T([2, 2]), targets=T([2, 0]))
    assert t.success.tolist() == [True, False] and t.targets.tolist() == [2, 0]
    assert adversarial_result(x, y, adv, judge=lambda xb: T([0, 0])).seconds == 0.0


# ---------------------------------------------------------------------------- AttackRun, Evaluation

def test_attack_run_threats():
    assert THREATS == ("white-box", "transfer", "full-knowledge", "adaptive", "black-box")
    for t in THREATS:
        assert AttackRun("a", None, t).threat == t
    assert AttackRun("a", None).threat == "white-box" and AttackRun("a", None).targets is None
    with pytest.raises(AdvlabError, match="^threat must be one of white-box, transfer, full-knowledge, adaptive, "
                                          "black-box, got 'grey-box'$"):
        AttackRun("a", None, "grey-box")


def test_evaluation_state_round_trip_and_worst_row():
    a = result([1, 0], [1, 0], (0, 0), l2=[1.0, 2.0])
    b = result([0, REJECT], [0, 0], (0, 0), l2=[3.0, 4.0])
    ev = Evaluation([{"attack": "a"}], {"a": a, "b": b}, 3.0, worst_case([a, b]), {"note": 1})
    row = ev.worst_row()
    assert row["attack"] == "worst case" and row["threat model"] == "all of the above"
    assert row["asr"] == 0.5 and row["detected"] == 0.5
    assert ev.worst_row("w", "adaptive")["attack"] == "w" and ev.worst_row("w", "adaptive")["threat model"] == "adaptive"
    st = ev.to_state()
    assert set(st) == {"rows", "seconds", "extras", "results"} and st["seconds"] == 3.0 and st["extras"] == {"note": 1}
    assert set(st["results"]) == {"a", "b"} and torch.equal(st["results"]["b"]["l2"], T([3.0, 4.0]))
    back = Evaluation.from_state(st)
    assert back.rows == [{"attack": "a"}] and back.seconds == 3.0 and back.extras == {"note": 1}
    assert back.results["b"].detected.tolist() == [False, True]
    assert back.worst.success.tolist() == [True, False] and back.worst.detected.tolist() == [False, True]
    empty = Evaluation.from_state({"rows": [], "seconds": "2", "results": {}})
    assert empty.worst is None and empty.extras == {} and empty.seconds == 2.0 and empty.rows == []
    assert Evaluation([], {}).extras == {} and Evaluation([], {}).seconds == 0.0 and Evaluation([], {}).worst is None


# ---------------------------------------------------------------------------- a fake Attack

class Fake(Attack):
    """An Attack whose run() applies a setting link and records how it was called."""

    def __init__(self, values, seconds=7.0, always_keep=False, flag=()):
        self.values, self.calls, self.fake_seconds = values, [], seconds
        self.always_keep, self.flag = always_keep, list(flag)

    def run(self, data, batch_size=256, targets=None, keep_adversarials=False, progress=None, predict_fn=None):
        x, y = data
        self.calls.append(dict(idx=x[:, 0, 0, 1].round().long().tolist(), batch_size=batch_size,
                               targets=None if targets is None else targets.tolist(),
                               keep=keep_adversarials, progress=progress, judge=predict_fn))
        res = adversarial_result(x, y, setting(self.values)(x, y), predict_fn or judge, seconds=self.fake_seconds,
                                 targets=targets)
        if self.flag:   # a detector flags these images (their class is whatever the judge said)
            ids = x[:, 0, 0, 1].round().long()
            res.detected = torch.tensor([int(i) in self.flag for i in ids])
            res.success = res.success
        if not (keep_adversarials or self.always_keep):
            res.adversarials = None
        return res

    def __repr__(self):
        return "Fake()"


def test_run_attacks_rows_worst_case_and_log():
    x = images()
    a, b = Fake([0.5, 0.0, 0.9, 0.0, 0.0, 0.0], 1.0), Fake([0.0, 0.5, 0.0, 0.0, 0.0, 0.0], 2.0)
    msgs = []
    tg = T([1, 2, 0, 1, 2, 0])
    ev = run_attacks([AttackRun("a", a), AttackRun("b", b, "transfer", targets=tg)], x, Y, judge=judge, batch_size=3,
                     progress=False, log=msgs.append)
    assert a.calls[0]["idx"] == [0, 1, 2, 3, 4, 5] and a.calls[0]["batch_size"] == 3 and a.calls[0]["keep"] is True
    assert a.calls[0]["progress"] is False and a.calls[0]["judge"] is judge and a.calls[0]["targets"] is None
    assert b.calls[0]["targets"] == tg.tolist()
    assert [r["attack"] for r in ev.rows] == ["a", "b"] and [r["threat model"] for r in ev.rows] == ["white-box", "transfer"]
    assert "ssim" in ev.rows[0]
    assert ev.rows[0]["asr"] == pytest.approx(1 / 6) and ev.rows[0]["detected"] == pytest.approx(1 / 6)
    assert list(ev.results) == ["a", "b"]
    assert ev.worst.success.tolist() == [True, True, False, False, False, False]
    assert ev.worst.detected.tolist() == [False, False, True, False, False, False]
    assert 0 < ev.seconds < 60
    assert msgs == ["  a (white-box): ASR 16.7%, robust accuracy 66.7%, 1.0 s",
                    "  b (transfer): ASR 16.7%, robust accuracy 83.3%, 2.0 s"]


def test_run_attacks_options_and_errors():
    x = images()
    a = Fake([0.5] * 6)
    ev = run_attacks([AttackRun("a", a)], x, Y, keep_adversarials=False)
    assert a.calls[0]["keep"] is False and a.calls[0]["batch_size"] == 256 and a.calls[0]["judge"] is None
    assert a.calls[0]["progress"] is None
    assert "ssim" not in ev.rows[0]
    kept = run_attacks([AttackRun("a", Fake([0.5] * 6, always_keep=True))], x, Y, judge=judge, keep_adversarials=False)
    assert "ssim" not in kept.rows[0] and "mse" not in kept.rows[0]   # not asked for: no similarity columns
    assert run_attacks([], x, Y).worst is None
    with pytest.raises(AdvlabError, match="^two attacks are named 'a'$"):
        run_attacks([AttackRun("a", Fake([0.0] * 6)), AttackRun("a", Fake([0.0] * 6))], x, Y, judge=judge)
    with pytest.raises(AdvlabError, match="^batch_size must be an integer >= 1, got 0$"):
        run_attacks([AttackRun("a", a)], x, Y, judge=judge, batch_size=0)


# ---------------------------------------------------------------------------- survivor_chain

def test_chain_attack_links_get_indexed_targets_and_their_own_seconds():
    x = images()
    a = Fake([0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    b = Fake([0.0, 0.0, 0.5, 0.0, 0.0, 0.0])
    tg = T([1, 2, 0, 1, 2, 0])
    msgs = []
    ch = survivor_chain([AttackRun("a", a), AttackRun("b", b, "adaptive", targets=tg)], x, Y, judge, batch_size=2,
                        progress=True, log=msgs.append)
    assert a.calls[0]["idx"] == [0, 1, 2, 3, 4, 5] and a.calls[0]["targets"] is None
    assert b.calls[0]["idx"] == [1, 2, 3, 4, 5] and b.calls[0]["targets"] == [2, 0, 1, 2, 0]
    assert b.calls[0]["batch_size"] == 2 and b.calls[0]["keep"] is True and b.calls[0]["progress"] is True
    assert b.calls[0]["judge"] is judge
    # the chain times each link itself (the attack said 7 s)
    assert ch.seconds["a"] < 7.0 and ch.results["a"].seconds == ch.seconds["a"]
    assert ch.worst.seconds == pytest.approx(ch.seconds["a"] + ch.seconds["b"])
    assert ch.stages == {"a": pytest.approx(5 / 6), "b": pytest.approx(4 / 6)}
    assert ch.ran_on["a"].tolist() == [0, 1, 2, 3, 4, 5] and ch.ran_on["b"].tolist() == [1, 2, 3, 4, 5]
    assert len(msgs) == 2
    assert msgs[0].startswith("  a (white-box): robust accuracy 83.3% after it, ") and msgs[0].endswith(" s on 6 images")
    assert msgs[1].startswith("  b (adaptive): robust accuracy 66.7% after it, ") and msgs[1].endswith(" s on 5 images")


def test_chain_worst_result_norms_and_fields():
    x = images()
    ch = survivor_chain([AttackRun("a", setting([0.5, 0.0, 0.9, 0.0, 0.0, 0.0]))], x, Y, judge)
    w = ch.worst
    assert w.labels.tolist() == Y.tolist() and w.clean_pred.tolist() == Y.tolist()
    assert w.adv_pred.tolist() == [1, 1, REJECT, 0, 1, 2]
    assert w.success.tolist() == [True, False, False, False, False, False]
    assert w.detected.tolist() == [False, False, True, False, False, False]
    assert w.l0.tolist() == [1, 0, 1, 0, 0, 0]
    assert w.l2.dtype == torch.float32 and w.l2.tolist() == pytest.approx([0.5, 0, 0.9, 0, 0, 0])
    assert w.linf.tolist() == pytest.approx([0.5, 0, 0.9, 0, 0, 0])
    assert w.l0.dtype == torch.float32
    assert torch.equal(w.adversarials, ch.x_adv)
    assert ch.clean_pred.tolist() == Y.tolist()
    assert ch.robust.tolist() == [False, True, False, True, True, True]
    assert ch.robust_accuracy == pytest.approx(4 / 6)


def test_chain_uses_the_given_clean_labels_and_asks_the_judge_only_for_adversarials():
    x = images()
    seen = []

    def counting(xb):
        seen.append(xb.shape[0])
        return judge(xb)

    clean = Y.clone()
    clean[1] = 2  # the caller says image 1 was wrong when clean: never attacked, never robust
    ch = survivor_chain([AttackRun("a", setting([0.0] * 6))], x, Y, counting, clean=clean)
    assert seen == [5, 5]  # a function link's 5 images, clean and adversarial; never all 6
    assert ch.robust.tolist() == [True, False, True, True, True, True]
    assert ch.worst.clean_pred.tolist() == clean.tolist()
    assert ch.worst.success.tolist() == [False] * 6  # broken when clean is not an attack success


def test_chain_start_with_and_without_adversarials():
    x = images()
    start = adversarial_result(x, Y, setting([0.5, 0.9, 0.0, 0.0, 0.0, 0.0])(x, Y), judge)
    seen = []

    def counting(xb):
        seen.append(xb.shape[0])
        return judge(xb)

    ch = survivor_chain([AttackRun("b", setting([0.0] * 6))], x, Y, counting, start=start)
    # the clean labels come from start; the rejected image 1 stays in the chain (a detection)
    assert seen == [5, 5]
    assert ch.ran_on["b"].tolist() == [1, 2, 3, 4, 5]
    assert ch.detected.tolist() == [False, True, False, False, False, False]
    assert ch.worst.success.tolist() == [True, False, False, False, False, False]  # a REJECT is never a success
    assert ch.worst.detected.tolist() == [False, True, False, False, False, False]
    assert ch.x_adv[:, 0, 0, 0].tolist() == pytest.approx([0.5, 0.9, 0, 0, 0, 0])
    assert ch.worst.adv_pred.tolist() == [1, REJECT, 2, 0, 1, 2]
    assert ch.stages["b"] == pytest.approx(4 / 6)
    bare = start.__class__(labels=start.labels, clean_pred=start.clean_pred, adv_pred=start.adv_pred,
                           success=start.success, l0=start.l0, l2=start.l2, linf=start.linf, seconds=0.0)
    ch2 = survivor_chain([AttackRun("b", setting([0.0] * 6))], x, Y, judge, start=bare)
    assert torch.equal(ch2.x_adv, x)  # no adversarials in start: the clean images
    assert ch2.detected.tolist() == [False, True, False, False, False, False]


def test_chain_a_later_rejection_does_not_override_an_earlier_one_and_breaking_clears_it():
    x = images()
    links = [AttackRun("a", setting([0.9, 0.9, 0.0, 0.0, 0.0, 0.0])),
             AttackRun("b", setting([0.95, 0.5, 0.0, 0.0, 0.0, 0.0]))]
    ch = survivor_chain(links, x, Y, judge)
    # image 0: rejected by a and again by b: a's adversarial stays; image 1: rejected by a, broken by b
    assert ch.x_adv[:, 0, 0, 0].tolist() == pytest.approx([0.9, 0.5, 0, 0, 0, 0])
    assert ch.detected.tolist() == [True, False, False, False, False, False]
    assert ch.worst.adv_pred.tolist() == [REJECT, 2, 2, 0, 1, 2]
    assert ch.ran_on["b"].tolist() == [0, 1, 2, 3, 4, 5]
    assert ch.stages == {"a": pytest.approx(4 / 6), "b": pytest.approx(4 / 6)}


def test_chain_when_every_image_is_broken_later_links_do_not_run():
    x = images()
    calls = []

    def rec(xs, ys):
        calls.append(xs.shape[0])
        return xs

    msgs = []
    ch = survivor_chain([AttackRun("a", setting([0.5] * 6)), AttackRun("b", rec)], x, Y, judge, log=msgs.append)
    assert calls == []
    assert ch.stages == {"a": 0.0, "b": 0.0} and "b" not in ch.results and "b" not in ch.seconds
    assert msgs[1] == "  b (white-box): robust accuracy 0.0% after it"


def test_chain_errors_and_empty_input():
    x = images()
    with pytest.raises(AdvlabError, match="^two links of the chain are named 'a'$"):
        survivor_chain([AttackRun("a", setting([0.0] * 6)), AttackRun("a", setting([0.0] * 6))], x, Y, judge)
    with pytest.raises(AdvlabError, match="^batch_size must be an integer >= 1, got 0$"):
        survivor_chain([], x, Y, judge, batch_size=0)
    e = survivor_chain([AttackRun("a", setting([]))], x[:0], Y[:0], judge)
    assert nan(e.stages["a"]) and nan(e.robust_accuracy)
    assert survivor_chain([], x, Y, judge).robust_accuracy == 1.0


# ---------------------------------------------------------------------------- pick_images, random_targets

def test_pick_images_is_a_seeded_permutation():
    ds = SimpleNamespace(images=torch.arange(10.0).view(10, 1, 1, 1), labels=torch.arange(10) % 3)
    x, y = pick_images(None, ds, seed=5)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    assert x.flatten().long().tolist() == perm.tolist() and y.tolist() == (perm % 3).tolist()
    x0, _ = pick_images(None, ds)
    assert x0.flatten().long().tolist() == torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    x1, y1 = pick_images(None, ds, n=1, seed=5)
    assert x1.flatten().long().tolist() == perm[:1].tolist() and y1.shape == (1,)
    x3, _ = pick_images(None, ds, n=3, seed=5)
    assert x3.flatten().long().tolist() == perm[:3].tolist()
    for bad in (0, -1):
        with pytest.raises(AdvlabError, match=f"^n must be >= 1, got {bad}$"):
            pick_images(None, ds, n=bad)


def test_pick_images_only_correct_keeps_the_order():
    ds = SimpleNamespace(images=torch.arange(10.0).view(10, 1, 1, 1), labels=torch.arange(10) % 3)
    # a "model" right on even images only
    fn = lambda xb: torch.where(xb.flatten().long() % 2 == 0, xb.flatten().long() % 3, (xb.flatten().long() + 1) % 3)  # noqa: E731
    x, y = pick_images(None, ds, n=3, only_correct=True, seed=5, predict_fn=fn)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    even = [int(i) for i in perm if int(i) % 2 == 0]
    assert x.flatten().long().tolist() == even[:3] and y.tolist() == [i % 3 for i in even[:3]]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(T([0.0, 5.0, 0.0]))  # always class 1
    xm, ym = pick_images(model, ds, only_correct=True)
    assert ym.tolist() == [1, 1, 1] and sorted(xm.flatten().long().tolist()) == [1, 4, 7]


def test_random_targets_are_seeded_uniform_and_never_the_label():
    y = torch.arange(4000) % 4
    t = random_targets(y, 4, seed=3)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(t, (y + torch.randint(1, 4, y.shape, generator=g)) % 4)
    assert bool((t != y).all()) and int(t.min()) == 0 and int(t.max()) == 3
    offsets = ((t - y) % 4).bincount(minlength=4).tolist()
    assert offsets[0] == 0 and min(offsets[1:]) > 1200
    assert not torch.equal(t, random_targets(y, 4, seed=4))
    assert random_targets(T([0, 1]), 2, seed=0).tolist() == [1, 0]


def test_chain_defaults_and_function_links_get_the_labels():
    x = images()
    a = Fake([0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    got = []

    def labelled(xs, ys):
        got.append(ys.tolist())
        return xs

    survivor_chain([AttackRun("a", a), AttackRun("f", labelled)], x, Y, judge)
    assert a.calls[0]["batch_size"] == 256 and a.calls[0]["progress"] is None
    assert got == [Y[1:].tolist()]


def test_chain_names_must_be_unique_even_for_links_that_did_not_run():
    x = images()
    runs = [AttackRun("a", setting([0.5] * 6)), AttackRun("b", setting([0.0] * 6)), AttackRun("b", setting([0.0] * 6))]
    with pytest.raises(AdvlabError, match="^two links of the chain are named 'b'$"):
        survivor_chain(runs, x, Y, judge)


def test_chain_keeps_an_explicit_detection_of_a_wrong_class():
    x = images()
    # the link makes image 0 wrong (0.5) but a detector flags it: detected, not broken, not a success
    a = Fake([0.5, 0.0, 0.0, 0.0, 0.0, 0.0], flag=[0])
    ch = survivor_chain([AttackRun("a", a)], x, Y, judge)
    assert ch.detected.tolist() == [True, False, False, False, False, False]
    assert ch.worst.detected.tolist() == [True, False, False, False, False, False]
    assert ch.worst.adv_pred.tolist() == [1, 1, 2, 0, 1, 2]
    assert ch.worst.success.tolist() == [False] * 6 and not bool(ch.worst.failed[0])


# ---------------------------------------------------------------------------- attacker success and the outcome checks

def _rejecting_result(adv_pred):
    n = len(adv_pred)
    z = torch.zeros(n)
    return AttackResult(labels=torch.zeros(n, dtype=torch.long), clean_pred=torch.zeros(n, dtype=torch.long),
                        adv_pred=torch.tensor(adv_pred), success=torch.tensor(adv_pred) != 0, l0=z, l2=z, linf=z,
                        seconds=0.0)


def test_not_fooled_counts_a_rejection_for_the_defender():
    white = _rejecting_result([REJECT, REJECT, REJECT, 0])  # every move rejected
    transfer = _rejecting_result([1, 1, 1, 0])  # every move accepted as a wrong class
    assert white.robust_accuracy == transfer.robust_accuracy == 0.25
    assert not_fooled(white) == 1.0 and not_fooled(transfer) == 0.25
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    runs = [AttackRun("PGD", PGD(m, eps=0.1)), AttackRun("PGD (transfer)", PGD(m, eps=0.1), "transfer")]
    flags = outcome_checks(runs, {"PGD": white, "PGD (transfer)": transfer})
    assert [f.name for f in flags] == ["black-box-beats-white-box"]
    # on robust accuracy alone the two look equal: no flag, the blind spot the attacker success removes
    assert outcome_checks(runs, {"PGD": white, "PGD (transfer)": white}) == []
    # single-step beating iterative, on the same measure
    runs = [AttackRun("FGSM", FGSM(m, eps=0.1)), AttackRun("PGD", PGD(m, eps=0.1))]
    assert [f.name for f in outcome_checks(runs, {"FGSM": transfer, "PGD": white})] == ["single-step-beats-iterative"]
    # targeted runs and a lone run are not compared; a run without a result is left out
    assert outcome_checks(runs[:1], {"FGSM": transfer}) == []
    targeted = [AttackRun("FGSM", FGSM(m, eps=0.1)), AttackRun("PGD", PGD(m, eps=0.1), targets=torch.zeros(4))]
    assert outcome_checks(targeted, {"FGSM": transfer, "PGD": white}) == []
    assert outcome_checks(runs, {"FGSM": transfer}) == []
    # a black-box run beating every white-box one (a one-step PGD counts as white-box, not iterative)
    bb = [AttackRun("Square", PGD(m, eps=0.1), "black-box"), AttackRun("PGD", PGD(m, eps=0.1)),
          AttackRun("PGD-1", PGD(m, eps=0.1, steps=1))]
    flags = outcome_checks(bb, {"Square": transfer, "PGD": white, "PGD-1": white})
    assert [f.name for f in flags] == ["black-box-beats-white-box"]
    # the tolerance: a gap of exactly tol is no flag
    assert outcome_checks(bb, {"Square": _rejecting_result([1, 1, 0, 0]), "PGD": _rejecting_result([1, 0, 0, 0]),
                               "PGD-1": white}, tol=0.25) == []
    empty = _rejecting_result([])
    assert math.isnan(not_fooled(empty))


def test_outcome_checks_groups_by_attack_kind():
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    fooled, held = _rejecting_result([1, 1, 1, 0]), _rejecting_result([REJECT, REJECT, REJECT, 0])
    # a targeted run first is skipped, the runs after it still compared
    runs = [AttackRun("T", PGD(m, eps=0.1), targets=torch.zeros(4)), AttackRun("FGSM", FGSM(m, eps=0.1)),
            AttackRun("PGD-2", PGD(m, eps=0.1, steps=2))]
    got = outcome_checks(runs, {"T": held, "FGSM": fooled, "PGD-2": held})
    assert [f.name for f in got] == ["single-step-beats-iterative"]       # 2 steps is iterative
    # a function (a chain, a battery) and a one-step PGD are white-box but not iterative
    battery = AttackRun("battery", lambda x, y: x)
    assert outcome_checks([AttackRun("FGSM", FGSM(m, eps=0.1)), battery], {"FGSM": fooled, "battery": held}) == []
    one = AttackRun("PGD-1", PGD(m, eps=0.1, steps=1))
    assert outcome_checks([AttackRun("FGSM", FGSM(m, eps=0.1)), one], {"FGSM": fooled, "PGD-1": held}) == []
