"""Image similarity as batched, differentiable tensor functions: per-sample MSE, SSIM (Wang et al.
2004) and multi-scale SSIM (Wang, Simoncelli and Bovik 2003).

All take two (N, C, H, W) batches of the same shape and return one value per sample (N,). SSIM
averages the SSIM map over the positions where the window fits inside the image (no padding, as
scikit-image does when it crops the border) and over channels. Windows shrink to fit small images
(8x8 digits, 28x28 MNIST), keeping the Gaussian's sigma.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._util import AdvlabError, check_batch, check_positive, check_positive_int

__all__ = ["mse", "ssim", "ms_ssim", "MS_SSIM_WEIGHTS"]

#: weights of the five scales of Wang et al. 2003 (finest first)
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check_pair(x: torch.Tensor, y: torch.Tensor, finite: bool = True) -> None:
    """Two floating (N, C, H, W) batches of the same shape; with ``finite``, no NaN or infinity
    (one reduction and one host sync for both)."""
    check_batch(x, "x")
    check_batch(y, "y")
    if x.shape != y.shape:
        raise AdvlabError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if finite and x.numel():
        ok = torch.stack([torch.isfinite(x.detach()).all(), torch.isfinite(y.detach()).all()]).tolist()
        for name, good in zip(("x", "y"), ok):
            if not good:
                raise AdvlabError(f"{name} contains NaN or infinite values")


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, shape (N,), of two floating (N, C, H, W) batches (pixel units:
    for images in [0, 1] the MSE is in [0, 1]). Raises ``AdvlabError`` on other shapes, a shape
    mismatch, or NaN / infinite values.

    ``x``, ``y``: the two batches."""
    _check_pair(x, y)
    return (x - y).pow(2).flatten(1).mean(dim=1)


def _window_1d(size: int, sigma: Optional[float], like: torch.Tensor) -> torch.Tensor:
    if sigma is None:
        w = torch.ones(size, dtype=like.dtype, device=like.device)
    else:
        r = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
        w = torch.exp(-(r * r) / (2.0 * sigma * sigma))
    return w / w.sum()


def _fit_window(window_size: int, h: int, w: int) -> int:
    """The window size used on an h x w image: ``window_size`` or the largest odd size that fits."""
    size = min(int(window_size), h, w)
    return size if size % 2 == 1 else size - 1


