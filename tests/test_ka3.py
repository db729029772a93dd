"""K-A3 (advlab.attacks.KA3): groups, success criterion, rank pmf, cost, the L-BFGS special case,
the RGB path, errors, and the bundled reproduction in a tiny setting."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import advlab.attacks as attacks
from advlab._util import AdvlabError
from advlab.attacks import KA3
from advlab.metrics import cw_ssim, label_rank, rank_pmf
from advlab.metrics.cwssim import select_reference


@pytest.fixture(scope="module")
def digits_correct(lenet_digits, digits_data):
    """60 test digits that the digits LeNet classifies correctly."""
    test = digits_data[1]
    with torch.no_grad():
        ok = lenet_digits(test.images).argmax(1) == test.labels
    idx = ok.nonzero().squeeze(1)[:60]
    return test.images[idx], test.labels[idx]


class _Count:
    """Counts images through a model's forward."""

    def __init__(self, model):
        self.images = 0
        self.h = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.images += args[0].shape[0]


def test_groups_targets_and_rank_pmf(lenet_digits, digits_correct):
    x, y = digits_correct
    atk = KA3(lenet_digits, K=3, steps=300)
    res = atk.run((x, y), batch_size=25)                     # groups continue across the batches
    k, rank = res.extras["k"], res.extras["rank"]
    assert k.tolist() == [2 + i % 3 for i in range(60)]
    assert res.success.float().mean() >= 0.95
    # success means every target (labels ranked 2..k on the clean image) is above the label
    ok = res.success
    assert (rank[ok] >= k[ok]).all()
    assert (rank[ok] == k[ok]).float().mean() >= 0.8
    pmf = rank_pmf(rank, 10)
    assert float(pmf[0]) <= 0.05
    assert float(pmf[1:4].max()) <= 1 / 3 + 0.1
    # minimum-norm convention: the clean image where the attack failed
    assert res.l2[~ok].eq(0).all()


