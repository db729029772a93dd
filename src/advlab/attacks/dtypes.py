"""Images in another dtype than the model's: the model's dtype, and an adversarial found in it
brought back to the caller's dtype with the box and ball guarantee kept."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .geometry import project


def model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's first floating-point parameter (or buffer); None without one."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    for t in model.buffers():
        if t.is_floating_point():
            return t.dtype
    return None


def to_input_dtype(x_adv: torch.Tensor, x_work: torch.Tensor, x0: torch.Tensor, eps: Optional[float],
                   norm: Optional[str]) -> torch.Tensor:
    """An adversarial found on ``x_work`` (``x0`` cast to the model's dtype) brought back to
    ``x0``'s dtype and device: pixels the attack left unchanged get ``x0``'s exact value, and the
    result is projected onto the box and the ball around ``x0`` in ``x0``'s own dtype, so the
    guarantee holds for the images the caller gave."""
    xa = x_adv.detach().to(device=x0.device, dtype=x0.dtype)
    xs = x_work.detach().to(device=x0.device, dtype=x0.dtype)
    x0 = x0.detach()
    return project(torch.where(xa == xs, x0, xa), x0, eps, norm)
