"""Attack a defense through its own decision: scores whose argmax is what ``predict`` decides,
for a defense that can reject (``advlab.REJECT``) without an "adversarial" output column, and a
differentiable stand-in for element-wise gradient killers that change the shape of their input.

- :class:`AcceptedScores` turns any defense whose ``predict`` may reject into a model with a
  last "adversarial" column (``reject_column = True``), so that every attack with a ``scores=``
  parameter aims at "be accepted as a wrong class" through
  :func:`advlab.attacks.logits.merge_reject`. The column's *value* is the defense's decision
  (above the top logit where ``predict`` rejects, below the lowest where it accepts); its
  *gradient* is that of the defense's ``detect`` score when it has one (a straight-through
  estimator: the attacker is pushed down the detector's score while the decision is read
  exactly), and zero otherwise (then the confidence-maximising targeted losses and the
  score-based stages do the work). Tramèr, Carlini, Brendel & Madry 2020, "On adaptive attacks
  to adversarial example defenses", section 4 (attack the full defense, detector included).
- :func:`lookup_approx` tabulates a layer that acts on each input value alone (a thermometer
  encoding, a bit-depth reduction, a binarisation; it may change the number of channels) and
  returns its Gaussian-smoothed table as a differentiable function: the backward pass of
  :class:`~advlab.adaptive.bpda.BPDA` for layers the identity cannot stand for (Athalye, Carlini
  & Wagner 2018, section 4.1, the smooth approximation of thermometer encoding).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from .. import REJECT
from .._util import AdvlabError, model_device

__all__ = ["AcceptedScores", "can_reject", "lookup_approx"]


def _delegated(model: nn.Module, method: str) -> bool:
    fn = getattr(model, method, None)
    if not callable(fn):
        return False
    from ..defenses.base import Defense

    # a Defense's inherited predict/detect are the argmax / "no detector": not a decision of its own
    base = getattr(Defense, method, None)
    return getattr(type(model), method, None) is not base


def has_detector(model: nn.Module) -> bool:
    """Whether ``model`` has a ``detect`` score of its own (a wrapper's ``has_detector`` counts)."""
    flag = getattr(model, "has_detector", None)
    if isinstance(flag, bool):
        return flag
    return _delegated(model, "detect")


def can_reject(model: nn.Module, x: torch.Tensor, clean_pred: Optional[torch.Tensor] = None) -> bool:
    """Whether ``model``'s decision can be ``advlab.REJECT`` without an adversarial output column:
    it has a ``detect`` score, or its ``predict`` rejected one of the images ``x`` (``clean_pred``:
    its predictions there, when the caller has them), or its own ``predict`` rejects one of a few
    probe images (uniform noise, blank, mid-grey) where a detector tuned to accept every clean
    image still shows itself."""
    if getattr(model, "reject_column", False) or not callable(getattr(model, "predict", None)):
        return False
    if has_detector(model):
        return True
    if clean_pred is None:
        with torch.no_grad():
            clean_pred = model.predict(x.to(model_device(model)))
    if bool((clean_pred == REJECT).any()):
        return True
    if not _delegated(model, "predict"):
        return False
    # a decision of its own that accepted every clean image: probe it where a rejector would reject
    # (uniform noise, a blank and a mid-grey image; a confidence threshold rejects these)
    gen = torch.Generator().manual_seed(0)
    shape = (min(16, x.shape[0]),) + tuple(x.shape[1:])
    probes = torch.cat([torch.rand(shape, generator=gen), torch.zeros((1,) + shape[1:]),
                        torch.full((1,) + shape[1:], 0.5)]).to(device=model_device(model), dtype=x.dtype)
    with torch.no_grad():
        return bool((model.predict(probes) == REJECT).any())


class AcceptedScores(nn.Module):
    """``defense``'s scores with a last "adversarial" column that is its own decision (see the
    module docstring). ``forward(x)`` returns (N, C + 1); :meth:`predict` and :meth:`detect`
    delegate to the defense, ``randomized`` mirrors it.

    ``margin``: how far above the top logit (rejected) or below the lowest (accepted) the column
    sits. ``scale``: the factor on the detector's gradient (None: the ratio of the spread of the
    top logit to that of ``detect`` on the first batch seen, so that neither term drowns the
    other). The column costs one ``predict`` per forward (a forward without gradient) and one
    ``detect`` when the defense has a detector."""

    reject_column = True

    def __init__(self, defense: nn.Module, margin: float = 1.0, scale: Optional[float] = None):
        super().__init__()
        if not callable(getattr(defense, "predict", None)):
            raise AdvlabError(f"{type(defense).__name__} has no predict: nothing can be rejected")
        if getattr(defense, "reject_column", False):
            raise AdvlabError(f"{type(defense).__name__} already has an adversarial column (reject_column)")
        self.model = defense
        self.margin = float(margin)
        self.scale = scale
        self.uses_detect = has_detector(defense)
        self.training = defense.training

    @property
    def randomized(self) -> bool:
        """True when the wrapped defense draws random numbers at test time (the evaluation then uses EoT)."""
        return bool(getattr(self.model, "randomized", False))

    @property
    def has_detector(self) -> bool:
        """True when the wrapped defense's detector score shapes the "adversarial" column's gradient."""
        return self.uses_detect

    def _column(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        zd = z.detach()
        with torch.no_grad():
            rejected = self.model.predict(x.detach()).to(z.device) == REJECT
            hard = torch.where(rejected, zd.amax(1) + self.margin, zd.amin(1) - self.margin)
        if not (self.uses_detect and torch.is_grad_enabled() and x.requires_grad):
            return hard
        d = self.model.detect(x)
        if d.dim() != 1 or d.shape[0] != x.shape[0]:
            raise AdvlabError(f"detect must return one score per image, shape ({x.shape[0]},), got {tuple(d.shape)}")
        if self.scale is None:
            spread = d.detach().double().std().item() if d.shape[0] > 1 else 0.0
            top = zd.amax(1).double().std().item() if z.shape[0] > 1 else 0.0
            self.scale = (top / spread) if spread > 0 and top > 0 else 1.0
        return hard + self.scale * (d - d.detach()).to(z.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        if not isinstance(z, torch.Tensor) or z.dim() != 2:
            raise AdvlabError("the defense must return scores of shape (N, C)")
        return torch.cat([z, self._column(x, z)[:, None]], dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped defense's own decision (class indices or ``advlab.REJECT``): the judge of success."""
        return self.model.predict(x)

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped defense's per-sample detection score (larger: more likely adversarial)."""
        return self.model.detect(x)


def lookup_approx(layer: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, *, points: int = 257,
                  width: Optional[float] = None, tol: float = 0.99) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """A smooth differentiable stand-in for ``layer`` when it acts on each input value alone, else None.

    ``layer`` is fed constant inputs of ``example``'s shape at ``points`` levels spanning the
    range of ``example`` (the layer's real input, e.g. recorded by a hook); its output at one
    position is tabulated per output channel, output channel ``k`` reading input channel
    ``k * C_in // C_out``. When the table predicts the layer's output on ``example`` itself for
    at least ``tol`` of its elements, the layer is element-wise and the returned function is the
    table smoothed by a Gaussian kernel of ``width`` (default: 1.5 grid steps of the coarsest
    jump, at least 1/64 of the range), computed once at the table's levels and interpolated linearly
    between them at each input value (a few element-wise operations per output element); else None."""
    x = example.detach()
    if x.dim() < 2 or x.shape[0] == 0:
        return None
    lo, hi = float(x.min()), float(x.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return None
    levels = torch.linspace(lo, hi, points, dtype=x.dtype, device=x.device)
    const = levels.view(-1, *([1] * (x.dim() - 1))).expand(points, *x.shape[1:]).contiguous()
    with torch.no_grad():
        out = layer(const)
        real = layer(x)
    if not isinstance(out, torch.Tensor) or out.shape[0] != points or out.dim() != x.dim() \
            or out.shape[2:] != x.shape[2:] or out.shape[1] % x.shape[1]:
        return None
    c_in, c_out = x.shape[1], out.shape[1]
    idx = (0,) * (x.dim() - 2)
    table = out[(slice(None), slice(None)) + idx].to(x.dtype)  # (points, c_out)
    src = torch.arange(c_out, device=x.device) * c_in // c_out
    # check: nearest table entry at every element of the real input
    pos = ((x - lo) / (hi - lo) * (points - 1)).round().long().clamp(0, points - 1)  # (N, c_in, ...)
    pos_out = pos[:, src]  # (N, c_out, ...)
    pred = table.t().reshape(1, c_out, points, *([1] * (x.dim() - 2)))
    pred = pred.expand(x.shape[0], c_out, points, *x.shape[2:]).gather(2, pos_out.unsqueeze(2)).squeeze(2)
    if real.shape != pred.shape or float((real.to(x.dtype) - pred).abs().le(1e-5).double().mean()) < tol:
        return None
    if width is None:
        jumps = (table[1:] - table[:-1]).abs().amax(1) > 1e-6
        steps = int(jumps.sum())
        width = max((hi - lo) / max(steps, 1) * 0.5, (hi - lo) / 64)
    w = float(width)
    # the table smoothed once at the grid's own levels; between two levels it is interpolated
    # linearly, so one call costs a few element-wise operations per output element (evaluating the
    # kernel at every level per element would cost `points` times the layer's output)
    with torch.no_grad():
        k = torch.exp(-0.5 * ((levels[:, None] - levels[None, :]) / w) ** 2)  # (points, points)
        smooth = (k @ table) / k.sum(1, keepdim=True)  # (points, c_out)
    flat = smooth.t().contiguous().flatten()  # channel-major: channel c's level j at c * points + j
    shape = (1, c_out) + (1,) * (x.dim() - 2)
    base_idx = (torch.arange(c_out, device=x.device) * points).view(shape)
    scale = (points - 1) / (hi - lo)

    def approx(v: torch.Tensor) -> torch.Tensor:
        pos = ((v[:, src] - lo) * scale).clamp(0, points - 1)  # (N, c_out, ...), the grid position
        i0 = pos.detach().floor().clamp(max=points - 2).long()
        frac = pos - i0.to(pos.dtype)
        f = flat.to(device=v.device, dtype=v.dtype)
        b = base_idx.to(v.device) + i0
        return torch.take(f, b) * (1 - frac) + torch.take(f, b + 1) * frac

    return approx
