"""The one survivor chain (advlab.eval.runner.survivor_chain) on hand-made judges and links, where
every expected number can be written down."""

import pytest
import torch

from advlab import REJECT
from advlab.eval.runner import AttackRun, adversarial_result, survivor_chain, worst_case

# six images of two pixels: pixel 0 says what the judge answers (0 -> the true label, 0.5 -> a
# wrong class, 0.9 -> REJECT), pixel 1 is the image's index (out of [0, 1]: a test judge only)
Y = torch.tensor([0, 1, 2, 0, 1, 2])


class Table:
    """A judge that knows each image's identity from a second pixel (its index)."""

    def __call__(self, x):
        v, idx = x.flatten(1)[:, 0], x.flatten(1)[:, 1].round().long()
        true = Y[idx]
        wrong = (true + 1) % 3
        return torch.where(v > 0.8, torch.full_like(true, REJECT), torch.where(v > 0.4, wrong, true))


def images():
    x = torch.zeros(6, 1, 1, 2)
    x[:, 0, 0, 1] = torch.arange(6).float()
    return x


def link(values, calls):
    """A function link that sets pixel 0 of image i to values[i] and records which images it saw."""
    def run(xs, ys):
        calls.append(xs[:, 0, 0, 1].round().long().tolist())
        out = xs.clone()
        out[:, 0, 0, 0] = torch.tensor([values[i] for i in calls[-1]])
        return out
    return run


def test_each_link_sees_only_the_survivors_and_rejections_stay_in():
    x, j = images(), Table()
    calls = []
    # link 1 breaks 0 and 1, has 2 rejected; link 2 breaks 2 (the rejected one) and 3; link 3 breaks nothing
    runs = [AttackRun("a", link([0.5, 0.5, 0.9, 0.0, 0.0, 0.0], calls)),
            AttackRun("b", link([0.0, 0.0, 0.5, 0.5, 0.0, 0.0], calls), "adaptive"),
            AttackRun("c", link([0.0] * 6, calls), "adaptive")]
    ch = survivor_chain(runs, x, Y, j)
    assert calls == [[0, 1, 2, 3, 4, 5], [2, 3, 4, 5], [4, 5]]
    assert ch.stages == {"a": pytest.approx(3 / 6), "b": pytest.approx(2 / 6), "c": pytest.approx(2 / 6)}
    assert ch.robust.tolist() == [False, False, False, False, True, True]
    assert ch.detected.tolist() == [False] * 6  # image 2 was rejected by a, then broken by b
    assert ch.robust_accuracy == pytest.approx(2 / 6)
    w = ch.worst
    assert w.success.tolist() == [True, True, True, True, False, False]
    assert (w.adv_pred[:4] != Y[:4]).all() and (w.adv_pred[4:] == Y[4:]).all()
    assert torch.equal(ch.x_adv[:4, 0, 0, 0], torch.full((4,), 0.5))
    assert ch.ran_on["b"].tolist() == [2, 3, 4, 5] and len(ch.results["b"]) == 4


def test_a_rejection_that_nothing_breaks_ends_detected_and_keeps_its_adversarial():
    x, j = images(), Table()
    runs = [AttackRun("a", link([0.0, 0.9, 0.0, 0.0, 0.0, 0.0], [])),
            AttackRun("b", link([0.0] * 6, []))]
    ch = survivor_chain(runs, x, Y, j)
    assert ch.detected.tolist() == [False, True, False, False, False, False]
    assert ch.robust.tolist() == [True, False, True, True, True, True]
    assert float(ch.x_adv[1, 0, 0, 0]) == pytest.approx(0.9) and int(ch.worst.adv_pred[1]) == REJECT
    assert bool(ch.worst.detected[1]) and not bool(ch.worst.success[1])
    assert ch.stages["b"] == pytest.approx(5 / 6)


def test_clean_misclassified_images_are_never_attacked_and_never_robust():
    x, j = images(), Table()
    x[3, 0, 0, 0] = 0.5  # wrong when clean
    calls = []
    ch = survivor_chain([AttackRun("a", link([0.0] * 6, calls))], x, Y, j)
    assert calls == [[0, 1, 2, 4, 5]]
    assert not bool(ch.robust[3]) and ch.stages["a"] == pytest.approx(5 / 6)


def test_start_decides_who_goes_on():
    x, j = images(), Table()
    earlier = [adversarial_result(x, Y, link([0.5, 0, 0, 0, 0, 0], [])(x, Y), j),
               adversarial_result(x, Y, link([0, 0, 0, 0.5, 0, 0], [])(x, Y), j)]
    calls = []
    ch = survivor_chain([AttackRun("more", link([0, 0, 0, 0, 0.5, 0], calls))], x, Y, j, start=worst_case(earlier))
    assert calls == [[1, 2, 4, 5]]
    assert ch.robust.tolist() == [False, True, True, False, False, True]


def test_attack_links_get_their_targets_indexed_and_names_must_be_unique(lenet_digits, digits_data):
    from advlab.attacks import PGD

    test = digits_data[1]
    x, y = test.images[:40], test.labels[:40]
    pred = lambda xb: lenet_digits(xb).argmax(1)  # noqa: E731
    weak = AttackRun("weak", PGD(lenet_digits, eps=0.02, steps=3, seed=0))
    strong = AttackRun("strong", PGD(lenet_digits, eps=0.3, steps=10, seed=0))
    ch = survivor_chain([weak, strong], x, y, pred)
    clean_ok = (pred(x) == y)
    assert ch.stages["weak"] <= float(clean_ok.double().mean()) + 1e-12
    assert ch.stages["strong"] <= ch.stages["weak"]
    assert len(ch.results["strong"]) == int((~(ch.results["weak"].adv_pred != ch.results["weak"].labels)).sum())
    assert ((ch.x_adv - x).abs().amax() <= 0.3 + 1e-6) and ch.x_adv.min() >= 0 and ch.x_adv.max() <= 1
    with pytest.raises(Exception, match="named 'weak'"):
        survivor_chain([weak, weak], x, y, pred)
