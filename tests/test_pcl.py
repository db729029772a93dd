"""PCL (defenses/pcl.py): eq. 5 against a hand-computed value, prototypes that move and separate,
branches tapped by name on a user model, clean accuracy of a PCL model against its softmax twin
(on the embedded 8x8 digits, LeNet-5: MNIST's cnn6 is too slow for a unit test), save/load,
the official-code preset, eq. 6 inference and bad inputs."""

import math

import pytest
import torch
from torch import nn

from advlab._util import AdvlabError
from advlab.defenses import DEFENSES
from advlab.defenses.pcl import (PRESETS, JointLossScores, PCLDefense, PrototypeScores, joint_objective, pc_loss,
                                 pc_terms, resolve_layers, softmax_twin)
from advlab.models import build_model
from advlab.train import accuracy, fit


pytestmark = pytest.mark.usefixtures("one_thread")


def test_eq5_hand_computed():
    # k = 3 classes, d = 2; prototypes at (0,0), (3,0), (0,4)
    w = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    y = torch.tensor([0, 1])
    # sample 0 (class 0): pull 0; push (3 + 4)/2 = 3.5; separation (3 + 4)/2 = 3.5 -> -7
    # sample 1 (class 1): pull |(0,4)| = 4; push (|(3,4)| + |(3,0)|)/2 = (5 + 3)/2 = 4;
    #                     separation (|w1-w0| + |w1-w2|)/2 = (3 + 5)/2 = 4 -> 4 - 4 - 4 = -4
    pull, push, sep = pc_terms(f, y, w)
    assert torch.allclose(pull, torch.tensor([0.0, 4.0]), atol=1e-5)
    assert torch.allclose(push, torch.tensor([3.5, 4.0]))
    assert torch.allclose(sep, torch.tensor([3.5, 4.0]))
    assert math.isclose(float(pc_loss(f, y, w)), (-7.0 - 4.0) / 2, rel_tol=1e-6)
    # separate weights: 2 * pull - 0.5 * push - 0 * separation
    want = ((0 - 0.5 * 3.5) + (2 * 4 - 0.5 * 4)) / 2
    assert math.isclose(float(pc_loss(f, y, w, pull=2.0, push=0.5, separation=0.0)), want, rel_tol=1e-6)
    # released code: squared distances, a second (push) set, no separation
    wp = w + 1.0
    a, b, _ = pc_terms(f, y, w, wp, squared=True)
    assert torch.allclose(a, torch.tensor([1e-12, 16.0]))
    assert torch.allclose(b, torch.tensor([(17 + 26) / 2, (13 + 5) / 2]))
    # gradients are finite at zero distance
    f2 = f.clone().requires_grad_(True)
    pc_loss(f2, y, w).backward()
    assert torch.isfinite(f2.grad).all()


def test_eq5_bad_inputs():
    w = torch.zeros(3, 2)
    with pytest.raises(AdvlabError, match="agree"):
        pc_terms(torch.zeros(2, 5), torch.tensor([0, 1]), w)
    with pytest.raises(AdvlabError, match="labels"):
        pc_terms(torch.zeros(2, 2), torch.tensor([0, 3]), w)
    with pytest.raises(AdvlabError, match="2 classes"):
        pc_terms(torch.zeros(2, 2), torch.tensor([0, 0]), torch.zeros(1, 2))


