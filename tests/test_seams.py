"""The core seams: one success rule that knows REJECT, the attack loop with hooks, the Defense
contract and registry, the one evaluation runner, the global RNG left alone."""

import pytest
import torch


from advlab import REJECT
from advlab._util import AdvlabError
from advlab.attacks import ATTACKS, PGD, build_attack
from advlab.attacks.loop import ActiveSet, AdamStep, AttackLoop, L2Projection, LinfProjection, SignStep
from advlab.metrics import attack_success_rate, is_success, outcome


def test_the_success_rule_never_counts_a_rejection():
    y = torch.tensor([0, 0, 0, 1])
    pred = torch.tensor([1, REJECT, 0, 2])
    assert is_success(pred, y).tolist() == [True, False, False, True]
    assert is_success(pred, y, target=torch.tensor([1, REJECT, 1, 1])).tolist() == [True, False, False, False]
    o = outcome(pred, y)
    assert o["detected"].tolist() == [False, True, False, False]
    assert (o["success"].int() + o["failed"].int() + o["detected"].int()).tolist() == [1, 1, 1, 1]


def test_a_judge_that_rejects_every_adversarial(lenet_digits, digits_data):
    """success 0 and detected 1 in AttackResult, summary(), the report row, the worst case and the
    metrics alike."""
    from advlab.eval.runner import AttackRun, result_row, run_attacks

    test = digits_data[1]
    x, y = test.images[:40], test.labels[:40]
    clean = x.flatten(1)

    def judge(xb):  # the model's answer on the clean images, REJECT on anything else
        known = (xb.flatten(1)[:, None, :] == clean[None]).all(-1).any(1)
        return torch.where(known, lenet_digits(xb).argmax(1), torch.full_like(known, REJECT, dtype=torch.long))

    ev = run_attacks([AttackRun("PGD", PGD(lenet_digits, eps=0.3, steps=10, seed=0)),
                      AttackRun("FGSM", build_attack("fgsm", lenet_digits, eps=0.3))], x, y, judge=judge)
    res = ev.results["PGD"]
    assert not res.success.any() and res.detected.all() and not res.failed.any()
    assert res.success_rate == 0.0 and res.detected_rate == 1.0
    s = res.summary()
    assert s["asr"] == 0.0 and s["detected"] == 1.0 and s["failed"] == 0.0 and s["robust_acc"] == 0.0
    assert s["mean_l2"] != s["mean_l2"]  # NaN: norms are over true successes only, and there are none
    row = result_row("PGD", res, x)
    assert row["asr"] == 0.0 and row["detected"] == 1.0 and row["ssim"] != row["ssim"]
    assert ev.worst_row()["asr"] == 0.0 and ev.worst_row()["detected"] == 1.0
    m = attack_success_rate(res.adv_pred, res.labels, clean_pred=res.clean_pred)
    assert m["success"] == 0.0 and m["detected"] == 1.0
    # an attack's own criterion (K-A3) cannot turn a rejection into a success either
    res.success = torch.ones_like(res.success)
    assert not res.success.any()


def test_worst_case_is_never_above_any_single_attack(lenet_digits, digits_data):
    from advlab.eval.runner import AttackRun, run_attacks

    test = digits_data[1]
    x, y = test.images[:80], test.labels[:80]
    ev = run_attacks([AttackRun(n, build_attack(k, lenet_digits, eps=0.15, **kw)) for n, k, kw in
                      (("FGSM", "fgsm", {}), ("PGD", "pgd", {"steps": 10, "seed": 0}),
                       ("PGD-1", "pgd", {"steps": 10, "seed": 1}))], x, y)
    w = ev.worst
    for r in ev.results.values():
        assert w.robust_accuracy <= r.robust_accuracy and bool((w.success | ~r.success).all())
    # the kept adversarial of each broken sample is one that breaks it
    assert bool((lenet_digits(w.adversarials[w.success]).argmax(1) != y[w.success]).all())


def test_active_set_keeps_per_sample_state_aligned():
    s = ActiveSet(4, "cpu", outputs=("v",), v=torch.arange(4.0)[:, None], lam=torch.tensor([1.0, 2, 3, 4]),
                  target=None, ref=[torch.arange(4)], slicers={"ref": lambda r, k: [r[0][k]]})
    s.v = s.v + 10
    assert s.keep(torch.tensor([True, False, True, False]))
    assert s.idx.tolist() == [0, 2] and s.lam.tolist() == [1.0, 3.0] and s.ref[0].tolist() == [0, 2]
    assert s.outputs["v"].flatten().tolist() == [10.0, 11.0, 12.0, 13.0]  # written back before the shrink
    s.v = s.v * 0
    s.write_back()
    assert s.outputs["v"].flatten().tolist() == [0.0, 11.0, 0.0, 13.0] and s.target is None
    assert not s.keep(torch.tensor([False, False]))


