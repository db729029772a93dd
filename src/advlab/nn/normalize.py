from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._util import AdvlabError


def _channel_values(v, name: str) -> torch.Tensor:
    """Per-channel values as a (1, C, 1, 1) float32 tensor; non-numbers, NaN and infinities are errors."""
    try:
        t = torch.as_tensor(v, dtype=torch.float32).reshape(1, -1, 1, 1)
    except (TypeError, ValueError, RuntimeError):
        raise AdvlabError(f"{name} must be a number or one number per channel, got {v!r}") from None
    if t.numel() == 0 or not bool(torch.isfinite(t).all()):
        raise AdvlabError(f"{name} must hold finite numbers (one per channel, or one for all), got {v!r}")
    return t


class Normalize(nn.Module):
    """(x - mean) / std per channel, as the first layer of a model, so that attacks work in
    pixel space [0, 1] and every epsilon is in pixel units."""

    def __init__(self, mean: Sequence[float] | float = 0.5, std: Sequence[float] | float = 0.5):
        super().__init__()
        mean_t = _channel_values(mean, "mean")
        std_t = _channel_values(std, "std")
        if not bool((std_t > 0).all()):
            raise AdvlabError(f"std must be > 0 for every channel, got {std}")
        if mean_t.numel() != std_t.numel() and 1 not in (mean_t.numel(), std_t.numel()):
            raise AdvlabError(f"mean and std must have one value per channel (or one for all), got {mean_t.numel()} "
                              f"and {std_t.numel()} values")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
