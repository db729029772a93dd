"""SSIM, MS-SSIM and MSE (advlab.metrics.similarity) against a direct, independently written
reference (2-d windows, the formulas of Wang et al. as printed), at non-default parameters, plus
the window and scale rules and every error (sharp enough for mutation testing,
benchmarks/mutation.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from advlab._util import AdvlabError
from advlab.metrics.similarity import MS_SSIM_WEIGHTS, _filter, _fit_window, _num_scales, _window_1d, ms_ssim, mse, ssim

D = torch.float64


def rand_pair(n=2, c=1, h=16, w=16, seed=0, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g, dtype=D)
    y = (x + noise * torch.randn(n, c, h, w, generator=g, dtype=D)).clamp(0, 1)
    return x, y


def ref_window(size, sigma):
    if sigma is None:
        w = [1.0] * size
    else:
        w = [math.exp(-((i - (size - 1) / 2) ** 2) / (2 * sigma ** 2)) for i in range(size)]
    s = sum(w)
    return torch.tensor([v / s for v in w], dtype=D)


def ref_terms(x, y, window_size=11, sigma=1.5, data_range=1.0, k1=0.01, k2=0.03):
    size = min(window_size, x.shape[-2], x.shape[-1])
    size = size if size % 2 else size - 1
    w1 = ref_window(size, sigma)
    w2 = torch.outer(w1, w1)[None, None]
    ssim_vals, cs_vals = [], []
    for i in range(x.shape[0]):
        s_ch, cs_ch = [], []
        for ch in range(x.shape[1]):
            a, b = x[i:i + 1, ch:ch + 1], y[i:i + 1, ch:ch + 1]
            mu_a, mu_b = F.conv2d(a, w2), F.conv2d(b, w2)
            var_a = F.conv2d(a * a, w2) - mu_a ** 2
            var_b = F.conv2d(b * b, w2) - mu_b ** 2
            cov = F.conv2d(a * b, w2) - mu_a * mu_b
            C1, C2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
            lum = (2 * mu_a * mu_b + C1) / (mu_a ** 2 + mu_b ** 2 + C1)
            cs = (2 * cov + C2) / (var_a + var_b + C2)
            s_ch.append((lum * cs).flatten())
            cs_ch.append(cs.flatten())
        ssim_vals.append(float(torch.cat(s_ch).mean()))
        cs_vals.append(float(torch.cat(cs_ch).mean()))
    return torch.tensor(ssim_vals, dtype=D), torch.tensor(cs_vals, dtype=D)


# ---------------------------------------------------------------------------- mse

def test_mse_per_sample():
    x = torch.zeros(2, 1, 2, 2)
    y = torch.tensor([[[[1.0, 0.0], [0.0, -1.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    assert mse(x, y).tolist() == [0.5, 0.25]
    assert mse(y, x).shape == (2,)
    assert mse(y, y).tolist() == [0.0, 0.0]
    assert mse(x + 0.25, y).tolist() == [(0.75 ** 2 + 0.25 ** 2 * 2 + 1.25 ** 2) / 4, 0.0625]


# ---------------------------------------------------------------------------- windows and filtering

@pytest.mark.parametrize("size,sigma", [(1, 1.5), (5, 1.5), (7, 0.8), (11, 1.5), (4, 2.0), (7, None), (3, None)])
def test_window_1d_is_the_normalised_gaussian_or_uniform(size, sigma):
    w = _window_1d(size, sigma, torch.zeros(1, dtype=D))
    assert w.dtype == D and w.shape == (size,)
    assert torch.allclose(w, ref_window(size, sigma), rtol=0, atol=1e-15)
    assert _window_1d(size, sigma, torch.zeros(1)).dtype == torch.float32


@pytest.mark.parametrize("ws,h,w,want", [(11, 8, 8, 7), (11, 28, 28, 11), (11, 10, 12, 9), (11, 12, 10, 9), (4, 28, 28, 3),
                                         (11, 11, 20, 11), (7, 64, 64, 7), (1, 5, 5, 1), (11, 2, 9, 1)])
def test_fit_window(ws, h, w, want):
    assert _fit_window(ws, h, w) == want


def test_filter_is_the_separable_valid_2d_filter_per_channel():
    g = torch.Generator().manual_seed(3)
    t = torch.rand(2, 3, 9, 7, generator=g, dtype=D)
    w1 = ref_window(5, 1.2)
    out = _filter(t, w1)
    assert out.shape == (2, 3, 5, 3)
    w2 = torch.outer(w1, w1)[None, None].expand(3, 1, 5, 5)
    assert torch.allclose(out, F.conv2d(t, w2, groups=3), rtol=0, atol=1e-13)
    # a non-symmetric window tells rows from columns
    wa = torch.tensor([0.1, 0.3, 0.6], dtype=D)
    want = F.conv2d(t, torch.outer(wa, wa)[None, None].expand(3, 1, 3, 3), groups=3)
    assert torch.allclose(_filter(t, wa), want, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------- SSIM

@pytest.mark.parametrize("kw", [{}, {"window_size": 7, "sigma": None}, {"data_range": 2.0}, {"k1": 0.05, "k2": 0.1},
                                {"sigma": 0.7, "window_size": 5}, {"data_range": 0.5, "k1": 0.02, "k2": 0.05}])
@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (2, 3, 12, 14), (1, 1, 8, 8), (1, 1, 16, 8), (1, 2, 8, 16)])
def test_ssim_matches_the_reference(kw, shape):
    x, y = rand_pair(*shape, seed=sum(shape))
    got = ssim(x, y, **kw)
    want = ref_terms(x, y, **kw)[0]
    assert got.shape == (shape[0],) and got.dtype == D
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_ssim_of_identical_images_is_one_and_it_is_symmetric():
    x, y = rand_pair(3, 2, 16, 16)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=D), rtol=0, atol=1e-12)
    assert torch.allclose(ssim(x, y), ssim(y, x), rtol=0, atol=1e-12)
    assert bool((ssim(x, y) < 1).all())


def test_ssim_on_a_constant_shift_is_the_luminance_term():
    x = torch.full((1, 1, 11, 11), 0.5, dtype=D)
    y = x + 0.1
    c1 = 0.01 ** 2
    lum = (2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1)
    assert float(ssim(x, y)) == pytest.approx(lum, abs=1e-12)
    assert float(ssim(x, y, k1=0.1)) == pytest.approx((0.6 + 0.01) / (0.61 + 0.01), abs=1e-12)
    assert float(ssim(x, y, data_range=2.0)) == pytest.approx((0.6 + 4e-4) / (0.61 + 4e-4), abs=1e-12)


# ---------------------------------------------------------------------------- MS-SSIM

def ref_ms_ssim(x, y, scales, weights, **kw):
    wsum = sum(weights)
    out = torch.ones(x.shape[0], dtype=D)
    for j in range(scales):
        s, cs = ref_terms(x, y, **kw)
        term = s if j == scales - 1 else cs
        out = out * term.clamp_min(1e-8) ** (weights[j] / wsum)
        if j < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return out


@pytest.mark.parametrize("h,w,want", [(8, 8, 1), (13, 13, 1), (14, 14, 2), (14, 100, 2), (100, 14, 2), (27, 27, 2),
                                      (28, 28, 3), (56, 56, 4), (111, 111, 4), (112, 112, 5), (161, 161, 5),
                                      (1000, 1000, 5), (2, 2, 1)])
def test_num_scales(h, w, want):
    assert _num_scales(h, w) == want


def test_num_scales_min_side():
    assert _num_scales(28, 28, min_side=14) == 2 and _num_scales(28, 28, min_side=3) == 4


def test_ms_ssim_matches_the_reference():
    assert MS_SSIM_WEIGHTS == (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    x, y = rand_pair(2, 1, 28, 28, seed=5, noise=0.1)
    got = ms_ssim(x, y)   # 3 scales
    want = ref_ms_ssim(x, y, 3, MS_SSIM_WEIGHTS[:3])
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    w = [0.5, 0.2, 0.3]
    assert torch.allclose(ms_ssim(x, y, scales=3, weights=w, data_range=2.0, k1=0.02, k2=0.05, sigma=None, window_size=5),
                          ref_ms_ssim(x, y, 3, w, data_range=2.0, k1=0.02, k2=0.05, sigma=None, window_size=5),
                          rtol=0, atol=1e-12)
    assert torch.allclose(ms_ssim(x, y, scales=2), ref_ms_ssim(x, y, 2, MS_SSIM_WEIGHTS[:2]), rtol=0, atol=1e-12)
    x5, y5 = rand_pair(1, 1, 32, 32, seed=6, noise=0.05)
    ws = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert torch.allclose(ms_ssim(x5, y5, scales=6, weights=ws), ref_ms_ssim(x5, y5, 6, ws), rtol=0, atol=1e-12)


def test_ms_ssim_on_a_non_square_image_counts_scales_on_the_short_side():
    x, y = rand_pair(1, 1, 64, 16, seed=8, noise=0.1)     # 16 px wide: 2 scales, not the 4 of 64 px
    assert torch.allclose(ms_ssim(x, y), ref_ms_ssim(x, y, 2, MS_SSIM_WEIGHTS[:2]), rtol=0, atol=1e-12)
    assert torch.allclose(ms_ssim(y, x), ref_ms_ssim(y, x, 2, MS_SSIM_WEIGHTS[:2]), rtol=0, atol=1e-12)
    xt, yt = x.transpose(-1, -2), y.transpose(-1, -2)
    assert torch.allclose(ms_ssim(xt, yt), ref_ms_ssim(xt, yt, 2, MS_SSIM_WEIGHTS[:2]), rtol=0, atol=1e-12)
    tall = torch.zeros(1, 1, 64, 8, dtype=D)
    with pytest.raises(AdvlabError, match=r"^an image of 64x8 pixels cannot be halved 4 times \(scales=5\)$"):
        ms_ssim(tall, tall, scales=5)


def test_ms_ssim_with_one_scale_is_ssim_and_negative_terms_are_clipped():
    x, y = rand_pair(2, 1, 8, 8, noise=0.1)
    assert torch.allclose(ms_ssim(x, y), ssim(x, y), rtol=0, atol=1e-12)
    a = torch.zeros(1, 1, 8, 8, dtype=D)
    a[..., ::2, :] = 1.0
    b = 1.0 - a            # anti-correlated: SSIM < 0
    assert float(ssim(a, b)) < 0
    assert float(ms_ssim(a, b)) == pytest.approx(1e-8, rel=1e-9)
    assert torch.allclose(ms_ssim(x, x), torch.ones(2, dtype=D), rtol=0, atol=1e-12)


def test_ms_ssim_argument_errors():
    x, y = rand_pair(1, 1, 16, 16)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(AdvlabError, match=f"^scales must be a positive integer, got {bad}$"):
            ms_ssim(x, y, scales=bad)
    assert torch.allclose(ms_ssim(x, y, scales=2.0), ms_ssim(x, y, scales=2), rtol=0, atol=0)
    assert torch.allclose(ms_ssim(x, y, scales=1), ssim(x, y).clamp_min(1e-8), rtol=0, atol=1e-12)
    with pytest.raises(AdvlabError, match=r"^an image of 16x16 pixels cannot be halved 5 times \(scales=6\)$"):
        ms_ssim(x, y, scales=6)
    x2, y2 = rand_pair(1, 1, 16, 40)
    assert ms_ssim(x2, y2, scales=5).shape == (1,)                       # 16 = 2 ** 4: just enough
    with pytest.raises(AdvlabError, match=r"^an image of 16x40 pixels cannot be halved 5 times \(scales=6\)$"):
        ms_ssim(x2, y2, scales=6)
    x3, y3 = rand_pair(1, 1, 64, 64)
    with pytest.raises(AdvlabError, match=r"^scales > 5 needs explicit weights$"):
        ms_ssim(x3, y3, scales=6)
    with pytest.raises(AdvlabError, match=r"^weights must have 2 entries \(one per scale\), got 3$"):
        ms_ssim(x, y, scales=2, weights=[1, 2, 3])
    with pytest.raises(AdvlabError, match=r"^weights must sum to a positive number, got \[1.0, -1.0\]$"):
        ms_ssim(x, y, scales=2, weights=[1.0, -1.0])
    with pytest.raises(AdvlabError, match=r"^weights must sum to a positive number, got \[0, 0\]$"):
        ms_ssim(x, y, scales=2, weights=[0, 0])


# ---------------------------------------------------------------------------- errors

@pytest.mark.parametrize("fn", [mse, ssim, ms_ssim])
def test_pair_errors_name_the_argument(fn):
    ok = torch.zeros(1, 1, 8, 8)
    with pytest.raises(AdvlabError, match=r"^x must be a torch.Tensor of shape \(N, C, H, W\), got list$"):
        fn([0.0], ok)
    with pytest.raises(AdvlabError, match=r"^y must be a torch.Tensor of shape \(N, C, H, W\), got ndarray$"):
        fn(ok, ok.numpy())
    with pytest.raises(AdvlabError, match=r"^x must have shape \(N, C, H, W\), got shape \(1, 8, 8\)$"):
        fn(ok[0], ok)
    with pytest.raises(AdvlabError, match=r"^y must have shape \(N, C, H, W\), got shape \(1, 1, 1, 8, 8\)$"):
        fn(ok, ok[None])
    with pytest.raises(AdvlabError, match=r"^x must be a floating-point tensor, got dtype torch.int64$"):
        fn(ok.long(), ok)
    with pytest.raises(AdvlabError, match=r"^y must be a floating-point tensor, got dtype torch.uint8$"):
        fn(ok, ok.to(torch.uint8))
    with pytest.raises(AdvlabError, match=r"^x and y must have the same shape, got \(1, 1, 8, 8\) and \(2, 1, 8, 8\)$"):
        fn(ok, torch.zeros(2, 1, 8, 8))
    for bad in (float("nan"), float("inf")):
        b = ok.clone()
        b[0, 0, 3, 3] = bad
        with pytest.raises(AdvlabError, match="^x contains NaN or infinite values$"):
            fn(b, ok)
        with pytest.raises(AdvlabError, match="^y contains NaN or infinite values$"):
            fn(ok, b)
    assert fn(ok[:0], ok[:0]).shape == (0,)


@pytest.mark.parametrize("fn", [ssim, ms_ssim])
def test_parameter_errors(fn):
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(AdvlabError, match="^window_size must be an integer >= 1, got 0$"):
        fn(x, x, window_size=0)
    with pytest.raises(AdvlabError, match=r"^sigma \(or None for a uniform window\) must be a finite number > 0, got 0$"):
        fn(x, x, sigma=0)
    with pytest.raises(AdvlabError, match="^data_range must be a finite number > 0, got -1$"):
        fn(x, x, data_range=-1)
    assert fn(x, x, sigma=None).shape == (1,)


@pytest.mark.parametrize("sigma", [1.5, None])
def test_window_1d_follows_the_input_device(sigma):
    # the meta device stands in for a GPU: the window must be made where the images are
    like = torch.zeros(1, dtype=D, device="meta")
    w = _window_1d(5, sigma, like)
    assert w.device.type == "meta" and w.dtype == D and w.shape == (5,)
