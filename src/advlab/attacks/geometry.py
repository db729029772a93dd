"""Threat-model geometry: exact projection onto the box [0, 1] and the L-inf / L2 ball, the
L-inf ball's per-pixel bounds, and the norm names every attack accepts."""

from __future__ import annotations

import math

import torch

from .._util import AdvlabError


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float | None, norm: str | None) -> torch.Tensor:
    """Project ``x_adv`` onto the ``norm`` ball of radius ``eps`` around ``x`` and the box [0, 1].

    For L-inf the result is exact: clamping to [x - eps, x + eps] then to [0, 1]. For L2 the
    difference is rescaled to norm <= eps, then clamped to [0, 1]; clamping never increases an
    L2 norm, so the ball still holds."""
    if eps is None or norm is None:
        return x_adv.clamp(0.0, 1.0)
    if norm == "inf":
        lo, hi = linf_box(x, eps)
        return torch.max(torch.min(x_adv, hi), lo)
    if norm == "2":
        d = x_adv - x
        n = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        # inside eps by more than float rounding can add back: storing x + d rounds each pixel by
        # at most half an ulp of 1 (pixels are in [0, 1]), so the realised norm exceeds the exact
        # one by at most sqrt(D) * eps_machine / 2; the margin is twice that
        margin = math.sqrt(x[0].numel()) * torch.finfo(x.dtype).eps
        factor = torch.clamp(max(eps * (1 - 1e-6) - margin, 0.0) / n, max=1.0)
        return (x + d * factor).clamp_(0.0, 1.0)
    raise AdvlabError(f"norm must be 'inf' or '2', got {norm!r}")


def linf_box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel bounds ``(lo, hi)`` of the L-inf ball of radius ``eps`` around ``x`` intersected
    with [0, 1], such that every value v in [lo, hi] has ``|v - x| <= eps`` exactly.

    ``x - eps`` rounded to float32 lands outside the ball for about half of the pixels at
    eps = 0.1. The bounds are computed in float64 and rounded towards ``x``, so the guarantee
    holds for the exact real difference, hence also in float32 arithmetic (in the tensor's own
    dtype on MPS, which lacks float64, and for float64 input)."""
    if x.dtype == torch.float64 or x.device.type == "mps":
        lo, hi = x - eps, x + eps
        for _ in range(3):
            lo = torch.where(x - lo > eps, torch.nextafter(lo, x), lo)
            hi = torch.where(hi - x > eps, torch.nextafter(hi, x), hi)
        wide = x
    else:
        wide = x.double()
        lo, hi = (wide - eps).to(x.dtype), (wide + eps).to(x.dtype)
        # round-to-nearest may have gone outward: one step towards x rounds inward
        lo = torch.where(wide - lo.double() > eps, torch.nextafter(lo, x), lo)
        hi = torch.where(hi.double() - wide > eps, torch.nextafter(hi, x), hi)
    # never reached in practice; keeps the guarantee unconditional without a host sync
    lo = torch.where(wide - lo.to(wide.dtype) > eps, x, lo)
    hi = torch.where(hi.to(wide.dtype) - wide > eps, x, hi)
    return lo.clamp_(min=0.0), hi.clamp_(max=1.0)


def check_norm(norm) -> str:
    norm = str(norm).lower().replace("l", "")
    if norm in ("inf", "linf"):
        return "inf"
    if norm == "2":
        return "2"
    raise AdvlabError(f"norm must be 'inf' or '2', got {norm!r}")