def test_adversarials_in_box_and_ranks_match(lenet_digits, digits_correct):
    x, y = digits_correct[0][:12], digits_correct[1][:12]
    atk = KA3(lenet_digits, K=2, similarity="ssim", steps=200)
    x_adv = atk(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    groups = 1 + torch.arange(12) % 2
    o = atk.outcome(x, x_adv, y, groups=groups)
    rank, success = o["rank"], o["success"]
    with torch.no_grad():
        assert torch.equal(rank, label_rank(lenet_digits(x_adv), y))
    assert success.float().mean() >= 0.9
    assert (rank[success] >= groups[success] + 1).all()


def test_counter_reset_and_explicit_groups(lenet_digits, digits_correct):
    x, y = digits_correct[0][:10], digits_correct[1][:10]
    atk = KA3(lenet_digits, K=4, similarity=None, steps=150)
    r1 = atk.run((x[:3], y[:3]))
    r2 = atk.run((x[3:10], y[3:10]))
    assert r1.extras["k"].tolist() + r2.extras["k"].tolist() == [2 + i % 4 for i in range(10)]
    atk.reset()
    assert atk.run((x[:3], y[:3])).extras["k"].tolist() == [2, 3, 4]
    given = torch.tensor([4, 4, 1, 2, 3, 4, 1, 1, 2, 3])
    res = atk.run((x, y), batch_size=4, groups=given)
    assert res.extras["k"].tolist() == (given + 1).tolist()
    ok = res.success
    assert (res.extras["rank"][ok] >= given[ok] + 1).all()
    x_adv = atk(x[:2], y[:2], groups=torch.tensor([4, 4]))
    o = atk.outcome(x[:2], x_adv, y[:2], groups=torch.tensor([4, 4]))
    rank, success = o["rank"], o["success"]
    assert success.any() and (rank[success] >= 5).all()


def test_one_forward_backward_per_active_sample_and_early_stop(lenet_digits, digits_correct):
    x, y = digits_correct
    params = {n: p.detach().clone() for n, p in lenet_digits.named_parameters()}
    atk = KA3(lenet_digits, K=3, steps=300)
    count = _Count(lenet_digits)
    lenet_digits.train()
    try:
        atk(x, y)
        training_after = lenet_digits.training
    finally:
        count.h.remove()
        lenet_digits.eval()   # the shared model goes back to eval mode even when the attack fails
    # the base class's one-image class-count probe, the clean logits once, then one forward (and
    # backward) per active sample per step
    assert count.images == 1 + x.shape[0] + atk.last_sample_steps
    # finished samples stop costing: far fewer than steps x batch
    assert atk.last_sample_steps < 0.5 * atk.last_steps * x.shape[0]
    assert training_after  # mode restored
    for n, p in lenet_digits.named_parameters():
        assert torch.equal(p, params[n]) and p.grad is None and p.requires_grad


def test_k1_without_similarity_is_lbfgs_with_rank2_target(lenet_digits, digits_correct):
    x, y = digits_correct[0][:40], digits_correct[1][:40]
    with torch.no_grad():
        second = lenet_digits(x).scatter(1, y[:, None], float("-inf")).argmax(1)
    ka = KA3(lenet_digits, K=1, similarity=None, loss="ce", steps=300)
    res_ka = ka.run((x, y))
    res_lb = attacks.LBFGS(lenet_digits).run((x, y), targets=second, keep_adversarials=True)
    assert res_ka.extras["k"].eq(2).all()
    for res in (res_ka, res_lb):
        assert res.success.float().mean() >= 0.95
    both = res_ka.success & res_lb.success
    # same outcome: the rank-2 label of the clean image becomes the prediction, the label rank 2
    assert torch.equal(res_ka.adv_pred[both], second[both])
    assert torch.equal(res_lb.adv_pred[both], second[both])
    with torch.no_grad():
        rank_lb = label_rank(lenet_digits(res_lb.adversarials), y)
    assert (res_ka.extras["rank"] == 2).float().mean() >= 0.9
    assert (rank_lb == 2).float().mean() >= 0.9
    # comparable minimal perturbations (L-BFGS solves the same kind of problem more exactly)
    assert res_ka.l2[both].median() <= 2.0 * res_lb.l2[both].median()


def test_class_loss_hand_computed():
    """masked-ce on a tiny case: softplus(logsumexp(non-targets incl. the label) - z_t) per target,
    plus the guard hinge on non-targets above the label; "ce" is plain cross-entropy per target."""
    import math

    atk = KA3(nn.Linear(1, 4), K=2, similarity=None, margin=0.0)
    z = torch.tensor([[1.0, 0.0, 2.0, -1.0]])          # label 0; target 1; class 2 above the label
    y = torch.tensor([0])
    mask = torch.tensor([[False, True, False, False]])
    rest = math.log(math.exp(1.0) + math.exp(2.0) + math.exp(-1.0))
    want = math.log1p(math.exp(rest - 0.0)) + (2.0 - 1.0)
    assert float(atk._class_loss(z, y, mask)) == pytest.approx(want, rel=1e-6)
    # the guard is zero once the label is above every non-target
    z2 = torch.tensor([[1.0, 3.0, 0.5, -1.0]])
    rest2 = math.log(math.exp(1.0) + math.exp(0.5) + math.exp(-1.0))
    assert float(atk._class_loss(z2, y, mask)) == pytest.approx(math.log1p(math.exp(rest2 - 3.0)), rel=1e-6)
    ce = KA3(nn.Linear(1, 4), K=2, similarity=None, loss="ce")
    lse = math.log(sum(math.exp(v) for v in (1.0, 0.0, 2.0, -1.0)))
    assert float(ce._class_loss(z, y, mask)) == pytest.approx(lse - 0.0, rel=1e-6)


def test_rgb_path_with_cw_ssim():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 6)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(12, 3, 4, 4, generator=g), size=(16, 16), mode="bilinear",
                                        align_corners=False).clamp(0, 1)
    with torch.no_grad():
        y = model(x).argmax(1)
    atk = KA3(model, K=4, similarity="cw-ssim", steps=300)
    res = atk.run((x, y), keep_adversarials=True)
    assert res.adversarials.shape == x.shape
    assert res.success.float().mean() >= 0.9
    assert res.extras["k"].tolist() == [2 + i % 4 for i in range(12)]
    ok = res.success
    assert (res.extras["rank"][ok] >= res.extras["k"][ok]).all()


