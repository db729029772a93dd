"""Gradient attacks with a fixed budget: FGSM, BIM, MIM, PGD (L-inf and L2) and the iterative L2
attack of Metzen et al.

Every step is one forward and one backward pass of the whole batch, differentiating the loss with
respect to the input only; the adversarial tensor is updated in place and projected onto the
threat model's ball and [0, 1] after every step (exactly, see :func:`~advlab.attacks.base.linf_box`).
The per-step loop has no host/device synchronisation unless ``early_stop=True``.

Losses (the quantity each step ascends):

- ``"ce"``: cross-entropy of the true label, or minus the cross-entropy of the target;
- ``"margin"``: the Carlini-Wagner logit margin ``max_{k != y} z_k - z_y`` (targeted:
  ``z_t - max_{k != t} z_k``), which does not saturate once the softmax is confident;
- a callable ``loss(logits, y, target) -> (N,)`` per-sample objective (``target`` may be None).

``eps`` defaults to 8/255 for L-inf attacks and 0.5 for L2 ones. ``seed`` is accepted by every
attack for a common interface; only PGD's random start uses it.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._util import AdvlabError, check_nonneg, check_positive_int
from .base import Attack, check_norm, linf_box

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
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, cls[:, None], True)
    other = logits.masked_fill(mask, float("-inf")).amax(dim=1)
    return logits.gather(1, cls[:, None]).squeeze(1) - other


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


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class _GradientAttack(Attack):
    supports_targeted = True

    def __init__(self, model: nn.Module, eps: Optional[float], loss: Loss = "ce", seed: Optional[int] = None):
        super().__init__(model, eps=DEFAULT_EPS[self.norm] if eps is None else eps, seed=seed)
        self.loss = _check_loss(loss)

    def _gradient(self, x_adv: torch.Tensor, y: torch.Tensor,
                  target: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the summed objective w.r.t. ``x_adv`` (a leaf without grad), and the logits."""
        with torch.enable_grad():
            x_adv.requires_grad_(True)
            logits = self.model(x_adv)
            obj = attack_objective(logits, y, target, self.loss).sum()
            if not obj.requires_grad:
                x_adv.requires_grad_(False)
                raise AdvlabError(f"{type(self).__name__} needs gradients, but the model's output does not depend "
                                  "differentiably on its input (detached or non-differentiable layers; for "
                                  "quantizing or clamping defenses use an adaptive attack such as BPDA)")
            (grad,) = torch.autograd.grad(obj, x_adv)
            x_adv.requires_grad_(False)
        return grad, logits.detach()


class FGSM(_GradientAttack):
    """Fast gradient sign method (Goodfellow et al. 2015): ``x + eps * sign(grad)``, one step.

    Targeted (``target=``): ``x - eps * sign(grad CE(target))``."""

    norm = "inf"

    def __init__(self, model: nn.Module, eps: Optional[float] = None, loss: Loss = "ce", seed: Optional[int] = None):
        super().__init__(model, eps=eps, loss=loss, seed=seed)

    def _perturb(self, x, y, target):
        lo, hi = linf_box(x, self.eps)
        x_adv = x.clone()
        grad, _ = self._gradient(x_adv, y, target)
        return x_adv.add_(grad.sign_(), alpha=self.eps).clamp_(lo, hi)


