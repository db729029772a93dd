"""The evaluator's exam: the gallery's mechanisms, the decision scores of a rejecting defense, the
smoothed-table BPDA, and the quick exam itself (what CI runs: every verdict must be a pass)."""

import json

import pytest
import torch
from torch import nn

from advlab import REJECT
from advlab.adaptive import AcceptedScores, auto_bpda, can_reject, lookup_approx
from advlab.attacks.logits import merge_reject
from advlab.exam.gallery import (GALLERY, ConfidenceRejector, GaussianNoise, JpegLike, Quantize, Scaled,
                                 SqueezeDetector, Thermometer)


def _tiny(c=1, classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * 8 * 8, classes)).eval()


def _images(n=16, c=1, seed=0):
    return torch.rand(n, c, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_layers_do_what_their_names_say():
    x = _images()
    q = Quantize(4)(x)
    levels = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    assert bool(((q.flatten()[:, None] - levels).abs().min(1).values < 1e-6).all())
    t = Thermometer(16)(x)
    assert t.shape == (16, 16, 8, 8)
    # channel k is 1 exactly where the pixel is >= k/16, so the channels sum to floor(16 x) + 1
    assert torch.equal(t.sum(1), torch.floor(x[:, 0] * 16) + 1)
    j = JpegLike(step=1e-4)(x)
    assert (j - x).abs().max() < 1e-3  # a tiny step is (almost) lossless: the DCT pair is orthonormal
    assert (JpegLike(step=0.25)(x) - x).abs().max() > 0.05


def test_gradient_killers_are_exact_zeros():
    x = _images().requires_grad_(True)
    for layer in (Quantize(4), Thermometer(16), JpegLike(0.25)):
        out = layer(x).sum()
        if not out.requires_grad:  # the graph is cut: no gradient at all
            continue
        (g,) = torch.autograd.grad(out, x, allow_unused=True)
        assert g is None or bool((g == 0).all())


def test_randomized_and_scaled_entries():
    m = _tiny()
    x = _images()
    noisy = GaussianNoise(m, sigma=0.2)
    assert not torch.equal(noisy(x), noisy(x))
    z = m(x)
    assert torch.allclose(Scaled(m, 100.0)(x), 100 * z)
    ls = Scaled(m, 100.0, log_softmax=True)(x)
    assert torch.allclose(ls.logsumexp(1), torch.zeros(16), atol=1e-5)


def test_confidence_rejector_and_accepted_scores_agree_with_predict():
    m = _tiny(classes=4)
    d = ConfidenceRejector(m, threshold=0.4)
    x = _images(64)
    pred = d.predict(x)
    conf = torch.softmax(m(x), 1).max(1).values
    assert torch.equal(pred == REJECT, conf < 0.4)
    assert can_reject(d, x) and not can_reject(m, x, m(x).argmax(1))
    acc = AcceptedScores(d)
    out = acc(x)
    assert out.shape == (64, 5)
    for y in range(4):
        ys = torch.full((64,), y)
        wrong = merge_reject(out, ys).argmax(1) != ys
        assert torch.equal(wrong, (pred != ys) & (pred != REJECT))


def test_accepted_scores_differentiates_the_detector():
    m = _tiny(classes=4)
    d = SqueezeDetector(m, levels=2).calibrate(_images(64, seed=1), false_positive_rate=0.5)
    acc = AcceptedScores(d)
    x = _images(8).requires_grad_(True)
    out = acc(x)
    (g,) = torch.autograd.grad(out[:, -1].sum(), x)
    # the column's gradient is that of the detector's score, scaled
    (gd,) = torch.autograd.grad(d.detect(x).sum(), x)
    assert torch.allclose(g, acc.scale * gd, atol=1e-6) and bool(g.abs().sum() > 0)


def test_lookup_approx_stands_in_for_elementwise_layers_only():
    x = _images(8)
    therm = Thermometer(16)
    g = lookup_approx(therm, x)
    assert g is not None
    v = x.clone().requires_grad_(True)
    out = g(v)
    assert out.shape == therm(x).shape
    # close to the layer away from its thresholds, with a nonzero gradient
    assert float((out.detach() - therm(x)).abs().mean()) < 0.1
    (grad,) = torch.autograd.grad(out.sum(), v)
    assert bool((grad > 0).all())  # every pixel raises some channel's soft step
    conv = nn.Conv2d(1, 4, 3, padding=1)
    assert lookup_approx(conv, x) is None  # mixes neighbours: not element-wise


def test_auto_bpda_smooths_a_thermometer():
    torch.manual_seed(0)
    model = nn.Sequential(Thermometer(16), nn.Flatten(), nn.Linear(16 * 64, 4)).eval()
    x, y = _images(16), torch.arange(16) % 4
    wrapped, layers = auto_bpda(model, x, y)
    assert layers == ["0"]
    v = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(wrapped(v), y), v)
    assert bool((g.flatten(1).abs().sum(1) > 0).all())
    assert torch.equal(wrapped(x), model(x))  # the forward values are the model's


