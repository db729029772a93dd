"""Gradient attacks with a fixed budget: FGSM, BIM, MIM, PGD (L-inf and L2) and the iterative L2
attack of Metzen et al.

Every step is one forward and one backward pass of the whole batch, differentiating the loss with
respect to the input only; the adversarial tensor is updated in place and projected onto the
threat model's ball and [0, 1] after every step (exactly, see :func:`~advlab.attacks.geometry.linf_box`).
The per-step loop has no host/device synchronisation; with ``early_stop=True`` the finished
samples leave the batch at a check every ``check_every`` steps (on a GPU every 10 by default),
the loop's only synchronisation (one ``any`` and one ``nonzero``), and return their first
successful iterate all the same.

Losses (the quantity each step ascends):

- ``"ce"``: cross-entropy of the true label, or minus the cross-entropy of the target;
- ``"margin"``: the Carlini-Wagner logit margin ``max_{k != y} z_k - z_y`` (targeted:
  ``z_t - max_{k != t} z_k``), which does not saturate once the softmax is confident;
- a callable ``loss(logits, y, target) -> (N,)`` per-sample objective (``target`` may be None).

``eps`` defaults to 8/255 for L-inf attacks and 0.5 for L2 ones. ``seed`` is accepted by every
attack for a common interface; only PGD's random start uses it.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._util import AdvlabError, check_nonneg, check_positive_int
from ..metrics.robustness import is_success
from .base import Attack
from .geometry import check_norm
from .logits import best_other
from .loop import ActiveSet, AttackLoop, ball_projection, check_interval, per_sample, step_rule

__all__ = ["FGSM", "BIM", "MIM", "PGD", "IterativeL2", "attack_objective"]

LOSSES = ("ce", "margin")
DEFAULT_EPS = {"inf": 8 / 255, "2": 0.5}
Loss = Union[str, Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]]


def _check_loss(loss: Loss) -> Loss:
    if not callable(loss) and loss not in LOSSES:
        raise AdvlabError(f"loss must be one of {', '.join(LOSSES)} or a callable (logits, y, target) -> (N,), "
                          f"got {loss!r}")
    return loss


def _margin(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """``z_cls - max_{k != cls} z_k`` per sample; the other classes are found by masking ``cls``
    with -inf, so the gradient reaches only the two logits involved."""
    return logits.gather(1, cls[:, None]).squeeze(1) - best_other(logits, cls)


def attack_objective(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None,
                     loss: Loss = "ce") -> torch.Tensor:
    """Per-sample objective an attack ascends: larger means closer to (or further past) success."""
    if callable(loss):
        out = loss(logits, y, target)
        if out.shape != (logits.shape[0],):
            raise AdvlabError(f"a loss callable must return one value per sample, shape ({logits.shape[0]},), "
                              f"got {tuple(out.shape)}")
        return out
    if loss == "ce":
        if target is None:
            return F.cross_entropy(logits, y, reduction="none")
        return -F.cross_entropy(logits, target, reduction="none")
    if loss == "margin":
        return -_margin(logits, y) if target is None else _margin(logits, target)
    raise AdvlabError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")


class _GradientAttack(Attack):
    """A fixed-budget attack on the shared :class:`~advlab.attacks.loop.AttackLoop`: the
    objective is :func:`attack_objective` (ascended), the step the norm's steepest ascent, the
    projection the threat model's ball."""

    supports_targeted = True
    norm = "inf"
    _decay: Optional[float] = None  # momentum (MIM) when set

    def __init__(self, model: nn.Module, eps: Optional[float], loss: Loss = "ce", seed: Optional[int] = None):
        super().__init__(model, eps=DEFAULT_EPS[self.norm] if eps is None else eps, seed=seed)
        self.loss = _check_loss(loss)

    #: steps between two checks for finished samples (``early_stop`` only; None: the device's
    #: default, :func:`~advlab.attacks.loop.check_interval`; FGSM has one step)
    check_every: Optional[int] = None

    def _loop(self, alpha: float, early_stop: bool, device=None) -> AttackLoop:
        return AttackLoop(
            forward=lambda s, v: self.model(v),
            objective=lambda out, s, v: -attack_objective(out, s.y, s.get("target"), self.loss),
            observe=self._record_success if early_stop else None,
            check_every=check_interval(self.check_every, device or "cpu"),
            step=step_rule(self.norm, alpha, self._decay), project=ball_projection(self.norm, self.eps))

    @staticmethod
    def _record_success(out, obj, s: ActiveSet, t: int) -> torch.Tensor:
        """Early stop's observer: the iterate judged at step ``t`` is kept in ``s.adv`` where it is
        the sample's first success (``s.found``); returns ``s.found``, so the sample leaves at the
        next check and a success between two checks is not lost. No host synchronisation."""
        ok = is_success(out.argmax(1), s.y, s.get("target"))
        s.adv = torch.where(per_sample(ok & ~s.found, s.v), s.v, s.adv)
        s.found = s.found | ok
        return s.found

    def _iterate(self, x, y, target, x_adv, steps: int, alpha: float, early_stop: bool = False) -> torch.Tensor:
        """Run the loop from ``x_adv``; with ``early_stop`` a sample returns the first iterate
        that reaches the goal (misclassified, or classified as the target)."""
        if not early_stop:
            s = ActiveSet(x.shape[0], x.device, outputs=("v",), v=x_adv, x=x, y=y, target=target)
            return self._loop(alpha, early_stop).run(s, steps).outputs["v"]
        s = ActiveSet(x.shape[0], x.device, outputs=("v", "adv", "found"), v=x_adv, x=x, y=y, target=target,
                      adv=x_adv.clone(), found=torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
        o = self._loop(alpha, early_stop, x.device).run(s, steps).outputs
        return torch.where(per_sample(o["found"], x), o["adv"], o["v"])


class FGSM(_GradientAttack):
    """Fast gradient sign method (Goodfellow et al. 2015): ``x + eps * sign(grad)``, one step.

    Targeted (``target=``): ``x - eps * sign(grad CE(target))``."""

    def __init__(self, model: nn.Module, eps: Optional[float] = None, loss: Loss = "ce", seed: Optional[int] = None):
        super().__init__(model, eps=eps, loss=loss, seed=seed)

    def _perturb(self, x, y, target):
        return self._iterate(x, y, target, x.clone(), steps=1, alpha=self.eps)


class _Iterative(_GradientAttack):
    """The iterative attacks: ``steps`` times, a step from the gradient, then the projection onto
    the ball and the box.

    With ``early_stop=True`` the first iterate of a sample that reaches the goal (misclassified,
    or classified as the target) is kept and returned, and the sample leaves the batch at the
    next check, every ``check_every`` steps and after the last (default None: every step on the
    CPU, every :data:`~advlab.attacks.loop.ACCELERATOR_CHECK_EVERY` steps on a GPU;
    :func:`~advlab.attacks.loop.check_interval`): the attack then costs less and never loses a
    success it found, at the price of two host synchronisations per check. The result does not
    depend on ``check_every``.
    """

    def __init__(self, model: nn.Module, eps: Optional[float], alpha: Optional[float], steps: int, loss: Loss = "ce",
                 early_stop: bool = False, seed: Optional[int] = None, default_alpha: float = 1.0,
                 check_every: Optional[int] = None):
        super().__init__(model, eps=eps, loss=loss, seed=seed)
        self.steps = check_positive_int(steps, "steps")
        self.alpha = default_alpha * self.eps / self.steps if alpha is None else check_nonneg(alpha, "alpha")
        self.early_stop = bool(early_stop)
        self.check_every = None if check_every is None else check_positive_int(check_every, "check_every")

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def _perturb(self, x, y, target):
        return self._iterate(x, y, target, self._start(x), self.steps, self.alpha, self.early_stop)


class BIM(_Iterative):
    """Basic iterative method (Kurakin et al. 2017): from ``x``, ``steps`` signed-gradient steps of
    size ``alpha`` (default ``eps / steps``), each clipped to the L-inf ball and [0, 1]."""

    def __init__(self, model: nn.Module, eps: Optional[float] = None, alpha: Optional[float] = None, steps: int = 10,
                 loss: Loss = "ce", early_stop: bool = False, seed: Optional[int] = None,
                 check_every: Optional[int] = None):
        super().__init__(model, eps, alpha, steps, loss=loss, early_stop=early_stop, seed=seed,
                         check_every=check_every)


class MIM(_Iterative):
    """Momentum iterative method (Dong et al. 2018, PCL eq. 12-13): accumulate
    ``g = decay * g + grad / ||grad||_1`` and step ``alpha * sign(g)`` (default ``alpha = eps / steps``)."""

    def __init__(self, model: nn.Module, eps: Optional[float] = None, alpha: Optional[float] = None, steps: int = 10,
                 decay: float = 1.0, loss: Loss = "ce", early_stop: bool = False, seed: Optional[int] = None,
                 check_every: Optional[int] = None):
        super().__init__(model, eps, alpha, steps, loss=loss, early_stop=early_stop, seed=seed,
                         check_every=check_every)
        self.decay = check_nonneg(decay, "decay")
        self._decay = self.decay


class PGD(_Iterative):
    """Projected gradient descent (Madry et al. 2018) in the L-inf or L2 ball.

    Starts from a random point of the ball (``random_start``; seeded by ``seed``): uniform in the
    L-inf ball; for L2 a uniformly random direction at a radius uniform in [0, eps] (as
    torchattacks; a point uniform in the L2 ball's volume lies at ~eps in high dimension and made
    PGD-L2 weaker at a fixed step count), then
    takes ``steps`` steps of ``alpha * sign(grad)`` (L-inf) or ``alpha * grad / ||grad||_2`` (L2),
    projecting after each. ``alpha`` defaults to ``2.5 * eps / steps``. With ``restarts > 1`` the
    samples not yet fooled are attacked again from a new random start; each sample keeps its first
    successful restart, or else the one with the highest final loss. ``loss``, ``early_stop`` and
    ``check_every`` as for the other iterative attacks (:class:`BIM`).
    """

    def __init__(self, model: nn.Module, eps: Optional[float] = None, alpha: Optional[float] = None, steps: int = 10,
                 norm: str = "inf", random_start: bool = True, restarts: int = 1, loss: Loss = "ce",
                 early_stop: bool = False, seed: Optional[int] = None, check_every: Optional[int] = None):
        self.norm = check_norm(norm)
        super().__init__(model, eps, alpha, steps, loss=loss, early_stop=early_stop, seed=seed, default_alpha=2.5,
                         check_every=check_every)
        self.random_start = bool(random_start)
        self.restarts = check_positive_int(restarts, "restarts")
        if self.restarts > 1 and not self.random_start:
            raise AdvlabError("restarts > 1 needs random_start=True (every restart would repeat the first)")

    def _start(self, x):
        if not self.random_start:
            return x.clone()
        if self.norm == "inf" or self.eps == 0:
            return self._random_start(x, self.norm, self.eps)
        # L2: a Gaussian direction at a radius uniform in [0, eps] (torchattacks' start), not
        # uniform in the ball's volume: in d dimensions that puts every start at ~eps, and the
        # random part then holds a share of the budget that 40 steps do not win back (MNIST
        # LeNet-5, eps 2, 40 steps of 0.1, 512 images, 5 seeds: 70.3% -> 73.5% success)
        direction = self._randn(x.shape, x.device).to(x.dtype)
        direction.div_(per_sample(direction.flatten(1).norm(dim=1).clamp_min_(1e-12), x))
        radius = self._rand((x.shape[0],), x.device).to(x.dtype).mul_(self.eps)
        return direction.mul_(per_sample(radius, x)).add_(x).clamp_(0.0, 1.0)

    def _perturb(self, x, y, target):
        best = super()._perturb(x, y, target)
        if self.restarts == 1:
            return best
        with torch.no_grad():
            logits = self.model(best)
        best_obj = attack_objective(logits, y, target, self.loss)
        fooled = is_success(logits.argmax(dim=1), y, target)
        for _ in range(self.restarts - 1):
            todo = torch.nonzero(~fooled).squeeze(1)
            if todo.numel() == 0:
                break
            xs, ys = x[todo], y[todo]
            ts = None if target is None else target[todo]
            cand = super()._perturb(xs, ys, ts)
            with torch.no_grad():
                logits = self.model(cand)
            obj = attack_objective(logits, ys, ts, self.loss)
            ok = is_success(logits.argmax(dim=1), ys, ts)
            better = ok | (obj > best_obj[todo])
            sel = todo[better]
            best[sel] = cand[better]
            best_obj[sel] = obj[better]
            fooled[sel] = ok[better]
        return best


class IterativeL2(_Iterative):
    """Iterative L2 attack of Metzen et al. (I-defender eq. 3): from ``x``,
    ``x_{n+1} = Clip_{x,eps}(x_n + alpha * grad / ||grad||_2)``, where the clip projects onto the
    L2 ball of radius ``eps`` and [0, 1]. ``alpha`` defaults to ``eps / steps``."""

    norm = "2"

    def __init__(self, model: nn.Module, eps: Optional[float] = None, alpha: Optional[float] = None, steps: int = 10,
                 loss: Loss = "ce", early_stop: bool = False, seed: Optional[int] = None,
                 check_every: Optional[int] = None):
        super().__init__(model, eps, alpha, steps, loss=loss, early_stop=early_stop, seed=seed,
                         check_every=check_every)