def _filter(t: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' filtering of every channel of ``t`` with the 1-d window ``w1``."""
    c = t.shape[1]
    k = w1.numel()
    t = F.conv2d(t, w1.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(t, w1.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def _ssim_terms(x, y, window_size, sigma, data_range, k1, k2) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean of the luminance term and of the contrast-structure term and SSIM map:
    returns ``(ssim, cs)``, each (N,)."""
    size = _fit_window(window_size, x.shape[-2], x.shape[-1])
    w1 = _window_1d(size, sigma, x)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    # one grouped filtering pass over the five statistics' inputs
    n, c = x.shape[:2]
    stats = _filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), w1)
    mx, my, mxx, myy, mxy = stats.split(c, dim=1)
    vx = mxx - mx * mx
    vy = myy - my * my
    cov = mxy - mx * my
    cs_map = (2 * cov + c2) / (vx + vy + c2)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return (lum * cs_map).flatten(1).mean(dim=1), cs_map.flatten(1).mean(dim=1)


def _check_params(window_size, sigma, data_range):
    check_positive_int(window_size, "window_size")
    if sigma is not None:
        check_positive(sigma, "sigma (or None for a uniform window)")
    check_positive(data_range, "data_range")


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: Optional[float] = 1.5,
         data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity per sample, shape (N,); 1 for identical images.

    Gaussian window ``window_size`` x ``window_size`` with standard deviation ``sigma`` (the
    11 / 1.5 of Wang et al.), or a uniform window with ``sigma=None`` (scikit-image's default is
    uniform 7). On images smaller than the window, the window shrinks to the largest odd size
    that fits (7 on 8x8 digits) and keeps its sigma. Local statistics use population variances
    (scikit-image's ``use_sample_covariance=False``). Differentiable in both arguments.

    ``x``, ``y``: two floating (N, C, H, W) batches; ``data_range``: the span of the pixel values
    (1 for [0, 1] images); ``k1``, ``k2``: the stabilising constants of Wang et al. Raises
    ``AdvlabError`` on other shapes, a shape mismatch or non-finite values."""
    _check_pair(x, y)
    _check_params(window_size, sigma, data_range)
    return _ssim_terms(x, y, window_size, sigma, data_range, k1, k2)[0]


def _num_scales(h: int, w: int, min_side: int = 7) -> int:
    """Scales of MS-SSIM on an h x w image: halve while the coarsest side stays >= ``min_side``,
    at most five (28x28 -> 3 scales: 28, 14, 7; 8x8 -> 1; 161x161 and up -> 5)."""
    side, n = min(h, w), 1
    while n < len(MS_SSIM_WEIGHTS) and side // 2 >= min_side:
        side //= 2
        n += 1
    return n


def ms_ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: Optional[float] = 1.5,
            data_range: float = 1.0, scales: Optional[int] = None, weights: Optional[Sequence[float]] = None,
            k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Multi-scale SSIM per sample (Wang, Simoncelli and Bovik 2003), shape (N,).

    ``MS-SSIM = l_M^{w_M} * prod_{j=1..M} cs_j^{w_j}``: contrast-structure ``cs_j`` at each scale,
    luminance only at the coarsest, images halved by 2x2 average pooling between scales. The
    number of scales defaults to as many as keep the coarsest side >= 7 pixels (at most the
    standard five); the weights are the first ``scales`` standard ones renormalised to sum to 1.
    Negative terms are clipped to a tiny positive value before the power, so the result stays
    real and its gradient finite. With one scale it equals :func:`ssim` (where that is positive).

    ``x``, ``y``: two floating (N, C, H, W) batches; ``window_size``, ``sigma``, ``data_range``, ``k1``,
    ``k2``: as in :func:`ssim`; ``scales``, ``weights``: the number of scales and their exponents
    (defaults above). Raises ``AdvlabError`` on bad shapes, values or scales.
    """
    _check_pair(x, y)
    _check_params(window_size, sigma, data_range)
    if scales is None:
        scales = _num_scales(x.shape[-2], x.shape[-1])
    if isinstance(scales, bool) or int(scales) != scales or scales < 1:
        raise AdvlabError(f"scales must be a positive integer, got {scales}")
    scales = int(scales)
    if min(x.shape[-2], x.shape[-1]) < 2 ** (scales - 1):
        raise AdvlabError(f"an image of {x.shape[-2]}x{x.shape[-1]} pixels cannot be halved {scales - 1} times "
                          f"(scales={scales})")
    if weights is None:
        if scales > len(MS_SSIM_WEIGHTS):
            raise AdvlabError(f"scales > {len(MS_SSIM_WEIGHTS)} needs explicit weights")
        weights = MS_SSIM_WEIGHTS[:scales]
    if len(weights) != scales:
        raise AdvlabError(f"weights must have {scales} entries (one per scale), got {len(weights)}")
    wsum = float(sum(weights))
    if not wsum > 0:
        raise AdvlabError(f"weights must sum to a positive number, got {list(weights)}")
    tiny = 1e-8
    out = None
    for j in range(scales):
        s, cs = _ssim_terms(x, y, window_size, sigma, data_range, k1, k2)
        term = (s if j == scales - 1 else cs).clamp_min(tiny).pow(weights[j] / wsum)
        out = term if out is None else out * term
        if j < scales - 1:
            x = F.avg_pool2d(x, 2)
            y = F.avg_pool2d(y, 2)
    return out