class UserNet(nn.Module):
    """Not a zoo model: no feature_layers, nested names."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.neck = nn.ModuleDict({"fc": nn.Linear(8, 16), "act": nn.ReLU()})
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        z = self.body(x).mean((2, 3))
        return self.out(self.neck["act"](self.neck["fc"](z)))


def test_branches_tapped_by_name_on_user_model(digits_data):
    train, test = digits_data
    net = UserNet()
    d = PCLDefense(net, layers=["body.1", "neck.act"], in_shape=(1, 8, 8))
    assert d.dims == [8, 16] and d.num_classes == 10          # conv map is average-pooled
    feats = d.features(test.images[:5])
    assert feats["body.1"].shape == (5, 8) and feats["neck.act"].shape == (5, 16)
    # default layers of a user model: the input of its last linear layer
    assert resolve_layers(net) == ["out:input"]
    d2 = PCLDefense(net, in_shape=(1, 8, 8))
    assert d2.dims == [16]
    # training touches every branch: their prototypes move, the features' PC loss falls
    d = PCLDefense.fit(net, train, layers=["body.1", "neck.act"], warmup_epochs=1, pc_epochs=2, lr=0.05,
                       batch_size=64, seed=0)
    assert len(d.history["pc"][0]["per_epoch"]) == 2
    with pytest.raises(AdvlabError, match="no layer named"):
        PCLDefense(net, layers=["nope"], in_shape=(1, 8, 8))


def test_prototypes_move_and_separate(digits_data):
    train, _ = digits_data
    m = build_model("lenet5", 10, (1, 8, 8), seed=0)
    # the same warm-up, no PC phase: the prototypes as initialised (class means of the features)
    before = PCLDefense.fit(m, train, warmup_epochs=2, pc_epochs=0, lr=0.05, batch_size=64, seed=0)
    assert before.history["prototype_init"] == "class-means"
    p0 = [p.pull.detach().clone() for p in before.prototypes]
    sep0 = before.prototype_separation()
    d = PCLDefense.fit(m, train, warmup_epochs=2, pc_epochs=3, lr=0.05, batch_size=64, seed=0)
    moved = [float((p.pull.detach() - q).norm(dim=1).min()) for p, q in zip(d.prototypes, p0)]
    assert min(moved) > 0.1                       # every prototype of every layer moved
    assert d.prototype_separation() > 1.3 * sep0  # and they were pushed apart
    pcs = [e["pc[relu4]"] for e in d.history["pc"][0]["per_epoch"]]
    assert pcs[-1] < pcs[0]
    # the model handed in was not touched
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                   build_model("lenet5", 10, (1, 8, 8), seed=0).state_dict().values()))


def test_pcl_keeps_clean_accuracy_of_softmax_twin(digits_data):
    """Through the public API; digits with LeNet-5 (the MNIST/cnn6 version is in the reproduction)."""
    train, test = digits_data
    soft = build_model("lenet5", 10, (1, 8, 8), seed=0)
    fit(soft, train, epochs=20, lr=0.05, batch_size=64, optimizer="sgd", weight_decay=1e-4, seed=0)
    d = PCLDefense.fit(build_model("lenet5", 10, (1, 8, 8), seed=0), train, warmup_epochs=10, pc_epochs=10,
                       lr=0.05, batch_size=64, seed=0)
    acc_soft, acc_pcl = accuracy(soft, test), accuracy(d, test)
    assert acc_pcl >= acc_soft - 0.01, (acc_pcl, acc_soft)
    # eq. 6 (nearest prototype) agrees with the softmax rule on most images
    proto = float((d.predict(test.images, rule="prototype") == test.labels).float().mean())
    assert proto > 0.9


def test_save_load_round_trip(tmp_path, digits_data):
    train, test = digits_data
    d = PCLDefense.fit(build_model("lenet5", 10, (1, 8, 8), seed=0), train, warmup_epochs=1, pc_epochs=1,
                       lr=0.05, batch_size=64, seed=0, preset="official-code")
    path = d.save(tmp_path / "pcl.pt")
    back = PCLDefense.load(path)
    assert back.options == d.options and back.layers == d.layers and back.preset == "official-code"
    x = test.images[:50]
    assert torch.equal(back(x), d(x))
    assert torch.equal(back.predict(x, rule="prototype"), d.predict(x, rule="prototype"))
    for a, b in zip(back.prototypes, d.prototypes):
        assert torch.equal(a.pull, b.pull) and torch.equal(a.push, b.push)
    # a user model needs its (untrained) instance
    u = PCLDefense(UserNet(), layers=["neck.act"], in_shape=(1, 8, 8))
    u.save(tmp_path / "u.pt")
    with pytest.raises(AdvlabError, match="model="):
        PCLDefense.load(tmp_path / "u.pt")
    assert PCLDefense.load(tmp_path / "u.pt", model=UserNet()).dims == [16]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AdvlabError, match=r"cannot read PCL defense .*bad\.pt: corrupt"):
        PCLDefense.load(tmp_path / "bad.pt")


def test_registry_presets_and_bad_options(digits_data):
    assert DEFENSES["pcl"].cls is PCLDefense
    assert PRESETS["official-code"]["push"] == 1e-4 and PRESETS["official-code"]["separation"] == 0.0
    m = build_model("lenet5", 10, (1, 8, 8), seed=0)
    with pytest.raises(AdvlabError, match="preset"):
        PCLDefense(m, preset="nope")
    with pytest.raises(AdvlabError, match="unknown PCL option"):
        PCLDefense(m, margin=3)
    with pytest.raises(AdvlabError, match="push"):
        PCLDefense(m, push=-1.0)
    with pytest.raises(AdvlabError, match="inference"):
        PCLDefense(m, inference="vote")
    with pytest.raises(AdvlabError, match="in_shape"):
        PCLDefense(UserNet())
    with pytest.raises(AdvlabError, match="model must be"):
        PCLDefense("lenet5")
    d = PCLDefense(m)
    with pytest.raises(AdvlabError, match="rule"):
        d.predict(digits_data[1].images[:2], rule="vote")
    with pytest.raises(AdvlabError, match=r"^adversarial must be None, 'fgsm' or 'pgd'"):
        d.train_pc(digits_data[0], 1, adversarial="cw")
    with pytest.raises(AdvlabError, match="labels"):
        PCLDefense.fit(m, (torch.rand(8, 1, 8, 8), torch.full((8,), 12)), warmup_epochs=0, pc_epochs=1)


def test_joint_objective_matches_training_loss(digits_data):
    _, test = digits_data
    d = PCLDefense(build_model("lenet5", 10, (1, 8, 8), seed=0), seed=1)
    x, y = test.images[:16], test.labels[:16]
    per_sample = joint_objective(d)(JointLossScores(d)(x), y)
    assert per_sample.shape == (16,)
    assert math.isclose(float(per_sample.detach().mean()), float(d.joint_loss(x, y).detach()), rel_tol=1e-4, abs_tol=1e-4)


def test_softmax_twin_is_pcl_without_the_pc_loss(digits_data):
    """The reproduction's Softmax row: the CE warm-up continued for the PC phase's epochs, data,
    batch order, optimiser and lr decay on CE only — PCL with every PC weight at 0 is the same model."""
    from advlab.defenses.pcl import pc_milestones

    train, test = digits_data
    warm = build_model("lenet5", 10, (1, 8, 8), seed=0)
    fit(warm, train, epochs=1, lr=0.01, batch_size=64, optimizer="adam", seed=0)
    before = {k: v.clone() for k, v in warm.state_dict().items()}
    kw = dict(lr=0.01, batch_size=64, optimizer="adam", weight_decay=1e-4, seed=0)
    twin = softmax_twin(warm, train, 2, **kw)
    zero = PCLDefense.fit(warm, train, warmup_epochs=0, pc_epochs=2, progress=False, pull=0.0, push=0.0,
                          separation=0.0, **kw)
    assert zero.history["pc"][0]["lr_decay_steps"] == pc_milestones(len(train), 2, 64)
    for (k, a), b in zip(twin.state_dict().items(), zero.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k
    assert all(torch.equal(v, before[k]) for k, v in warm.state_dict().items())   # warm-up untouched
    assert not torch.equal(twin.state_dict()["head.weight"], before["head.weight"])


def test_prototype_scores_decide_as_eq6_and_the_attacks_on_pcl_chain(digits_data):
    """Eq. 6's scores, the adaptive attacks on PCL (prototype scores, joint loss) and the one
    survivor chain on a PCL defense: later links run only on what every earlier result left
    correct, and what broke before stays broken."""
    from advlab.adaptive import joint_loss_attack, prototype_attack
    from advlab.eval.runner import AttackRun, adversarial_result, survivor_chain, worst_case

    train, test = digits_data
    d = PCLDefense.fit(build_model("lenet5", 10, (1, 8, 8), seed=0), train, warmup_epochs=2, pc_epochs=1, lr=0.05,
                       batch_size=64, seed=0)
    x, y = test.images[:24], test.labels[:24]
    assert torch.equal(PrototypeScores(d)(x).argmax(1), d.predict(x, rule="prototype"))
    j6 = lambda xb: d.predict(xb, rule="prototype")  # noqa: E731
    fgsm = adversarial_result(x, y, prototype_attack("fgsm", d, eps=0.1)(x, y), j6)
    joint = joint_loss_attack("fgsm", d, eps=0.1)(x, y)
    with torch.no_grad():
        assert float(d.joint_loss(joint, y)) > float(d.joint_loss(x, y))
    runs = [AttackRun("PGD eq. 6", prototype_attack("pgd", d, eps=0.1, alpha=0.02, steps=5, seed=0)),
            AttackRun("BIM joint", lambda xs, ys: joint_loss_attack("bim", d, eps=0.1, alpha=0.02, steps=5)(xs, ys))]
    chain = survivor_chain(runs, x, y, j6, start=fgsm)
    assert torch.equal(chain.ran_on["PGD eq. 6"], (fgsm.adv_pred == y).nonzero().squeeze(1))
    assert chain.worst.robust_accuracy <= fgsm.robust_accuracy
    assert torch.equal(chain.robust, (chain.worst.adv_pred == y) & (chain.clean_pred == y))
    assert torch.equal(j6(chain.x_adv), chain.worst.adv_pred)
    assert float((chain.x_adv - x).abs().max()) <= 0.1 + 1e-6
    # an earlier result that broke every image: nothing is left to attack
    gone = adversarial_result(x, y, x.clone(), lambda xb: (y + 1) % 10)
    assert survivor_chain(runs, x, y, j6, start=worst_case([fgsm, gone])).results == {}


def test_eq8_reading_branches_heads_and_loss(digits_data, tmp_path):
    """eq. 8: every supervised layer but the last gets G_phi (a linear map to branch_dim) and a CE
    head; the loss adds each head's cross-entropy to Algorithm 1's, checked term by term; the
    branches train with the model, and the defense round-trips through its state."""
    import torch.nn.functional as F

    train, test = digits_data
    net = build_model("cnn6", 10, (1, 8, 8), seed=0)
    a1 = PCLDefense(net, seed=1)
    assert a1.reading == "algorithm1" and a1.branched == [False, False, False]
    assert not any(k.startswith(("branches", "heads")) for k in a1.state_dict())   # old checkpoints still load
    d = PCLDefense(net, seed=1, reading="eq8", branch_dim=16)
    assert d.branched == [True, True, False]
    assert d.prototype_dims == [16, 16, 64] and d.dims == [128, 512, 64]
    assert isinstance(d.branches[0], nn.Linear) and d.branches[0].in_features == 128
    assert d.heads[1].out_features == 10 and isinstance(d.heads[2], nn.Identity)
    # the same seed gives the same branches
    d_again = PCLDefense(net, seed=1, reading="eq8", branch_dim=16)
    assert torch.equal(d.branches[0].weight, d_again.branches[0].weight)
    x, y = test.images[:16], test.labels[:16]
    with torch.no_grad():
        logits, fs = d.forward_features(x)
        assert [f.shape[1] for f in fs] == [16, 16, 64]
        raw = a1.forward_features(x)[1]
        assert torch.allclose(fs[0], d.branches[0](raw[0]), atol=1e-6) and torch.allclose(fs[2], raw[2])
        want = F.cross_entropy(logits, y) + sum(
            pc_loss(f, y, p.pull) for f, p in zip(fs, d.prototypes)) + sum(
            F.cross_entropy(d.heads[i](fs[i]), y) for i in (0, 1))
        assert math.isclose(float(d.joint_loss(x, y)), float(want), rel_tol=1e-5)
        per_sample = joint_objective(d)(JointLossScores(d)(x), y)
        assert per_sample.shape == (16,)
        assert math.isclose(float(per_sample.mean()), float(want), rel_tol=1e-4)
    fitted = PCLDefense.fit(net, train, warmup_epochs=1, pc_epochs=1, optimizer="adam", lr=2e-3, batch_size=64,
                            reading="eq8", branch_dim=16, seed=1, progress=False)
    g0 = PCLDefense(net, seed=1, reading="eq8", branch_dim=16).branches[0].weight
    assert not torch.allclose(fitted.branches[0].weight, g0)                         # G_phi trained
    ep = fitted.history["pc"][0]["per_epoch"][-1]
    assert set(ep) >= {"branch_ce[gap]", "branch_ce[act_fc1]"} and "branch_ce[act_fc2]" not in ep
    back = PCLDefense.from_state(build_model("cnn6", 10, (1, 8, 8), seed=7), fitted.to_state())
    assert back.reading == "eq8" and back.branch_dim == 16
    fitted.save(tmp_path / "eq8.pt")
    loaded = PCLDefense.load(tmp_path / "eq8.pt", model=build_model("cnn6", 10, (1, 8, 8), seed=3))
    with torch.no_grad():
        for other in (back, loaded):
            assert torch.equal(other(x), fitted(x))
            assert torch.equal(other.prototype_scores(x), fitted.prototype_scores(x))
            assert torch.equal(other.branches[1].weight, fitted.branches[1].weight)
    with pytest.raises(AdvlabError, match="reading"):
        PCLDefense(net, reading="eq9")
    with pytest.raises(AdvlabError, match="branch_dim"):
        PCLDefense(net, reading="eq8", branch_dim=0)