def test_cw_ssim_term_through_the_cached_reference_equals_the_uncached_one(lenet_digits, digits_correct):
    """K-A3 transforms the clean batch's pyramid once (CWSSIM.reference, rows dropped with the
    finished samples) and scores each step against it with a hand-written backward. The attack
    must be the one it would be with the plain autograd CW-SSIM of both images at every step:
    same adversarials (up to float rounding), same successes, same cost."""
    x, y = digits_correct[0][:16], digits_correct[1][:16]

    class Uncached(KA3):
        def _similarity(self, ref, x_ref, x_adv):
            return self._cw(x_ref, x_adv)  # both pyramids each step, autograd through them

    fast, slow = KA3(lenet_digits, K=3, steps=60), Uncached(lenet_digits, K=3, steps=60)
    groups = torch.tensor([1, 2, 3] * 5 + [1])
    a, b = fast(x, y, groups=groups), slow(x, y, groups=groups)
    assert fast.last_sample_steps == slow.last_sample_steps
    assert torch.allclose(a, b, atol=1e-4)
    ok_a = fast.outcome(x, a, y, groups=groups)["success"]
    ok_b = slow.outcome(x, b, y, groups=groups)["success"]
    assert torch.equal(ok_a, ok_b) and bool(ok_a.any())
    # the similarity term itself, on the rows an attack keeps after a shrink
    ref = fast._cw.reference(x)
    rows = torch.tensor([5, 0, 11])
    assert torch.allclose(fast._cw.score(select_reference(ref, rows), a[rows]), cw_ssim(x[rows], a[rows]), atol=1e-6)


def test_errors(lenet_digits, digits_correct):
    x, y = digits_correct[0][:2], digits_correct[1][:2]
    with pytest.raises(AdvlabError, match="K=10 needs at least K \\+ 1 = 11 classes"):
        KA3(lenet_digits, K=10)(x, y)
    with pytest.raises(AdvlabError, match="do not pass target"):
        KA3(lenet_digits)(x, y, target=y)
    with pytest.raises(AdvlabError, match="similarity"):
        KA3(lenet_digits, similarity="psnr")
    with pytest.raises(AdvlabError, match=r"^K must be"):
        KA3(lenet_digits, K=0)
    with pytest.raises(AdvlabError, match="lam must be > 0"):
        KA3(lenet_digits, lam=0)
    with pytest.raises(AdvlabError, match="loss must be"):
        KA3(lenet_digits, loss="hinge")
    with pytest.raises(AdvlabError, match="groups must hold values in 1..5"):
        KA3(lenet_digits)(x, y, groups=torch.tensor([0, 6]))
    with pytest.raises(AdvlabError, match="groups must be an integer tensor of shape"):
        KA3(lenet_digits)(x, y, groups=torch.tensor([1]))
    with pytest.raises(AdvlabError, match="pixel values in"):
        KA3(lenet_digits)(x * 2, y)


@pytest.mark.slow
@pytest.mark.parametrize("K", [5, 9])
def test_mnist_lenet_k_anonymity(lenet_mnist, mnist_data, K):
    """5-A3 and 9-A3 on 100 correctly classified MNIST test images: ASR >= 95% and every rank
    position 2..K+1 holds about 1/K of the set (eq. 6)."""
    test = mnist_data[1]
    with torch.no_grad():
        ok = lenet_mnist(test.images[:200]).argmax(1) == test.labels[:200]
    idx = ok.nonzero().squeeze(1)[:100]
    res = KA3(lenet_mnist, K=K).run((test.images[idx], test.labels[idx]))
    pmf = rank_pmf(res.extras["rank"], 10)
    assert res.success_rate >= 0.95
    assert float(pmf[0]) <= 0.05
    assert float(pmf[1:K + 1].max()) <= 1 / K + 0.05


