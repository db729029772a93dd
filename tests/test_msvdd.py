"""M-SVDD-D: the unique-verifier rule, fitting on any nn.Module, W~-LC, beta tuning, save/load,
the full-knowledge attack and the bundled reproduction (quick)."""

import copy
import json

import pytest
import torch
from torch import nn

from advlab import REJECT
from advlab._util import AdvlabError
from advlab.adaptive.msvdd import MSVDDFullKnowledge, verifier_loss
from advlab.data import split_validation
from advlab.defenses.msvdd import MSVDDDefense
from advlab.eval.runner import adversarial_result
from advlab.train import accuracy, predict


def defended_asr(defense, x, y, x_adv):
    """ASR split of adversarials crafted anywhere, judged by the defended model (the runner's rule)."""
    s = adversarial_result(x, y, x_adv, defense.predict).summary()
    return {"success": s["asr"], "failed": s["failed"], "detected": s["detected"]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def split(digits_data):
    return split_validation(digits_data[0], 0.15, seed=0)


@pytest.fixture(scope="module")
def defense(lenet_digits, split):
    torch.manual_seed(0)
    d = MSVDDDefense.fit(lenet_digits, split[0], projections=32, svdd_epochs=4, positive_epochs=4,
                         finetune_epochs=2, seed=0, progress=False)
    d.tune_beta(split[1], goal="classification")
    return d


def test_unique_verifier_rule(lenet_digits):
    d = MSVDDDefense(lenet_digits, projections=4)            # v_a = 0.001, v_p = 0.01
    r = torch.tensor([[0.5, -1.0, -1.0, -1, -1, -1, -1, -1, -1, -1],      # only class 0 accepts -> 0
                      [0.5, 0.3, -1.0, -1, -1, -1, -1, -1, -1, -1],       # two verifiers -> REJECT
                      [-0.1, -1.0, -1.0, -1, -1, -1, -1, -1, -1, -1],     # none -> REJECT
                      [0.0005, -1.0, -1.0, -1, -1, -1, -1, -1, -1, -1],   # below v_a -> REJECT
                      [0.002, 0.0009, -1.0, -1, -1, -1, -1, -1, -1, 0.0]]  # class 0 alone above v_a
                     )
    assert d.decide(r).tolist() == [0, REJECT, REJECT, REJECT, 0]
    rt = d.verify(r)                                          # eq. 13: [min(v_p, max(0, r)), v_a]
    assert rt.shape == (5, 11)
    assert torch.all(rt[:, 10] == 0.001) and float(rt[:, :10].max()) == pytest.approx(0.01)
    assert float(rt[:, :10].min()) == 0.0
    # where the rule gives a class, it is the argmax of r~; two verifiers tie at v_p under argmax
    assert rt[0].argmax() == 0 and rt[3].argmax() == 10 and rt[2].argmax() == 10


def test_fit_builds_defense_and_surrogate(defense, lenet_digits, digits_data):
    test = digits_data[1]
    assert isinstance(defense, nn.Module) and defense.num_classes == 10
    pred = predict(defense, test.images)                     # advlab.train.predict uses .predict
    assert set(pred.unique().tolist()) <= set(range(-1, 10))
    assert accuracy(defense, test) > 0.85
    assert defense(test.images[:5]).shape == (5, 11) and defense.verified(test.images[:5]).shape == (5, 11)
    # forward gives attackers real gradients; the clamped r~ of eq. 13 has none for most images
    x = test.images[:100].clone().requires_grad_(True)
    y = test.labels[:100]
    for fn, want_zero in ((defense, False), (defense.verified, True)):
        g, = torch.autograd.grad(nn.functional.cross_entropy(fn(x), y, reduction="sum"), x)
        zero = float((g.flatten(1).abs().amax(1) == 0).float().mean())
        assert (zero > 0.5) if want_zero else (zero < 0.05)
    # W~-LC: the fine-tuned backbone with the original linear head re-attached
    sur = defense.surrogate
    assert torch.equal(sur.head.weight, lenet_digits.head.weight) and torch.equal(sur.head.bias, lenet_digits.head.bias)
    assert torch.equal(sur.fc1.weight, defense.net.fc1.weight)
    assert not torch.equal(sur.fc1.weight, lenet_digits.fc1.weight)      # the backbone was fine-tuned
    assert accuracy(sur, test) > 0.9
    # the SVDD layer stayed frozen during fine-tuning and the user's model is untouched
    assert all(not p.requires_grad for p in defense.svdd.parameters())
    assert isinstance(lenet_digits.head, nn.Linear)
    assert len(defense.history["positive"]) >= 1 and len(defense.history["joint"]) == 4


class UserNet(nn.Module):
    """Not a zoo model: the head is nested and called inside a custom forward."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.classifier = nn.ModuleDict({"fc": nn.Linear(32, 10)})

    def forward(self, x):
        return self.classifier["fc"](self.body(x))


def test_fit_on_user_module_and_load_needs_model(digits_data, tmp_path):
    from advlab.train import fit

    train, test = digits_data
    torch.manual_seed(0)
    net = UserNet()
    fit(net, train, epochs=5, lr=3e-3, seed=0, progress=False)
    d = MSVDDDefense.fit(net, train, projections=16, svdd_epochs=2, finetune_epochs=1, progress=False)
    assert d.head_name == "classifier.fc"                    # the last nn.Linear
    assert d.predict(test.images[:7]).shape == (7,)
    path = d.save(tmp_path / "user.pt")
    with pytest.raises(AdvlabError, match="pass model="):
        MSVDDDefense.load(path)
    d2 = MSVDDDefense.load(path, model=UserNet())
    assert torch.equal(d2.predict(test.images), d.predict(test.images))
    with pytest.raises(AdvlabError, match="nn.Linear"):
        MSVDDDefense(net, head="body")


def test_tune_beta(defense, split, digits_data, lenet_digits):
    from advlab.attacks import FGSM

    d = copy.deepcopy(defense)
    val = split[1]
    grid = [0.6, 0.8, 0.9, 1.0, 1.1, 1.3]
    accs = []
    for b in grid:                                           # brute force with the public API
        d.set_beta(b)
        accs.append(accuracy(d, val))
    oc = d.tune_beta(val, goal="classification", grid=grid)
    assert oc["accuracy"] == pytest.approx(max(accs), abs=1e-6)
    assert accs[grid.index(oc["beta"])] == pytest.approx(max(accs), abs=1e-6)
    assert torch.allclose(d.beta, torch.full((10,), oc["beta"]))
    od = d.tune_beta(val, goal="defense", grid=grid, max_accuracy_drop=0.05)
    ok = [b for b, a in zip(grid, accs) if a >= max(accs) - 0.05 - 1e-9]
    assert od["beta"] == min(ok) and od["beta"] <= oc["beta"]
    assert accuracy(d, val) == pytest.approx(accs[grid.index(od["beta"])], abs=1e-6)
    # a looser accuracy budget buys a tighter beta that still keeps it (measured: O_d = 0.8 at 0.86
    # validation accuracy, O_c = 0.9 at 0.93)
    od = d.tune_beta(val, goal="defense", grid=grid, max_accuracy_drop=0.1)
    assert od["beta"] < oc["beta"] and accuracy(d, val) >= max(accs) - 0.1 - 1e-9
    # tighter hyperspheres at the tuned O_d: every verifier accepts a subset of what it accepts at O_c
    test = digits_data[1]
    x_adv = FGSM(lenet_digits, eps=0.2)(test.images, test.labels)
    with torch.no_grad():
        tight = d.verify(d.responses(test.images))[:, :10] > d.v_a
        tight_asr = defended_asr(d, test.images, test.labels, x_adv)["success"]
        d.set_beta(oc["beta"])
        loose = d.verify(d.responses(test.images))[:, :10] > d.v_a
        loose_asr = defended_asr(d, test.images, test.labels, x_adv)["success"]
    assert bool((tight <= loose).all()) and int(tight.sum()) < int(loose.sum())
    # which is the defense goal: transferred FGSM succeeds less often (measured ASR 0.33 vs 0.61)
    assert tight_asr <= loose_asr - 0.15, (tight_asr, loose_asr)
    d.set_beta(torch.linspace(0.9, 1.1, 10))                 # per class
    assert d.beta[0] == pytest.approx(0.9) and d.beta[-1] == pytest.approx(1.1)
    with pytest.raises(AdvlabError, match="goal"):
        d.tune_beta(val, goal="speed")
    with pytest.raises(AdvlabError, match="beta"):
        d.set_beta(-1.0)


def test_health_check_fires_on_the_user_style_setup_only(digits_data):
    """tune_beta(goal="defense") reports how many DeepFool adversarials transferred from W~-LC the
    defense rejects, and warns below HEALTHY_DETECTION. MNIST-FC1 on the digits (seed 1), measured:
    trained as a user would (5 epochs of Adam at 1e-3, fit(projections=512) with its defaults)
    0.41 detected / 0.20 accepted; trained as the reproduction is (15 one-cycle epochs, then 10 / 12
    / 10 SVDD / fine-tune epochs) 0.93 / 0.07."""
    import warnings

    from advlab._util import DefenseHealthWarning
    from advlab.defenses.msvdd import HEALTHY_DETECTION
    from advlab.models import build_model
    from advlab.train import fit

    train, _ = digits_data
    fit_set, val_set = split_validation(train, 0.15, 0)
    mean, std = train.channel_stats()
    out = {}
    for name, train_kw, defense_kw in [
            ("user", dict(epochs=5, lr=1e-3, batch_size=128), dict(projections=512)),
            ("reproduction", dict(epochs=15, lr=3e-3, batch_size=64, schedule="onecycle"),
             dict(projections=512, positive_epochs=10, svdd_epochs=12, finetune_epochs=10))]:
        model = build_model("mnist-fc1", 10, train.in_shape, mean=mean, std=std, seed=1)
        fit(model, fit_set, seed=1, progress=False, **train_kw)
        d = MSVDDDefense.fit(model, fit_set, seed=1, progress=False, **defense_kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = d.tune_beta(val_set, goal="defense")
        out[name] = (res["health"], [w for w in caught if issubclass(w.category, DefenseHealthWarning)])
    user, user_warned = out["user"]
    repro, repro_warned = out["reproduction"]
    assert user["detection_rate"] < HEALTHY_DETECTION - 0.1 and not user["healthy"]
    assert len(user_warned) == 1 and "max_accuracy_drop" in str(user_warned[0].message)
    assert repro["detection_rate"] > HEALTHY_DETECTION + 0.1 and repro["healthy"] and not repro_warned
    assert repro["transfer_success"] < user["transfer_success"]
    assert user["fooled_surrogate"] > 100 and user["images"] == 200
    # the check is in the result of tune_beta and off for the classification goal unless asked
    d = MSVDDDefense.fit(build_model("mnist-fc1", 10, train.in_shape, seed=0), fit_set, projections=16,
                         svdd_epochs=1, finetune_epochs=0, seed=0, progress=False)
    assert "health" not in d.tune_beta(val_set, goal="classification")
    assert "health" in d.tune_beta(val_set, goal="classification", health=True, health_images=20)


def test_save_load_round_trip_and_corrupt_file(defense, digits_data, tmp_path):
    test = digits_data[1]
    d = copy.deepcopy(defense).set_beta(0.93)
    path = d.save(tmp_path / "msvdd.pt", dataset="digits")
    assert not list(tmp_path.glob("*.tmp"))                  # atomic: no temporary left behind
    obj = torch.load(path, weights_only=True)                # plain tensors and JSON-like metadata
    assert obj["metadata"]["dataset"] == "digits"
    d2 = MSVDDDefense.load(path)
    assert torch.equal(d2.predict(test.images), d.predict(test.images))
    assert torch.allclose(d2.beta, d.beta) and float(d2.svdd.gamma) == float(d.svdd.gamma)
    assert torch.equal(d2.surrogate(test.images[:9]), d.surrogate(test.images[:9]))
    assert torch.allclose(d2(test.images[:9]), d(test.images[:9]))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:500])
    with pytest.raises(AdvlabError, match="corrupt"):
        MSVDDDefense.load(bad)
    from advlab.train import save_checkpoint
    save_checkpoint(defense.surrogate, tmp_path / "plain.pt")
    with pytest.raises(AdvlabError, match="not an advlab M-SVDD-D"):
        MSVDDDefense.load(tmp_path / "plain.pt")
    with pytest.raises(AdvlabError, match=r"M-SVDD-D defense not found: .*missing\.pt"):
        MSVDDDefense.load(tmp_path / "missing.pt")


def test_transfer_split_and_full_knowledge_attack(defense, digits_data):
    from advlab.attacks.geometry import linf_box

    test = digits_data[1]
    x, y = test.images[:60], test.labels[:60]
    # transfer setting: the split sums to one over the images the defense gets right
    split = defended_asr(defense, x, y, (x + 0.3 * torch.randn_like(x)).clamp(0, 1))
    assert split["success"] + split["failed"] + split["detected"] == pytest.approx(1.0)
    # the full-knowledge attack makes a wrong class the unique verifier
    atk = MSVDDFullKnowledge(defense, eps=0.3, steps=30, seed=0)
    x_adv = atk(x, y)
    lo, hi = linf_box(x, 0.3)
    assert torch.all(x_adv >= lo) and torch.all(x_adv <= hi)
    res = defended_asr(defense, x, y, x_adv)
    assert res["success"] > 0.8
    pred = defense.predict(x_adv)
    from advlab.metrics import is_success
    assert torch.equal(is_success(pred, y), (pred != y) & (pred != REJECT))
    # extra fixed-target passes only add successes; a fixed target is reached or the sample fails
    one = defended_asr(defense, x, y, MSVDDFullKnowledge(defense, eps=0.1, steps=10, seed=0)(x, y))
    three = defended_asr(defense, x, y, MSVDDFullKnowledge(defense, eps=0.1, steps=10, seed=0, targets=3)(x, y))
    assert three["success"] >= one["success"]
    t = (y + 1) % 10
    pred_t = defense.predict(MSVDDFullKnowledge(defense, eps=0.3, steps=30, seed=0)(x, y, target=t))
    assert float((pred_t == t).float().mean()) > 0.5
    r = torch.tensor([[0.2, -0.5, 0.3], [0.0, 0.1, 0.3], [0.2, -0.1, -0.2]])
    loss = verifier_loss(r, torch.tensor([0, 0, 0]), 0.001, 0.05)
    # target hinge (0.051 - r_t)+ plus the largest other response's hinge (r_o + 0.049)+
    assert loss.tolist() == pytest.approx([0.349, 0.051 + 0.349, 0.0], abs=1e-6)
    with pytest.raises(AdvlabError, match="MSVDDDefense"):
        MSVDDFullKnowledge(nn.Linear(2, 2))


def test_reproduction_quick_writes_report(mnist_root, tmp_path):
    """The bundled spec under --quick, reduced further: one model, PGD as the transferred attack."""
    import csv

    from advlab.papers import reproduce

    over = {"quiet": True, "n": 20, "batch_size": 20,
            "experiments": [{"name": "MNIST-FC1", "paper": "MNIST-FC1", "model": "mnist-fc1", "dataset": "mnist",
                             "folder": "mnist-10k", "projections": 32, "train_subset": 1200, "test_subset": 200}],
            "attacks": [{"name": "PGD", "kind": "pgd", "params": {"eps": 0.3, "steps": 10, "seed": 0}},
                        {"name": "DeepFool", "kind": "deepfool", "params": {"steps": 20}}],
            "beta_curve": {"attack": "DeepFool", "grid": [0.5, 1.2, 0.1]}, "seeds": [0, 1],
            "full_knowledge": [{"name": "full-knowledge PGD", "eps": 0.3, "steps": 10, "betas": ["O_d"]}]}
    rep = reproduce("msvdd", tmp_path / "out", quick=True, data_root=mnist_root.parent, overrides=over)
    out = tmp_path / "out"
    for name in ("results.json", "report.md", "examples.png", "beta-curves.png", "beta-deepfool.png"):
        assert (out / name).is_file()
    runs = json.loads((out / "results.json").read_text())["results"]["MNIST-FC1"]
    assert [r["seed"] for r in runs] == [0, 1]
    res = runs[0]
    acc = res["accuracy"]
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert acc["w_lc"] > 0.8 and acc["w_tilde_lc"] > 0.8 and acc["svdd_o_c"] > 0.6
    rows = res["attack_rows"]
    assert {r["beta"].split("=")[0] for r in rows if r["attack"] == "PGD"} == {"1", "O_c", "O_d"}
    for r in rows:
        assert r["asr"] + r["failed"] + r["detected"] == pytest.approx(1.0, abs=1e-5)
    # the worst case is never below any single attack at the same beta
    od = [r for r in rows if r["beta"].startswith("O_d=")]
    worst = next(r for r in od if r["attack"] == "worst case")
    assert worst["asr"] >= max(r["asr"] for r in od if r["attack"] != "worst case") - 1e-9
    # the attack-outcome checks ran on every beta's transfer and full-knowledge runs, and the report says so
    assert {k.split("=")[0] for k in res["outcome_flags"]} == {"1", "O_c", "O_d"}
    assert all(f["name"] in ("black-box-beats-white-box", "single-step-beats-iterative")
               for flags in res["outcome_flags"].values() for f in flags)
    assert "Attack-outcome" in (out / "report.md").read_text()
    curve = res["beta_curve"]
    assert len(curve["beta"]) == len(curve["ASR"]) == 8
    assert curve["clean accuracy"][0] <= curve["clean accuracy"][-1]  # tighter spheres reject more
    with open(out / "table-1-test-accuracy.csv") as fh:
        table1 = list(csv.DictReader(fh))
    assert float(table1[0]["W-LC (paper)"]) == 98.64 and 50 < float(table1[0]["W-LC"]) <= 100
    md = (out / "report.md").read_text()
    assert "What agrees with the paper" in md and "over 2 training seeds" in md and " ± " in md
    assert rep.out_dir == out
    # an unknown attack name in a spec is an error, not a skipped row
    over["attacks"] = [{"name": "NoSuchAttack", "kind": "no-such-attack"}]
    with pytest.raises(AdvlabError, match="unknown attack"):
        reproduce("msvdd", tmp_path / "out2", quick=True, data_root=mnist_root.parent, overrides=over)


def test_defend_cli_writes_loadable_defense(lenet_digits, digits_data, tmp_path):
    from advlab.eval.defend import defend_msvdd as defend_cli
    from advlab.train import save_checkpoint

    train, test = digits_data
    ck = save_checkpoint(lenet_digits, tmp_path / "model.pt")
    rep = defend_cli(ck, train, test.subset(120), tmp_path / "defended", projections=32, svdd_epochs=3,
                     finetune_epochs=1, n=40, eps=0.2, pgd_steps=5, progress=False)
    d = MSVDDDefense.load(tmp_path / "defended" / "msvdd.pt")
    assert d.beta[0] == pytest.approx(rep.results["tuning"]["O_d"])
    assert (tmp_path / "defended" / "surrogate.pt").is_file() and (tmp_path / "defended" / "report.md").is_file()
    rows = rep.results["attacks"]
    assert [r["attack"] for r in rows] == ["PGD L-inf 0.2 (on W~-LC itself)", "PGD L-inf 0.2",
                                            "full-knowledge PGD L-inf 0.2", "worst case"]
    assert rows[-1]["asr"] >= max(r["asr"] for r in rows[1:3])
    with pytest.raises(AdvlabError, match="goal"):
        defend_cli(ck, train, test, tmp_path / "x", goal="fast")
