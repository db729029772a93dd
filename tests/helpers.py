"""Small models and data shared by the attack tests."""

import torch
from torch import nn


def tiny_model(channels: int = 1, classes: int = 5, seed: int = 0, dtype=torch.float32) -> nn.Module:
    """A small random CNN that takes any image size; BatchNorm and Dropout make train/eval differ."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, classes))
    return m.to(dtype).eval()


def images(n, c=1, h=8, w=8, seed=0, dtype=torch.float32):
    """Random images with some pixels exactly 0 and 1, where box constraints bite."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=g, dtype=dtype) * 0.6 + 0.5).clamp(0, 1)


def labels(n, classes=5, seed=1):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def catalogue_params(cases: dict) -> list:
    """One ``pytest.param`` per named case of a bad-input catalogue (``{id: case}``, each case with
    an ``xfail`` reason or None), sorted by id; a case with a reason is a strict xfail."""
    import pytest

    return [pytest.param(cid, id=cid, marks=[pytest.mark.xfail(strict=True, reason=cases[cid].xfail)]
                         if cases[cid].xfail else []) for cid in sorted(cases)]
