"""MSE, SSIM and MS-SSIM: hand-computed cases, scikit-image agreement (when it is installed),
small images, gradients and input checks."""

from __future__ import annotations

import pytest
import torch

from advlab._util import AdvlabError
from advlab.metrics import ms_ssim, mse, ssim
from advlab.metrics.similarity import MS_SSIM_WEIGHTS, _num_scales

C1, C2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2


def _pair(shape, noise=0.15, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=dtype)
    y = (x + noise * torch.randn(shape, generator=g, dtype=dtype)).clamp(0, 1)
    return x, y


def test_mse_per_sample():
    x = torch.zeros(2, 1, 2, 2)
    y = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    assert torch.allclose(mse(x, y), torch.tensor([0.25, 0.25]))


def test_ssim_hand_computed_single_window():
    # a 3x3 image and a uniform 3x3 window: one window, population statistics
    x = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3) / 10  # 0.0 .. 0.8, mean 0.4, var 0.0666..
    var = sum((i / 10 - 0.4) ** 2 for i in range(9)) / 9

    shifted = x + 0.1  # mean 0.5, same variance, covariance = var
    expected = (2 * 0.4 * 0.5 + C1) / (0.4 ** 2 + 0.5 ** 2 + C1) * (2 * var + C2) / (2 * var + C2)
    assert ssim(x, shifted, window_size=3, sigma=None).item() == pytest.approx(expected, rel=1e-12)

    flipped = 1 - x  # mean 0.6, same variance, covariance = -var
    expected = (2 * 0.4 * 0.6 + C1) / (0.4 ** 2 + 0.6 ** 2 + C1) * (-2 * var + C2) / (2 * var + C2)
    assert ssim(x, flipped, window_size=3, sigma=None).item() == pytest.approx(expected, rel=1e-12)
    assert expected < 0


def test_ssim_hand_computed_pixelwise():
    # a 1x4 image: the window shrinks to 1x1, variances vanish and SSIM is the pixelwise
    # luminance term (variances vanish), averaged
    x = torch.tensor([[[[0.2, 0.4, 0.6, 0.8]]]], dtype=torch.float64)
    y = torch.tensor([[[[0.2, 0.5, 0.6, 0.0]]]], dtype=torch.float64)
    terms = [(2 * a * b + C1) / (a * a + b * b + C1) for a, b in zip(x.flatten().tolist(), y.flatten().tolist())]
    assert ssim(x, y).item() == pytest.approx(sum(terms) / 4, rel=1e-12)


@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (2, 3, 32, 32), (4, 1, 8, 8), (2, 3, 5, 9)])
def test_identical_images_give_one(shape):
    x, _ = _pair(shape, dtype=torch.float32)
    assert torch.allclose(ssim(x, x), torch.ones(shape[0]), atol=1e-6)
    assert torch.allclose(ms_ssim(x, x), torch.ones(shape[0]), atol=1e-6)
    assert torch.equal(mse(x, x), torch.zeros(shape[0]))


def test_ssim_is_symmetric_and_decreases_with_noise():
    x, y = _pair((4, 3, 28, 28))
    assert torch.allclose(ssim(x, y), ssim(y, x))
    values = [ssim(x, _pair((4, 3, 28, 28), noise=s)[1]).mean().item() for s in (0.02, 0.1, 0.3)]
    assert values[0] > values[1] > values[2]


def test_small_images_shrink_the_window():
    x, y = _pair((3, 1, 8, 8))
    # 8x8: the 11-tap Gaussian becomes 7 taps with the same sigma
    assert torch.allclose(ssim(x, y), ssim(x, y, window_size=7, sigma=1.5))
    assert not torch.allclose(ssim(x, y), ssim(x, y, window_size=7, sigma=None))
    assert _num_scales(8, 8) == 1
    assert torch.allclose(ms_ssim(x, y), ssim(x, y).clamp_min(1e-8))


def test_number_of_scales_follows_image_size():
    assert [_num_scales(s, s) for s in (8, 14, 28, 32, 64, 161, 512)] == [1, 2, 3, 3, 4, 5, 5]


