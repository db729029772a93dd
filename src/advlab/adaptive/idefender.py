"""Attacks that know I-defender (:class:`advlab.defenses.idefender.IDefender`).

- :class:`IDefenderAdaptive`: the fully adaptive attacker (white-box on the classifier *and* the
  detector, with its parameters): misclassify and be accepted. Per target class t, it minimises a
  C&W-style margin ``relu(max_{k != t} z_k - z_t + kappa)`` plus ``weight`` times a hinge on
  the target class's log-likelihood, ``relu(TH_t + headroom - log p(H(x) | t))`` (``mode=
  "hinge"``), or plus the mean squared distance of the standardised hidden state to a mean of
  the target class's mixture (``mode="features"``, feature matching; the component is the one
  nearest the clean input). Each sample keeps the first iterate that the defense's own decision
  rule (:meth:`IDefender.decide`) accepts as a wrong class; several targets (the wrong classes
  ranked by clean logit) and random restarts are tried on the samples still unbroken, and
  ``stats`` counts the images each (target, start) run broke first. This is how Carlini &
  Wagner (2017) broke per-class density detectors.
- :class:`IDefenderGrayBox`: the gray-box attack of the paper's eq. 6 on a *source* model with
  its own I-defender: ascend ``CE(z, y) + lam * prod_{k != y} Reject(x, k) * max_{k != y} log
  p(H(x) | k)`` (the product of reject indicators carries no gradient; the max log-likelihood
  does). ``steps=1, alpha=eps`` is FGSM; more steps the iterative L-inf / L2 attacks.

Both run on the shared :class:`advlab.attacks.loop.AttackLoop`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._util import AdvlabError, check_nonneg, check_positive_int
from ..attacks.base import Attack
from ..attacks.geometry import check_norm
from ..attacks.logits import best_other
from ..attacks.loop import ActiveSet, AttackLoop, ball_projection, step_rule
from ..metrics.robustness import is_success

__all__ = ["IDefenderAdaptive", "IDefenderGrayBox"]

MODES = ("hinge", "features")


def _check_defense(defense: nn.Module) -> None:
    for attr in ("scores", "decide", "thresholds", "gmm", "num_classes"):
        if not hasattr(defense, attr):
            raise AdvlabError(f"defense must be an IDefender (missing .{attr}), got {type(defense).__name__}")


class IDefenderAdaptive(Attack):
    """Fully adaptive attack on I-defender (module docstring). ``norm`` "inf" or "2";
    ``alpha`` defaults to ``2.5 * eps / steps``; ``kappa``: logit margin; ``headroom``: nats
    above the threshold the hinge asks for (a point just above TH may fall below it when
    re-evaluated in another batch); ``weight``: of the likelihood (or feature) term;
    ``targets``: how many wrong classes to try (untargeted); ``restarts``: random starts per
    target. Success = the defense accepts a wrong class (judged inside the loop by its decision
    rule, and by :meth:`Attack.run`'s judge afterwards)."""

    supports_targeted = True

    def __init__(self, defense: nn.Module, eps: float = 0.3, norm: str = "inf", steps: int = 100,
                 alpha: Optional[float] = None, kappa: float = 1.0, headroom: float = 2.0, weight: float = 1.0,
                 mode: str = "hinge", targets: int = 3, restarts: int = 1, random_start: bool = True,
                 seed: Optional[int] = None):
        _check_defense(defense)
        super().__init__(defense, eps=eps, seed=seed)
        self.norm = check_norm(norm)
        self.steps = check_positive_int(steps, "steps")
        self.alpha = 2.5 * self.eps / self.steps if alpha is None else check_nonneg(alpha, "alpha")
        self.kappa = check_nonneg(kappa, "kappa")
        self.headroom = check_nonneg(headroom, "headroom")
        self.weight = check_nonneg(weight, "weight")
        if mode not in MODES:
            raise AdvlabError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.targets = check_positive_int(targets, "targets")
        self.restarts = check_positive_int(restarts, "restarts")
        self.random_start = bool(random_start)
        #: images first broken by each run, ``(target rank, start)`` -> count, summed over calls
        #: (what the extra targets and restarts bought); :meth:`reset_stats` clears it
        self.stats: dict = {}

    def reset_stats(self) -> None:
        """Forget the per-run statistics in ``stats`` (kept across calls otherwise)."""
        self.stats = {}

    def _perturb(self, x, y, target):
        defense = self.model
        with torch.no_grad():
            z0, u0, _ = defense.scores(x)
        if target is not None:
            plan = [target]
        else:
            ranked = z0.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)
            plan = [ranked[:, k] for k in range(min(self.targets, defense.num_classes - 1))]
        out = x.clone()
        ok = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        first = True
        for ti, t in enumerate(plan, 1):
            for ri in range(1, self.restarts + 1):
                todo = torch.nonzero(~ok).squeeze(1)
                if todo.numel() == 0:
                    return out
                cand, cand_ok = self._run(x[todo], y[todo], t[todo], u0[todo], target is not None,
                                          random=self.random_start)
                keep = cand_ok | first
                out[todo[keep]] = cand[keep]
                ok[todo[cand_ok]] = True
                self.stats[(ti, ri)] = self.stats.get((ti, ri), 0) + int(cand_ok.sum())
                first = False
        return out

    def _anchor(self, u0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per sample, the mean of class t's mixture component nearest (most likely) the clean
        embedded hidden state."""
        gmm = self.model.gmm
        comp = gmm.component_loglik(u0)                                    # (N, C, K)
        k = comp[torch.arange(u0.shape[0], device=u0.device), t].argmax(1)
        return gmm.means[t, k].to(u0.dtype)

    def _run(self, x, y, t, u0, targeted: bool, random: bool):
        defense = self.model
        start = self._random_start(x, self.norm, self.eps) if random else x.clone()
        anchor = self._anchor(u0, t) if self.mode == "features" else None
        s = ActiveSet(x.shape[0], x.device, outputs=("v", "ok"), v=start, x=x, y=y, t=t, anchor=anchor,
                      ok=torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
        th = defense.thresholds

        def objective(out, s, v):
            z, u, ll = out
            margin = torch.relu(best_other(z, s.t) - z.gather(1, s.t[:, None]).squeeze(1) + self.kappa)
            if self.mode == "hinge":
                extra = torch.relu(th[s.t].to(ll.dtype) + self.headroom - ll.gather(1, s.t[:, None]).squeeze(1))
            else:
                extra = (u - s.anchor).pow(2).mean(1)
            return margin + self.weight * extra

        def observe(out, obj, s, step):
            z, _, ll = out
            s.ok = is_success(defense.decide(z, ll), s.y, s.t if targeted else None)
            return s.ok

        loop = AttackLoop(forward=lambda s, v: defense.scores(v), objective=objective, observe=observe,
                          step=step_rule(self.norm, self.alpha), project=ball_projection(self.norm, self.eps),
                          final_observe=True)
        loop.run(s, self.steps)
        return s.outputs["v"], s.outputs["ok"]


class IDefenderGrayBox(Attack):
    """The gray-box attack of eq. 6 on a source model's I-defender (module docstring). ``lam`` is
    the paper's alpha (0 gives the plain attack on the source classifier); ``steps=1`` and
    ``alpha=eps`` (the defaults for one step) give FGSM; ``alpha`` defaults to ``eps / steps``
    (BIM / Metzen's iterative L2, as the paper's 10-iteration attacks)."""

    supports_targeted = False

    def __init__(self, defense: nn.Module, eps: float = 0.3, norm: str = "inf", steps: int = 10,
                 alpha: Optional[float] = None, lam: float = 0.0, seed: Optional[int] = None):
        _check_defense(defense)
        super().__init__(defense, eps=eps, seed=seed)
        self.norm = check_norm(norm)
        self.steps = check_positive_int(steps, "steps")
        self.alpha = self.eps / self.steps if alpha is None else check_nonneg(alpha, "alpha")
        self.lam = check_nonneg(lam, "lam")

    def _perturb(self, x, y, target):
        defense = self.model
        s = ActiveSet(x.shape[0], x.device, outputs=("v",), v=x.clone(), x=x, y=y)
        th = defense.thresholds

        def objective(out, s, v):
            z, _, ll = out
            gain = F.cross_entropy(z, s.y, reduction="none")
            if self.lam > 0:
                mask = torch.zeros_like(ll, dtype=torch.bool).scatter_(1, s.y[:, None], True)
                rejected = ((ll < th[None].to(ll.dtype)) | mask).all(1).detach()
                best = ll.masked_fill(mask, float("-inf")).amax(1)
                gain = gain + self.lam * rejected.to(ll.dtype) * best
            return -gain

        loop = AttackLoop(forward=lambda s, v: defense.scores(v), objective=objective,
                          step=step_rule(self.norm, self.alpha), project=ball_projection(self.norm, self.eps))
        loop.run(s, self.steps)
        return s.outputs["v"]
