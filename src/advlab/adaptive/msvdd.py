"""A full-knowledge attack on M-SVDD-D: the attacker knows the SVDD layer, the ReLU/clamp, the
verification class and the unique-verifier rule, and attacks the defended model itself.

This is the threat model the K-A3 paper only predicts ("if an adversary is provided access to
the SVDD layer source code ... success rates ... close to 100%"). advlab reports it beside the
paper's transfer setting.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._util import AdvlabError, check_nonneg, check_positive_int
from ..attacks.base import Attack
from ..attacks.geometry import check_norm
from ..attacks.logits import best_other, runner_up
from ..attacks.loop import ActiveSet, AttackLoop, ball_projection, step_rule
from ..metrics.robustness import is_success

__all__ = ["MSVDDFullKnowledge", "verifier_loss"]


def verifier_loss(r: torch.Tensor, target: torch.Tensor, v_a: float, kappa: float) -> torch.Tensor:
    """Per-sample loss (minimised) that makes ``target`` the unique verifier, in the style of the
    C&W margin: a hinge pushing its response r_t above ``v_a + kappa`` plus a hinge pushing the
    largest other response below ``v_a - kappa``. Zero exactly when both margins hold.

    (Summing hinges over all other classes instead drives inputs to where no SVDD answers: far
    from every centre, where the RBF gradients vanish and the target cannot be reached.)"""
    own = r.gather(1, target[:, None]).squeeze(1)
    other = best_other(r, target)
    return torch.relu(v_a + kappa - own) + torch.relu(other - (v_a - kappa))


class MSVDDFullKnowledge(Attack):
    """PGD on the defended model with a unique-verifier loss; success = a wrong class accepted.

    The forward pass is the defended model's; for the gradient the ReLU and the min(v_p, .)
    clamp after the SVDD layer are replaced by the identity (BPDA / straight-through, Athalye et
    al. 2018), so the loss is written on the pre-ReLU responses r of :meth:`MSVDDDefense.responses`
    (:func:`verifier_loss`). Untargeted, the target class is re-chosen at every step as the
    wrong class with the largest response; ``target=`` fixes it. With ``targets=k > 1``
    (untargeted only), the samples still not fooled are attacked again with a fixed target, the
    wrong classes ranked 1..k-1 by their clean response in turn (k - 1 more passes at most, each
    on the remaining samples only).

    Each sample keeps the first iterate that the defense assigns to a wrong class (not REJECT),
    judged by the defense's own :meth:`decide`; samples that succeeded leave the batch (one
    host/device synchronisation per step). Where no iterate succeeds, the last one is returned.
    ``norm`` is "inf" (signed steps) or "2" (normalised gradient steps); ``alpha`` defaults to
    ``2.5 * eps / steps``; ``random_start`` draws a uniform start in the ball, as PGD does
    (seeded by ``seed``). ``kappa`` is the margin (in units
    of r) by which the target must clear v_a and the others stay below it.
    """

    supports_targeted = True

    def __init__(self, defense: nn.Module, eps: float = 0.3, alpha: Optional[float] = None, steps: int = 100,
                 norm: str = "inf", kappa: float = 1e-3, random_start: bool = True, targets: int = 1,
                 seed: Optional[int] = None):
        for attr in ("responses", "decide", "v_a", "num_classes"):
            if not hasattr(defense, attr):
                raise AdvlabError(f"defense must be an MSVDDDefense (missing .{attr}), got {type(defense).__name__}")
        super().__init__(defense, eps=eps, seed=seed)
        self.norm = check_norm(norm)
        self.steps = check_positive_int(steps, "steps")
        self.alpha = 2.5 * self.eps / self.steps if alpha is None else check_nonneg(alpha, "alpha")
        self.kappa = check_nonneg(kappa, "kappa")
        self.random_start = bool(random_start)
        self.targets = check_positive_int(targets, "targets")

    def _perturb(self, x, y, target):
        out, ok = self._pgd(x, y, target)
        if target is not None or self.targets == 1:
            return out
        defense = self.model
        with torch.no_grad():
            r = defense.responses(x)
        ranked = r.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)
        for k in range(1, min(self.targets, defense.num_classes - 1)):
            todo = torch.nonzero(~ok).squeeze(1)
            if todo.numel() == 0:
                break
            cand, cand_ok = self._pgd(x[todo], y[todo], ranked[todo, k])
            out[todo[cand_ok]] = cand[cand_ok]
            ok[todo[cand_ok]] = True
        return out

    def _pgd(self, x, y, target):
        """One PGD run on the shared attack loop; returns (adversarials, success mask). Each
        sample leaves at the first iterate the defense assigns to a wrong class (not REJECT)."""
        defense = self.model
        start = self._random_start(x, self.norm, self.eps) if self.random_start else x.clone()
        s = ActiveSet(x.shape[0], x.device, outputs=("v", "ok"), v=start, x=x, y=y, target=target,
                      ok=torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))

        def objective(r, s, v):
            # untargeted: the wrong class with the largest response, re-chosen at every step
            t = s.target if s.target is not None else runner_up(r, s.y)
            return verifier_loss(r, t, defense.v_a, self.kappa)

        def observe(r, loss, s, t):
            s.ok = is_success(defense.decide(r), s.y, s.target)
            return s.ok

        loop = AttackLoop(forward=lambda s, v: defense.responses(v), objective=objective, observe=observe,
                          step=step_rule(self.norm, self.alpha), project=ball_projection(self.norm, self.eps),
                          final_observe=True)
        loop.run(s, self.steps)
        return s.outputs["v"], s.outputs["ok"]