def test_ms_ssim_by_hand_from_ssim_terms():
    # three scales on 28x28: cs at 28 and 14, full SSIM at 7, weights renormalised
    x, y = _pair((2, 1, 28, 28), noise=0.05)
    from advlab.metrics.similarity import _ssim_terms
    w = torch.tensor(MS_SSIM_WEIGHTS[:3], dtype=torch.float64)
    w = w / w.sum()
    pool = torch.nn.functional.avg_pool2d
    _, cs0 = _ssim_terms(x, y, 11, 1.5, 1.0, 0.01, 0.03)
    _, cs1 = _ssim_terms(pool(x, 2), pool(y, 2), 11, 1.5, 1.0, 0.01, 0.03)
    s2 = ssim(pool(x, 4), pool(y, 4))
    expected = cs0 ** w[0] * cs1 ** w[1] * s2 ** w[2]
    assert torch.allclose(ms_ssim(x, y), expected)
    assert torch.allclose(ms_ssim(x, y, scales=1), ssim(x, y))


def test_against_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    x, y = _pair((3, 3, 28, 28))
    ref = [skm.structural_similarity(a.numpy(), b.numpy(), gaussian_weights=True, sigma=1.5, data_range=1.0,
                                     use_sample_covariance=False, channel_axis=0) for a, b in zip(x, y)]
    assert torch.allclose(ssim(x, y), torch.tensor(ref, dtype=x.dtype), atol=1e-6)
    ref = [skm.structural_similarity(a[0].numpy(), b[0].numpy(), win_size=7, data_range=1.0,
                                     use_sample_covariance=False) for a, b in zip(x, y)]
    assert torch.allclose(ssim(x[:, :1], y[:, :1], window_size=7, sigma=None), torch.tensor(ref, dtype=x.dtype),
                          atol=1e-6)
    # 8x8: scikit-image builds a 7-tap Gaussian for sigma 0.8 (radius int(3.5 * 0.8 + 0.5) = 3)
    x8, y8 = _pair((3, 1, 8, 8))
    ref = [skm.structural_similarity(a[0].numpy(), b[0].numpy(), gaussian_weights=True, sigma=0.8, data_range=1.0,
                                     use_sample_covariance=False) for a, b in zip(x8, y8)]
    assert torch.allclose(ssim(x8, y8, window_size=7, sigma=0.8), torch.tensor(ref, dtype=x.dtype), atol=1e-6)


def test_data_range_scales_constants():
    x, y = _pair((2, 1, 16, 16))
    assert torch.allclose(ssim(x * 255, y * 255, data_range=255.0), ssim(x, y))
    assert torch.allclose(ms_ssim(x * 255, y * 255, data_range=255.0), ms_ssim(x, y))


def test_gradients_are_correct_and_finite():
    x, y = _pair((2, 1, 14, 14), noise=0.3)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: ssim(a, y), (x,))
    assert torch.autograd.gradcheck(lambda a: ms_ssim(a, y), (x,))
    # far-apart images: negative contrast-structure terms are clipped, gradients stay finite
    far = (1 - y).detach()
    far_x = y.clone().requires_grad_(True)
    ms_ssim(far_x, far).sum().backward()
    assert torch.isfinite(far_x.grad).all()


def test_batched_equals_one_by_one():
    x, y = _pair((5, 3, 20, 20), dtype=torch.float32)
    whole = ms_ssim(x, y)
    single = torch.cat([ms_ssim(x[i:i + 1], y[i:i + 1]) for i in range(5)])
    assert torch.allclose(whole, single, atol=1e-6)


@pytest.mark.parametrize("bad, needle", [
    (lambda: ssim(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 7)), r"^x and y must have the same shape"),
    (lambda: ssim(torch.rand(1, 8, 8), torch.rand(1, 8, 8)), r"^x must have shape \(N, C, H, W\), got shape \(1, 8, 8\)"),
    (lambda: mse(torch.zeros(1, 1, 4, 4, dtype=torch.int64), torch.zeros(1, 1, 4, 4, dtype=torch.int64)),
     r"^x must be a floating-point tensor"),
    (lambda: ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), window_size=0),
     r"^window_size must be an integer >= 1, got 0"),
    (lambda: ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), sigma=-1.0), r"^sigma .*> 0, got -1\.0"),
    (lambda: ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), data_range=0),
     r"^data_range must be a finite number > 0, got 0"),
    (lambda: ms_ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), scales=5), r"cannot be halved 4 times \(scales=5\)"),
    (lambda: ms_ssim(torch.rand(1, 1, 28, 28), torch.rand(1, 1, 28, 28), scales=2, weights=[1.0]),
     r"^weights must have 2 entries \(one per scale\), got 1"),
])
def test_bad_input_raises(bad, needle):
    with pytest.raises(AdvlabError, match=needle):
        bad()
