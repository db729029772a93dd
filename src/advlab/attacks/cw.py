"""Carlini & Wagner (2017) L2 attack: Adam in tanh space, per-sample binary search on ``c``,
per-sample early stopping, the smallest successful perturbation kept per sample."""

from __future__ import annotations

from typing import Optional

import torch

from .._util import AdvlabError, check_nonneg, check_positive_int
from .base import Attack


def check_positive(value, name: str) -> float:
    if isinstance(value, bool) or value is None or not (float(value) > 0.0) or float(value) == float("inf"):
        raise AdvlabError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def cw_margin(logits: torch.Tensor, labels: torch.Tensor, targeted: bool, confidence: float = 0.0) -> torch.Tensor:
    """The C&W objective ``f`` per sample, clipped below at ``-confidence``.

    Targeted (``labels`` = targets): ``max(max_{i != t} Z_i - Z_t, -kappa)``; untargeted (``labels``
    = true classes): ``max(Z_y - max_{i != y} Z_i, -kappa)``. The labelled logit is excluded from
    the max with ``-inf`` (multiplying by a one-hot mask would be wrong for negative logits)."""
    onehot = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], True)
    other = logits.masked_fill(onehot, float("-inf")).amax(1)
    real = logits.gather(1, labels[:, None]).squeeze(1)
    diff = other - real if targeted else real - other
    return diff.clamp_min(-confidence)


def cw_success(logits: torch.Tensor, labels: torch.Tensor, targeted: bool, confidence: float = 0.0) -> torch.Tensor:
    """Success with the confidence margin: the target's logit beats every other by more than
    ``confidence`` (targeted), or some other logit beats the true one by more (untargeted).
    For ``confidence=0`` this is the argmax rule the model's prediction uses."""
    z = logits.clone()
    if targeted:
        z.scatter_add_(1, labels[:, None], z.new_full((z.shape[0], 1), -confidence))
        return z.argmax(1) == labels
    z.scatter_add_(1, labels[:, None], z.new_full((z.shape[0], 1), confidence))
    return z.argmax(1) != labels


def keep_if_adversarial(model, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                        target: Optional[torch.Tensor]) -> torch.Tensor:
    """One last forward on the returned batch: samples that are not adversarial there (a point on
    the boundary can flip with float rounding) get the clean image back, so a failure is always
    returned unchanged."""
    with torch.no_grad():
        pred = model(x_adv.clamp(0.0, 1.0)).argmax(1)
    ok = pred == target if target is not None else pred != y
    return torch.where(ok.view(-1, *([1] * (x.dim() - 1))), x_adv, x)