def test_gallery_names_its_mechanisms():
    assert len(GALLERY) >= 12
    families = {e.family for e in GALLERY.values()}
    assert families == {"shattered", "stochastic", "vanishing", "detector", "second network"}
    for e in GALLERY.values():
        assert e.flags and e.truth in ("bpda", "eot", "logits", "decision")


def test_quick_exam_every_verdict_passes(tmp_path):
    """What CI runs (``advlab exam --quick``): each quick gallery entry seen through, the control sound."""
    from advlab.cli import main

    out = tmp_path / "exam"
    code = main(["exam", "--quick", "--out", str(out), "--quiet"])
    res = json.loads((out / "results.json").read_text())
    rows = {r["entry"]: r for r in res["results"]["rows"]}
    assert set(rows) == {"undefended"} | {k for k, e in GALLERY.items() if e.quick}
    for name, r in rows.items():
        assert r["verdict"] == ("sound" if name == "undefended" else "seen through"), (name, r)
        assert r["evaluate"] <= r["adaptive (true robustness)"] + 0.03
    # the illusion the exam removes: somewhere a naive PGD is fooled by far
    assert max(r["naive PGD-CE"] - r["evaluate"] for r in rows.values()) > 0.3
    assert code == 0
    assert "The exam" in (out / "report.md").read_text()


@pytest.mark.parametrize("name", ["confidence-rejector"])
def test_evaluate_aims_at_accepted_as_wrong(name):
    m = _tiny(classes=4)
    d = ConfidenceRejector(m, threshold=0.6)
    from advlab.eval import evaluate

    x = _images(32)
    y = m(x).argmax(1)
    res = evaluate(d, x, y, eps=0.3, steps=20, square_queries=50, targets=3, escalate=1, progress=False)
    names = [f.name for f in res.flags]
    assert "rejects-inputs" in names
    assert "APGD-T-CE" in res.per_attack


def test_below_truth_text_names_the_entries_and_why():
    from advlab.exam import below_truth_text

    def row(entry, family, ev, truth):
        return {"entry": entry, "family": family, "evaluate": ev, "adaptive (true robustness)": truth}
    assert "within the tolerance" in below_truth_text([row("quantize", "shattered", 0.64, 0.65)])
    text = below_truth_text([row("quantize", "shattered", 0.64, 0.65), row("sap", "stochastic", 0.12, 0.23),
                             row("gaussian-noise", "stochastic", 0.08, 0.27), row("jpeg-like", "shattered", 0.07, 0.14)])
    assert text.startswith("`evaluate` is more than 3 points below the true-robustness attack on sap, gaussian-noise "
                           "and jpeg-like:")
    assert "randomized entries (sap and gaussian-noise)" in text and "On jpeg-like the battery" in text
    assert "quantize" not in text