def test_rank_pmf_figure():
    from advlab.eval.figures import rank_pmf_figure

    pmfs = {"L-BFGS": rank_pmf(torch.tensor([2] * 9 + [3]), 10), "5-A3": rank_pmf(torch.arange(2, 7), 10)}
    fig = rank_pmf_figure(pmfs, max_rank=10)
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * 10
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights[-1] == pytest.approx(0.9)
    with pytest.raises(AdvlabError, match="max_rank"):
        rank_pmf_figure(pmfs, max_rank=0)


def test_reproduction_tiny(tmp_path, mnist_root, fashion_root):
    """The bundled reproduction end to end on a tiny setting (both datasets, every attack)."""
    from advlab.papers import reproduce

    over = {"n": 30, "train_n": 1500, "epochs": 1, "models": [
        {"name": "MNIST-FC1", "model": "mnist-fc1", "dataset": "mnist"},
        {"name": "FMNIST-LeNet", "model": "lenet5", "dataset": "fashion-mnist"}]}
    rep = reproduce("ka3-attack", tmp_path, quick=True, overrides=over)
    out = tmp_path
    for name in ("results.json", "report.md"):
        assert (out / name).is_file()
    assert list(out.glob("*.csv")) and list(out.glob("*.png"))
    results = json.loads((out / "results.json").read_text())["results"]
    rows = results["attacks"]
    assert {r["attack"] for r in rows} >= {"L-BFGS", "DeepFool", "C&W", "1-A3", "5-A3", "9-A3"}
    # measured (MNIST-FC1 / FMNIST-LeNet): test accuracy 0.86 / 0.67 after one epoch on 1,500 images
    acc = {m["name"]: m["accuracy"] for m in results["models"]}
    assert acc["MNIST-FC1"] > 0.75 and acc["FMNIST-LeNet"] > 0.55, acc
    by = {(r["model"], r["attack"]): r for r in rows}
    for (model, attack), r in by.items():
        assert 0 <= r["asr"] <= 1 and r["mse"] >= 0 and 0 <= r["ssim"] <= 1 and r["threat model"] == "white-box"
        assert abs(sum(r["pmf"]) - 1) < 1e-6
        assert r["n"] == 30 and r["clean_acc"] == 1.0      # the first n correctly classified test images
        # measured: ASR 1.00 everywhere but 9-A3 on MNIST-FC1 and 5-A3 on FMNIST (0.97) and C&W on FMNIST (0.70)
        assert r["asr"] >= (0.6 if attack == "C&W" else 0.9), (model, attack, r["asr"])
    for model in acc:
        # K = 1 (and DeepFool, to the nearest boundary) leave the label at rank 2 (measured: every image)
        for attack in ("DeepFool", "1-A3"):
            assert by[model, attack]["pmf"][1] >= 0.9, (model, attack)
        # K-anonymity (eq. 6): ranks 2..K+1 hold about 1/K each (measured: 5-A3 exactly 0.2 on MNIST-FC1)
        for K in (5, 9):
            pmf = by[model, f"{K}-A3"]["pmf"]
            assert pmf[0] <= 0.05 and max(pmf[1:K + 1]) <= 1 / K + 0.1, (model, K, pmf)
        # the CW-SSIM loss keeps 1-A3 far more similar than L-BFGS (measured SSIM 0.82 vs 0.70 / 0.82 vs 0.61)
        assert by[model, "1-A3"]["ssim"] >= by[model, "L-BFGS"]["ssim"] + 0.05, model
    md = (out / "report.md").read_text()
    assert "rank pmf p(j) (Fig. 4)" in md and all(f"| {a} |" in md for a in ("L-BFGS", "C&W", "5-A3", "9-A3"))
    assert rep.out_dir == out
