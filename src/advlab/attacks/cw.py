"""Carlini & Wagner (2017) L2 attack: Adam in tanh space, per-sample binary search on ``c``,
per-sample early stopping, the smallest successful perturbation kept per sample."""

from __future__ import annotations

from typing import Optional

import torch

from .._util import check_nonneg, check_positive, check_positive_int
from .base import Attack
from .logits import best_other, keep_if_adversarial
from .loop import ActiveSet, AdamStep, AttackLoop


def cw_margin(logits: torch.Tensor, labels: torch.Tensor, targeted: bool, confidence: float = 0.0) -> torch.Tensor:
    """The C&W objective ``f`` per sample, clipped below at ``-confidence``.

    Targeted (``labels`` = targets): ``max(max_{i != t} Z_i - Z_t, -kappa)``; untargeted (``labels``
    = true classes): ``max(Z_y - max_{i != y} Z_i, -kappa)``. The labelled logit is excluded from
    the max with ``-inf`` (multiplying by a one-hot mask would be wrong for negative logits)."""
    other = best_other(logits, labels)
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


class CarliniWagnerL2(Attack):
    """C&W L2: minimise ``||x' - x||^2 + c * f(x')`` over ``x' = (tanh(w) + 1) / 2`` with Adam.

    Per sample: ``c`` starts at ``c``, grows x10 until the first success, then is bisected
    (``binary_search_steps`` rounds of ``steps`` Adam steps, restarted from ``x`` each round);
    the smallest successful L2 perturbation over all rounds is returned, the clean image where
    no round succeeded. With ``abort_early`` the samples are checked every ``ceil(steps / 10)``
    steps (the reference implementation's abort-early window; these checks are the round's only
    host synchronisations): a sample whose lowest loss *and* smallest successful distance of the
    round both failed to improve by 0.01% over the last window stops for the round and leaves the
    forward pass. (The loss alone stalls for tens of steps after the first success while the
    distance still shrinks, more so at small ``lr``: a loss-only rule cut those runs short.)
    ``confidence`` is the margin kappa. Targeted with ``target=``.

    ``lr`` is Adam's step in tanh space. The paper's 0.01 goes with thousands of steps: in 100
    steps it cannot move the saturated (exactly 0 or 1) pixels of MNIST far enough, and on
    LeNet-5/MNIST it breaks only about 40% of the images, so the default here is 0.1 (100%).
    """

    norm = None
    supports_targeted = True

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
        """One optimisation at fixed per-sample ``c`` on the shared attack loop (Adam in tanh
        space); updates ``best_l2``/``best_adv`` in place and returns which samples succeeded in
        this round."""
        n = x.shape[0]
        view = (-1,) + (1,) * (x.dim() - 1)
        window = -(-self.steps // 10)
        inf = torch.full_like(c, float("inf"))
        s = ActiveSet(n, x.device, outputs=("best_l2", "best_adv", "succ"), v=w0.clone(), x=x, lab=labels, c=c,
                      best_l2=best_l2.clone(), best_adv=best_adv.clone(),
                      succ=torch.zeros(n, dtype=torch.bool, device=x.device),
                      best_loss=inf, mark_loss=inf,       # the round's lowest loss, and its value at the last check
                      round_l2=inf, mark_l2=inf)          # the round's smallest successful distance, the same

        def forward(s, w):
            x_adv = (torch.tanh(w) + 1) / 2
            # the squared distance once per step, for the objective and (detached) for observe
            return self.model(x_adv), x_adv, (x_adv - s.x).flatten(1).pow(2).sum(1)

        def objective(out, s, w):
            logits, _, l2 = out
            return l2 + s.c * cw_margin(logits, s.lab, targeted, self.confidence)

        def observe(out, loss, s, t):
            logits, x_adv, l2 = out
            ok = cw_success(logits, s.lab, targeted, self.confidence)
            better = ok & (l2 < s.best_l2)
            s.best_l2 = torch.where(better, l2, s.best_l2)
            s.best_adv = torch.where(better.view(view), x_adv, s.best_adv)
            s.succ = s.succ | ok
            if not self.abort_early:
                return None
            s.best_loss = torch.minimum(s.best_loss, loss)
            s.round_l2 = torch.where(ok, torch.minimum(s.round_l2, l2), s.round_l2)
            if t % window:
                return None
            # abort early (per sample, at a check every ``window`` steps): neither the loss nor the
            # smallest successful distance improved by 0.01% over the window
            progress = _improved(s.best_loss, s.mark_loss) | _improved(s.round_l2, s.mark_l2)
            s.mark_loss, s.mark_l2 = s.best_loss, s.round_l2
            return ~progress

        AttackLoop(forward, objective, AdamStep(self.lr), observe=observe, check_every=window).run(s, self.steps)
        best_l2.copy_(s.outputs["best_l2"])
        best_adv.copy_(s.outputs["best_adv"])
        return s.outputs["succ"]


def _improved(best: torch.Tensor, mark: torch.Tensor) -> torch.Tensor:
    """``best`` is below ``mark`` by more than 0.01% of ``|mark|`` (any finite value improves on an
    infinite mark; an infinite value never does)."""
    return torch.isfinite(best) & (torch.isinf(mark) | (best < mark - 1e-4 * mark.abs()))