class CarliniWagnerL2(Attack):
    """C&W L2: minimise ``||x' - x||^2 + c * f(x')`` over ``x' = (tanh(w) + 1) / 2`` with Adam.

    Per sample: ``c`` starts at ``c``, grows x10 until the first success, then is bisected
    (``binary_search_steps`` rounds of ``steps`` Adam steps, restarted from ``x`` each round);
    the smallest successful L2 perturbation over all rounds is returned, the clean image where
    no round succeeded. With ``abort_early`` a sample whose loss has not improved on its best by
    0.01% for ``steps // 10`` steps stops for the round and leaves the forward pass. ``confidence``
    is the margin kappa. Targeted with ``target=``.

    ``lr`` is Adam's step in tanh space. The paper's 0.01 goes with thousands of steps: in 100
    steps it cannot move the saturated (exactly 0 or 1) pixels of MNIST far enough, and on
    LeNet-5/MNIST it breaks only about 40% of the images, so the default here is 0.1 (100%).
    """

    norm = None
    supports_targeted = True
    minimum_norm = True

    def __init__(self, model, c: float = 1.0, confidence: float = 0.0, steps: int = 100, lr: float = 0.1,
                 binary_search_steps: int = 9, abort_early: bool = True):
        super().__init__(model)
        self.c = check_positive(c, "c")
        self.confidence = check_nonneg(confidence, "confidence")
        self.steps = check_positive_int(steps, "steps")
        self.lr = check_positive(lr, "lr")
        self.binary_search_steps = check_positive_int(binary_search_steps, "binary_search_steps")
        self.abort_early = bool(abort_early)

    def _perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        targeted = target is not None
        labels = target if targeted else y
        # (2x - 1) shrunk by 1e-6 so that pixels at exactly 0 or 1 map to finite w
        w0 = torch.atanh((2 * x - 1) * (1 - 1e-6))
        c = torch.full((n,), self.c, device=x.device, dtype=x.dtype)
        lo = torch.zeros_like(c)
        hi = torch.full_like(c, float("inf"))
        best_l2 = torch.full_like(c, float("inf"))
        best_adv = x.clone()
        for _ in range(self.binary_search_steps):
            succ = self._round(x, w0, labels, c, targeted, best_l2, best_adv)
            hi = torch.where(succ, torch.minimum(hi, c), hi)
            lo = torch.where(succ, lo, torch.maximum(lo, c))
            c = torch.where(torch.isinf(hi), c * 10, (lo + hi) / 2)
        return keep_if_adversarial(self.model, best_adv, x, y, target)

    def _round(self, x, w0, labels, c, targeted, best_l2, best_adv) -> torch.Tensor:
        """One optimisation at fixed per-sample ``c``; updates ``best_l2``/``best_adv`` in place and
        returns which samples succeeded in this round."""
        b1, b2, eps = 0.9, 0.999, 1e-8
        n = x.shape[0]
        view = (-1,) + (1,) * (x.dim() - 1)
        succ = torch.zeros(n, dtype=torch.bool, device=x.device)
        # active-set state (compacted when samples stop early)
        idx = torch.arange(n, device=x.device)
        xa, lab, ca = x, labels, c
        w = w0.clone()
        m = torch.zeros_like(w)
        v = torch.zeros_like(w)
        l2_a, adv_a, succ_a = best_l2.clone(), best_adv.clone(), succ.clone()
        best_loss = torch.full_like(c, float("inf"))
        stale = torch.zeros(n, dtype=torch.long, device=x.device)   # steps since the last improvement
        check_every = max(1, self.steps // 10)

        def write_back():
            best_l2[idx] = l2_a
            best_adv[idx] = adv_a
            succ[idx] = succ_a

        for t in range(1, self.steps + 1):
            w.requires_grad_(True)
            x_adv = (torch.tanh(w) + 1) / 2
            logits = self.model(x_adv)
            l2 = (x_adv - xa).flatten(1).pow(2).sum(1)
            loss = l2 + ca * cw_margin(logits, lab, targeted, self.confidence)
            (g,) = torch.autograd.grad(loss.sum(), w)
            with torch.no_grad():
                x_adv = x_adv.detach()
                loss = loss.detach()
                l2 = l2.detach()
                ok = cw_success(logits.detach(), lab, targeted, self.confidence)
                better = ok & (l2 < l2_a)
                l2_a = torch.where(better, l2, l2_a)
                adv_a = torch.where(better.view(view), x_adv, adv_a)
                succ_a = succ_a | ok
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                step = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(eps))
                w = w.detach().sub_(step, alpha=self.lr)
                improved = torch.isinf(best_loss) | (loss < best_loss - 1e-4 * best_loss.abs())
                best_loss = torch.minimum(best_loss, loss)
                stale = torch.where(improved, torch.zeros_like(stale), stale + 1)
                if self.abort_early and t % check_every == 0 and t < self.steps:
                    keep = stale < check_every
                    if not bool(keep.all()):
                        write_back()
                        k = keep.nonzero().squeeze(1)
                        if k.numel() == 0:
                            return succ
                        idx, xa, lab, ca, best_loss, stale = idx[k], xa[k], lab[k], ca[k], best_loss[k], stale[k]
                        w, m, v = w[k], m[k], v[k]
                        l2_a, adv_a, succ_a = l2_a[k], adv_a[k], succ_a[k]
        write_back()
        return succ
