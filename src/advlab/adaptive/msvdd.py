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

from .. import REJECT
from .._util import AdvlabError, check_nonneg, check_positive_int
from ..attacks.base import Attack, check_norm, linf_box

__all__ = ["MSVDDFullKnowledge", "verifier_loss"]


def verifier_loss(r: torch.Tensor, target: torch.Tensor, v_a: float, kappa: float) -> torch.Tensor:
    """Per-sample loss (minimised) that makes ``target`` the unique verifier, in the style of the
    C&W margin: a hinge pushing its response r_t above ``v_a + kappa`` plus a hinge pushing the
    largest other response below ``v_a - kappa``. Zero exactly when both margins hold.

    (Summing hinges over all other classes instead drives inputs to where no SVDD answers: far
    from every centre, where the RBF gradients vanish and the target cannot be reached.)"""
    own = r.gather(1, target[:, None]).squeeze(1)
    mask = torch.zeros_like(r, dtype=torch.bool).scatter_(1, target[:, None], True)
    other = r.masked_fill(mask, float("-inf")).amax(1)
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
    ``2.5 * eps / steps``; ``random_start`` draws a uniform start in the L-inf ball or a Gaussian
    direction of radius ``eps / 2`` for L2 (seeded by ``seed``). ``kappa`` is the margin (in units
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

    def is_success(self, pred, y, target):
        ok = pred == target if target is not None else pred != y
        return ok & (pred != REJECT)

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if not self.random_start or self.eps == 0:
            return x.clone()
        if self.norm == "inf":
            lo, hi = linf_box(x, self.eps)
            return (x + (2 * self._rand(x.shape, x.device).to(x.dtype) - 1) * self.eps).clamp_(lo, hi)
        d = self._randn(x.shape, x.device).to(x.dtype)
        d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (x + 0.5 * self.eps * d).clamp_(0.0, 1.0)

    def _perturb(self, x, y, target):
        out, ok = self._pgd(x, y, target)
        if target is not None or self.targets == 1:
            return out
        defense = self.model
        with torch.no_grad():
            r = defense.responses(x)
        ranked = r.masked_fill(torch.nn.functional.one_hot(y, defense.num_classes).bool(),
                               float("-inf")).argsort(1, descending=True)
        for k in range(1, min(self.targets, defense.num_classes - 1)):
            todo = torch.nonzero(~ok).squeeze(1)
            if todo.numel() == 0:
                break
            cand, cand_ok = self._pgd(x[todo], y[todo], ranked[todo, k])
            out[todo[cand_ok]] = cand[cand_ok]
            ok[todo[cand_ok]] = True
        return out

    def _pgd(self, x, y, target):
        """One PGD run; returns (adversarials, success mask)."""
        defense = self.model
        c = defense.num_classes
        lo, hi = linf_box(x, self.eps) if self.norm == "inf" else (None, None)
        x_adv = self._start(x)
        out = x_adv.clone()
        ok = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        idx = torch.arange(x.shape[0], device=x.device)
        for step in range(self.steps + 1):
            with torch.enable_grad():
                x_adv.requires_grad_(True)
                r = defense.responses(x_adv)
                with torch.no_grad():
                    pred = defense.decide(r)
                    done = (pred == target) if target is not None else (pred != y)
                    done &= pred != REJECT
                    if target is None:
                        t = r.masked_fill(torch.nn.functional.one_hot(y, c).bool(), float("-inf")).argmax(1)
                    else:
                        t = target
                loss = verifier_loss(r, t, defense.v_a, self.kappa).sum()
                (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach()
            if bool(done.any()):
                out[idx[done]] = x_adv[done]
                ok[idx[done]] = True
                keep = ~done
                if not bool(keep.any()):
                    return out, ok
                idx, x, y, x_adv, grad = idx[keep], x[keep], y[keep], x_adv[keep], grad[keep]
                target = None if target is None else target[keep]
                lo = None if lo is None else lo[keep]
                hi = None if hi is None else hi[keep]
            if step == self.steps:
                break
            if self.norm == "inf":
                x_adv = (x_adv - self.alpha * grad.sign()).clamp_(lo, hi)
            else:
                g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                delta = x_adv - self.alpha * g - x
                n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
                delta = delta * torch.clamp(self.eps / n, max=1.0).view(-1, 1, 1, 1)
                x_adv = (x + delta).clamp_(0.0, 1.0)
        out[idx] = x_adv
        return out, ok
