"""CW-SSIM (advlab.metrics.cwssim) and the rank-anonymity metrics (advlab.metrics.anonymity)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advlab._util import AdvlabError
from advlab.metrics import (CWSSIM, SteerablePyramid, cw_ssim, k_anonymity_violation, label_rank, rank_pmf,
                            satisfies_k_anonymity, ssim)
from advlab.metrics.cwssim import max_pyramid_scales, select_reference


@pytest.fixture(scope="module")
def digits28(digits_data):
    """64 test digits upsampled to 28x28 (smooth strokes, MNIST-sized, no shared data needed)."""
    x = digits_data[1].images[:64]
    return F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)


def _smooth_rgb(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


# --------------------------------------------------------------------------- identity, noise, shift

@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (2, 1, 28, 28), (2, 3, 32, 32), (2, 3, 64, 64), (2, 1, 20, 28)])
def test_identical_images_score_one(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    s = cw_ssim(x, x)
    assert s.shape == (shape[0],)
    assert torch.allclose(s, torch.ones_like(s), atol=1e-5)


def test_flat_images_score_one_not_nan():
    x = torch.full((2, 1, 28, 28), 0.3)
    zero = torch.zeros(2, 3, 16, 16)
    assert torch.allclose(cw_ssim(x, x), torch.ones(2), atol=1e-6)
    assert torch.allclose(cw_ssim(zero, zero), torch.ones(2), atol=1e-6)
    # a flat image against a textured one is dissimilar but finite
    s = cw_ssim(zero, _smooth_rgb(2, 16))
    assert torch.isfinite(s).all() and (s < 0.9).all()


def test_falls_with_noise(digits28):
    g = torch.Generator().manual_seed(0)
    scores = []
    for sigma in (0.01, 0.05, 0.1, 0.2):
        noisy = (digits28 + sigma * torch.randn(digits28.shape, generator=g)).clamp(0, 1)
        scores.append(cw_ssim(digits28, noisy).mean().item())
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] > 0.95 and scores[-1] < 0.9


def test_one_pixel_shift_costs_far_less_than_for_ssim(digits28):
    shifted = torch.roll(digits28, 1, dims=3)
    cw, ss = cw_ssim(digits28, shifted).mean().item(), ssim(digits28, shifted).mean().item()
    assert 1 - cw < 0.5 * (1 - ss), (cw, ss)
    # noise of (slightly lower) equal energy hurts CW-SSIM much more than the shift does
    mse_shift = (shifted - digits28).pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1, 1)
    noise = torch.randn(digits28.shape, generator=torch.Generator().manual_seed(0)) * mse_shift
    noisy = (digits28 + noise).clamp(0, 1)
    assert (noisy - digits28).pow(2).mean() <= (shifted - digits28).pow(2).mean()
    assert cw > cw_ssim(digits28, noisy).mean().item() + 0.1


def test_symmetric_bounded_and_batch_independent():
    x, y = _smooth_rgb(4, 32, 0), _smooth_rgb(4, 32, 1)
    a, b = cw_ssim(x, y), cw_ssim(y, x)
    assert torch.allclose(a, b, atol=1e-6)
    assert ((a > 0) & (a <= 1)).all()
    one = cw_ssim(x[2:3], y[2:3])
    assert torch.allclose(one, a[2:3], atol=1e-6)


def test_reference_score_equals_call():
    metric = CWSSIM()
    x, y = _smooth_rgb(3, 28, 2), _smooth_rgb(3, 28, 3)
    assert torch.allclose(metric.score(metric.reference(x), y), metric(x, y), atol=1e-6)


@pytest.mark.parametrize("size", [(28, 28), (16, 16), (8, 8), (20, 26), (40, 40)])
def test_cached_reference_gives_the_uncached_loss_and_gradient(size):
    """score(reference(x), y), the hand-written forward and backward K-A3 runs per step, equals the
    uncached autograd path (both pyramids transformed, autograd through them) in value and
    gradient, on every size: square and not, one scale and three, and 40x40, whose crops a
    real-FFT shortcut would get wrong."""
    metric = CWSSIM()
    g = torch.Generator().manual_seed(0)
    x = _smooth_rgb(3, 16, 4) if size == (16, 16) else torch.rand(3, 1, *size, generator=g, dtype=torch.float64)
    x = x.to(torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    weights = torch.arange(1.0, 4.0, dtype=torch.float64)
    ya = y.clone().requires_grad_(True)
    fast = metric.score(metric.reference(x), ya)
    (fast * weights).sum().backward()
    yb = y.clone().requires_grad_(True)
    slow = metric.compare(metric.pyramid(x), metric.pyramid(yb))
    (slow * weights).sum().backward()
    assert torch.allclose(fast, slow, atol=1e-12, rtol=0)
    assert torch.allclose(ya.grad, yb.grad, atol=1e-12, rtol=0)
    # float32 (what the attack runs): the same up to float rounding
    x32, y32 = x.float(), y.float().requires_grad_(True)
    s32 = metric.score(metric.reference(x32), y32)
    s32.sum().backward()
    assert s32.dtype == torch.float32 and y32.grad.dtype == torch.float32
    assert torch.allclose(s32.double(), slow.detach(), atol=1e-6)
    assert torch.allclose(y32.grad.double(), yb.grad / weights.view(-1, 1, 1, 1), atol=1e-6)


def test_reference_rows_and_gradcheck():
    metric = CWSSIM()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 16, 16, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ref = metric.reference(x)
    rows = torch.tensor([3, 1])
    sub = select_reference(ref, rows)
    assert len(sub) == 2 and sub.shape == (2, 1, 16, 16)
    assert torch.allclose(metric.score(sub, y[rows]), metric.score(ref, y)[rows], atol=1e-14)
    yg = y[:1].clone().requires_grad_(True)
    ref1 = select_reference(ref, torch.tensor([0]))
    assert torch.autograd.gradcheck(lambda t: metric.score(ref1, t), (yg,), eps=1e-6, atol=1e-7)
    with pytest.raises(AdvlabError, match="reference's shape"):
        metric.score(ref, y[:2])
    with pytest.raises(AdvlabError, match="ref must come from"):
        metric.score([(x, x)], y)


# --------------------------------------------------------------------------- gradient

def test_gradient_finite_and_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 8, 8, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: cw_ssim(x, t), (y,), eps=1e-6, atol=1e-5)
    # float32, at the identity and on a flat region: finite
    for a, b in [(torch.rand(2, 3, 16, 16), None), (torch.zeros(1, 1, 28, 28), None)]:
        b = a.clone().requires_grad_(True)
        cw_ssim(a, b).sum().backward()
        assert torch.isfinite(b.grad).all()


# --------------------------------------------------------------------------- pyramid depth, errors

def test_pyramid_depth_follows_image_size():
    assert [max_pyramid_scales(s, s) for s in (8, 28, 32, 64)] == [1, 2, 3, 4]
    bands = SteerablePyramid()(torch.rand(2, 1, 28, 28))
    assert [tuple(b.shape) for b in bands] == [(2, 1, 4, 28, 28), (2, 1, 4, 14, 14)]
    with pytest.raises(AdvlabError, match="scales=4 does not fit 28x28"):
        cw_ssim(torch.rand(1, 1, 28, 28), torch.rand(1, 1, 28, 28), scales=4)
    with pytest.raises(AdvlabError, match="too small"):
        cw_ssim(torch.rand(1, 1, 6, 6), torch.rand(1, 1, 6, 6))
    with pytest.raises(AdvlabError, match="same shape"):
        cw_ssim(torch.rand(1, 1, 8, 8), torch.rand(2, 1, 8, 8))
    with pytest.raises(AdvlabError, match="orientations"):
        CWSSIM(orientations=1)
    with pytest.raises(AdvlabError, match=r"^K must be > 0"):
        CWSSIM(K=0)


# --------------------------------------------------------------------------- against pyrtools

def _numpy_cwssim(bands_x, bands_y, window, K):
    """CW-SSIM from two lists of complex numpy bands, written independently with numpy."""
    from numpy.lib.stride_tricks import sliding_window_view

    scores = []
    for c1, c2 in zip(bands_x, bands_y):
        w = min(window, *c1.shape)
        corr = sliding_window_view(c1 * np.conj(c2), (w, w)).mean(axis=(-2, -1))
        e = sliding_window_view(np.abs(c1) ** 2 + np.abs(c2) ** 2, (w, w)).mean(axis=(-2, -1))
        scores.append(np.mean((2 * np.abs(corr) + K) / (e + K)))
    return float(np.mean(scores))


@pytest.mark.parametrize("size", [(28, 28), (8, 8), (32, 32), (20, 26)])
def test_matches_pyrtools_steerable_pyramid(size):
    """Bands equal pyrtools' SteerablePyramidFreq (the Simoncelli lab's reference code, complex,
    order 3 = 4 orientations) up to its lookup-table interpolation, and CW-SSIM on its bands,
    computed with numpy, equals ours."""
    pt = pytest.importorskip("pyrtools")
    rng = np.random.RandomState(0)
    a = rng.rand(*size)
    b = np.clip(a + 0.1 * rng.randn(*size), 0, 1)
    ours_a = SteerablePyramid()(torch.from_numpy(a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyrtools warns that odd sizes reconstruct imperfectly
        ref_a = pt.pyramids.SteerablePyramidFreq(a, order=3, is_complex=True)
        ref_b = pt.pyramids.SteerablePyramidFreq(b, order=3, is_complex=True)
    assert ref_a.num_scales == len(ours_a)
    for i in range(ref_a.num_scales):
        for o in range(4):
            np.testing.assert_allclose(ours_a[i][o].numpy(), ref_a.pyr_coeffs[(i, o)], atol=2e-5, rtol=0)
    bx = [ref_a.pyr_coeffs[(i, o)] for i in range(ref_a.num_scales) for o in range(4)]
    by = [ref_b.pyr_coeffs[(i, o)] for i in range(ref_b.num_scales) for o in range(4)]
    expected = _numpy_cwssim(bx, by, 7, 1e-4)
    got = cw_ssim(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]).item()
    assert abs(got - expected) < 1e-5


# --------------------------------------------------------------------------- anonymity

def test_label_rank_counts_strictly_higher_scores():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    y = torch.tensor([0, 0, 1, 0])
    assert label_rank(logits, y).tolist() == [1, 3, 1, 3]
    with pytest.raises(AdvlabError, match="outside"):
        label_rank(logits, torch.tensor([0, 0, 3, 0]))
    with pytest.raises(AdvlabError, match=r"\(N, C\)"):
        label_rank(torch.zeros(3), y)


def test_rank_pmf_and_k_anonymity():
    ranks = torch.tensor([2, 3, 4, 5, 6] * 20)
    pmf = rank_pmf(ranks, 10)
    assert pmf.shape == (10,) and abs(float(pmf.sum()) - 1) < 1e-12
    assert torch.allclose(pmf[1:6], torch.full((5,), 0.2, dtype=torch.float64))
    assert satisfies_k_anonymity(pmf, 5)
    assert not satisfies_k_anonymity(pmf, 6)                  # 0.2 > 1/6
    assert satisfies_k_anonymity(pmf, 6, tol=0.04)
    assert k_anonymity_violation(pmf, 5) == pytest.approx(0.0)
    at_two = rank_pmf(torch.tensor([2] * 9 + [1]), 10)       # what L-BFGS/DeepFool produce
    assert not satisfies_k_anonymity(at_two, 2)
    assert k_anonymity_violation(at_two, 5) == pytest.approx(0.9 - 0.2)
    with pytest.raises(AdvlabError, match="ranks must lie"):
        rank_pmf(torch.tensor([0, 1]), 10)
    with pytest.raises(AdvlabError, match=r"^ranks is empty"):
        rank_pmf(torch.tensor([], dtype=torch.long), 10)
    with pytest.raises(AdvlabError, match="sum"):
        satisfies_k_anonymity(torch.tensor([0.5, 0.2]), 2)