class _Iterative(_GradientAttack):
    """Shared loop of the iterative attacks: ``steps`` times, take a step from the gradient and
    project onto the ball and the box.

    With ``early_stop=True`` a sample leaves the batch at the first iterate that reaches the goal
    (misclassified, or classified as the target) and that iterate is returned: the attack then
    costs less and never loses a success it found, at the price of one synchronisation per step.
    """

    norm = "inf"
    _decay: Optional[float] = None  # momentum (MIM) when set

    def __init__(self, model: nn.Module, eps: Optional[float], alpha: Optional[float], steps: int, loss: Loss = "ce",
                 early_stop: bool = False, seed: Optional[int] = None, default_alpha: float = 1.0):
        super().__init__(model, eps=eps, loss=loss, seed=seed)
        self.steps = check_positive_int(steps, "steps")
        self.alpha = default_alpha * self.eps / self.steps if alpha is None else check_nonneg(alpha, "alpha")
        self.early_stop = bool(early_stop)

    # ---- pieces the subclasses choose
    def _start(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def _step_(self, x_adv, grad, x, lo, hi, momentum) -> None:
        """In-place update of ``x_adv`` (``grad`` may be overwritten)."""
        if self.norm == "inf":
            if momentum is not None:
                # mean |g| is ||g||_1 over the (constant) pixel count: the same direction of momentum
                l1 = grad.abs().flatten(1).mean(dim=1).clamp_min_(1e-12)
                momentum.mul_(self._decay).add_(grad.div_(_per_sample(l1, grad)))
                direction = torch.sign(momentum, out=grad)
            else:
                direction = grad.sign_()
            x_adv.add_(direction, alpha=self.alpha).clamp_(lo, hi)
        else:
            l2 = grad.flatten(1).norm(dim=1).clamp_min_(1e-12)
            x_adv.addcdiv_(grad, _per_sample(l2, grad), value=self.alpha)
            delta = x_adv.sub_(x)  # reuse the buffer for the perturbation
            n = delta.flatten(1).norm(dim=1).clamp_min_(1e-12)
            delta.mul_(_per_sample(torch.clamp(self.eps / n, max=1.0), delta))
            delta.add_(x).clamp_(0.0, 1.0)

    # ---- the loop
    def _perturb(self, x, y, target):
        return self._iterate(x, y, target, self._start(x))

    def _iterate(self, x, y, target, x_adv):
        if self.norm == "inf":
            lo, hi = linf_box(x, self.eps)
        else:
            lo = hi = None
        momentum = torch.zeros_like(x) if self._decay is not None else None
        if not self.early_stop:
            for _ in range(self.steps):
                grad, _ = self._gradient(x_adv, y, target)
                self._step_(x_adv, grad, x, lo, hi, momentum)
            return x_adv
        out = x_adv.clone()
        idx = torch.arange(x.shape[0], device=x.device)
        for _ in range(self.steps):
            grad, logits = self._gradient(x_adv, y, target)
            pred = logits.argmax(dim=1)
            done = pred == target if target is not None else pred != y
            if bool(done.any()):
                out[idx[done]] = x_adv[done]
                keep = ~done
                if not bool(keep.any()):
                    return out
                idx, x, y, x_adv, grad = idx[keep], x[keep], y[keep], x_adv[keep], grad[keep]
                target = None if target is None else target[keep]
                lo = None if lo is None else lo[keep]
                hi = None if hi is None else hi[keep]
                momentum = None if momentum is None else momentum[keep]
            self._step_(x_adv, grad, x, lo, hi, momentum)
        out[idx] = x_adv
        return out


class BIM(_Iterative):
    """Basic iterative method (Kurakin et al. 2017): from ``x``, ``steps`` signed-gradient steps of
    size ``alpha`` (default ``eps / steps``), each clipped to the L-inf ball and [0, 1]."""

    def __init__(self, model: nn.Module, eps: Optional[float] = None, alpha: Optional[float] = None, steps: int = 10,
                 loss: Loss = "ce", early_stop: bool = False, seed: Optional[int] = None):
        super().__init__(model, eps, alpha, steps, loss=loss, early_stop=early_stop, seed=seed)


class MIM(_Iterative):
    """Momentum iterative method (Dong et al. 2018, PCL eq. 12-13): accumulate
    ``g = decay * g + grad / ||grad||_1`` and step ``alpha * sign(g)`` (default ``alpha = eps / steps``)."""

    def __init__(self, model: nn.Module, eps: Optional[float] = None, alpha: Optional[float] = None, steps: int = 10,
                 decay: float = 1.0, loss: Loss = "ce", early_stop: bool = False, seed: Optional[int] = None):
        super().__init__(model, eps, alpha, steps, loss=loss, early_stop=early_stop, seed=seed)
        self.decay = check_nonneg(decay, "decay")
        self._decay = self.decay


class PGD(_Iterative):
    """Projected gradient descent (Madry et al. 2018) in the L-inf or L2 ball.

    Starts from a uniform random point of the ball (``random_start``; seeded by ``seed``), then
    takes ``steps`` steps of ``alpha * sign(grad)`` (L-inf) or ``alpha * grad / ||grad||_2`` (L2),
    projecting after each. ``alpha`` defaults to ``2.5 * eps / steps``. With ``restarts > 1`` the
    samples not yet fooled are attacked again from a new random start; each sample keeps its first
    successful restart, or else the one with the highest final loss.
    """

    def __init__(self, model: nn.Module, eps: Optional[float] = None, alpha: Optional[float] = None, steps: int = 10,
                 norm: str = "inf", random_start: bool = True, restarts: int = 1, loss: Loss = "ce",
                 early_stop: bool = False, seed: Optional[int] = None):
        self.norm = check_norm(norm)
        super().__init__(model, eps, alpha, steps, loss=loss, early_stop=early_stop, seed=seed, default_alpha=2.5)
        self.random_start = bool(random_start)
        self.restarts = check_positive_int(restarts, "restarts")
        if self.restarts > 1 and not self.random_start:
            raise AdvlabError("restarts > 1 needs random_start=True (every restart would repeat the first)")

    def _start(self, x):
        if not self.random_start or self.eps == 0:
            return x.clone()
        if self.norm == "inf":
            noise = self._rand(x.shape, x.device).to(x.dtype).mul_(2 * self.eps).sub_(self.eps)
            lo, hi = linf_box(x, self.eps)
            return noise.add_(x).clamp_(lo, hi)
        # uniform in the L2 ball: a Gaussian direction and radius eps * u^(1/d)
        d = x[0].numel()
        direction = self._randn(x.shape, x.device).to(x.dtype)
        direction.div_(_per_sample(direction.flatten(1).norm(dim=1).clamp_min_(1e-12), x))
        radius = self._rand((x.shape[0],), x.device).to(x.dtype).pow_(1.0 / d).mul_(self.eps)
        return direction.mul_(_per_sample(radius, x)).add_(x).clamp_(0.0, 1.0)

    def _perturb(self, x, y, target):
        best = self._iterate(x, y, target, self._start(x))
        if self.restarts == 1:
            return best
        with torch.no_grad():
            logits = self.model(best)
        best_obj = attack_objective(logits, y, target, self.loss)
        pred = logits.argmax(dim=1)
        fooled = pred == target if target is not None else pred != y
        for _ in range(self.restarts - 1):
            todo = torch.nonzero(~fooled).squeeze(1)
            if todo.numel() == 0:
                break
            xs, ys = x[todo], y[todo]
            ts = None if target is None else target[todo]
            cand = self._iterate(xs, ys, ts, self._start(xs))
            with torch.no_grad():
                logits = self.model(cand)
            obj = attack_objective(logits, ys, ts, self.loss)
            pred = logits.argmax(dim=1)
            ok = pred == ts if ts is not None else pred != ys
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
                 loss: Loss = "ce", early_stop: bool = False, seed: Optional[int] = None):
        super().__init__(model, eps, alpha, steps, loss=loss, early_stop=early_stop, seed=seed)