def test_loop_steps_match_hand_computed_values():
    """f(v) = sum(w * v) on two samples: the gradient is w everywhere."""
    w = torch.tensor([[1.0, -2.0, 0.0]])
    x = torch.full((2, 3), 0.5)

    def loop(step, project=None):
        s = ActiveSet(2, "cpu", v=x.clone(), x=x)
        AttackLoop(forward=lambda s, v: v, objective=lambda out, s, v: (out * w).sum(1), step=step,
                   project=project).run(s, steps=2)
        return s.v

    # signed descent, alpha 0.1, two steps: 0.5 - 0.2 * sign(w); sign(0) = 0
    def close(v, row):
        return torch.allclose(v, torch.tensor([row] * 2), atol=1e-6)

    assert close(loop(SignStep(0.1)), [0.3, 0.7, 0.5])
    assert close(loop(SignStep(0.1), LinfProjection(0.15)), [0.35, 0.65, 0.5])
    # Adam's first steps move by lr per coordinate in the direction of -sign(g)
    assert close(loop(AdamStep(0.05)), [0.4, 0.6, 0.5])
    out = loop(SignStep(0.5), L2Projection(0.1))
    assert (out - x).norm(dim=1).max() <= 0.1 + 1e-6


def test_loop_early_stop_returns_the_judged_iterate(lenet_digits, digits_data):
    test = digits_data[1]
    x, y = test.images[:64], test.labels[:64]
    early = PGD(lenet_digits, eps=0.3, steps=20, early_stop=True, seed=0)(x, y)
    pred = lenet_digits(early).argmax(1)
    assert float((pred != y).float().mean()) >= 0.95


def test_every_registered_attack_builds_and_unknown_names_fail(lenet_digits):
    for name, (cls_name, fixed) in ATTACKS.items():
        atk = build_attack(name, lenet_digits)
        # the registered class on the given model, with the name's fixed settings (pgd-l2 is PGD in L2)
        assert type(atk).__name__ == cls_name and atk.model is lenet_digits, name
        assert {k: getattr(atk, k) for k in fixed} == fixed, name
    # the caller's parameters reach the attack, beside the fixed ones
    atk = build_attack("square-l2", lenet_digits, eps=0.7, queries=12)
    assert (atk.eps, atk.queries, atk.norm) == (0.7, 12, "2")
    with pytest.raises(AdvlabError, match="unknown attack 'nope'"):
        build_attack("nope", lenet_digits)
    with pytest.raises(AdvlabError, match="does not take 'steps'"):
        build_attack("fgsm", lenet_digits, steps=3)


def test_defense_contract_and_registry(lenet_digits, digits_data, tmp_path):
    from advlab.defenses import DEFENSES, Defense, MSVDDDefense, build_defense, defense_class

    assert defense_class("msvdd") is MSVDDDefense and "M-SVDD-D" in DEFENSES["msvdd"].description
    with pytest.raises(AdvlabError, match="unknown defense"):
        defense_class("nope")
    train, test = digits_data
    d = build_defense("msvdd", lenet_digits, train, projections=8, svdd_epochs=1, finetune_epochs=0, progress=False)
    assert isinstance(d, Defense) and not d.randomized and d.surrogate is not None and not d.has_detector
    assert d.load(d.save(tmp_path / "d.pt")).predict(test.images[:5]).tolist() == d.predict(test.images[:5]).tolist()

    class Plain(Defense):  # the smallest defense: forward only; predict defaults to the argmax
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)

    p = Plain(lenet_digits)
    assert torch.equal(p.predict(test.images[:9]), lenet_digits(test.images[:9]).argmax(1))
    with pytest.raises(AdvlabError, match="no detector"):
        p.detect(test.images[:2])


def test_library_code_leaves_the_global_rng_alone(digits_data):
    from advlab.defenses import MSVDDDefense
    from advlab.models import build_model
    from advlab.train import fit

    train = digits_data[0].subset(300)
    state = torch.get_rng_state()
    m = build_model("model-e", 10, (1, 8, 8), seed=0)
    fit(m, train, epochs=1, seed=3, progress=False)
    MSVDDDefense.fit(m, train, projections=4, svdd_epochs=1, finetune_epochs=1, seed=0, progress=False)
    PGD(m, eps=0.1, steps=2, seed=0)(train.images[:4], train.labels[:4])
    assert torch.equal(state, torch.get_rng_state())


def test_data_root_honours_the_argument_and_the_environment(tmp_path, monkeypatch):
    from advlab.data import shared_data_root

    monkeypatch.setenv("ADVLAB_SHARED_DATA", str(tmp_path))
    assert shared_data_root() == tmp_path
    assert shared_data_root(tmp_path / ".") == tmp_path / "."
    with pytest.raises(AdvlabError, match="--data-root"):
        shared_data_root(tmp_path / "absent")




def test_a_wrapper_in_train_mode_leaves_its_backbone_in_eval_mode():
    """The attacks, the checks, evaluate and predict put the model in eval mode and then give every
    submodule back its own flag: a backbone in eval mode inside a wrapper in train mode (a frozen
    feature extractor, a shared trained model wrapped by a test) stays in eval mode."""
    from torch import nn

    from advlab.eval import evaluate
    from advlab.eval.checks import zero_gradient_fraction
    from advlab.train import predict
    from helpers import images, labels, tiny_model

    backbone = tiny_model()                         # eval mode; BatchNorm and Dropout make the mode matter
    wrapper = nn.Sequential(nn.Identity(), backbone)  # a new module: train mode
    x, y = images(4), labels(4)
    runs = {"PGD": lambda: PGD(wrapper, eps=0.1, steps=2, seed=0)(x, y), "predict": lambda: predict(wrapper, x),
            "checks": lambda: zero_gradient_fraction(wrapper, x, y),
            "evaluate": lambda: evaluate(wrapper, x, y, eps=0.1, steps=2, attacks=("APGD-CE",), checks=False)}
    for name, run in runs.items():
        run()
        assert wrapper.training and wrapper[0].training, name
        assert not any(m.training for m in backbone.modules()), name
