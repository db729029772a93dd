"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", Algorithm 1 and section 3): PGD with momentum and a step size
that adapts per sample, L-inf and L2, on the shared :class:`~advlab.attacks.loop.AttackLoop`.

The iteration (``P`` the projection onto the ball and [0, 1], ``f`` the loss, ascended)::

    z      = P(x_k + eta * d(grad f(x_k)))        d = sign (L-inf) or g / ||g||_2 (L2)
    x_k+1  = P(x_k + alpha (z - x_k) + (1 - alpha) (x_k - x_k-1))   alpha = 0.75 (1 on the first step)

with ``eta = 2 eps`` at the start. At the checkpoints ``w_j = ceil(p_j N)`` (:func:`apgd_checkpoints`;
``p_0 = 0``, ``p_1 = 0.22``, ``p_j+1 = p_j + max(p_j - p_j-1 - 0.03, 0.06)``) a sample halves its
``eta`` and restarts from its best point ``x_max`` when

1. fewer than ``rho * (w_j - w_j-1)`` of the steps since the last checkpoint increased the loss
   (``f(x_i+1) > f(x_i)``), or
2. its ``eta`` was not reduced at the last checkpoint and its best loss has not grown since.

Everything per sample (eta, best loss and point, the previous iterate, the counters) lives in the
:class:`~advlab.attacks.loop.ActiveSet`, so it shrinks with the batch; no per-sample Python loops
and no host synchronisation except for early stopping: the successful samples (their first
successful iterate recorded) leave the batch at a check every ``check_every`` steps.

Losses (ascended):

- ``"ce"``: cross-entropy of the true label (targeted: minus the cross-entropy of the target);
- ``"dlr"``: the difference of logits ratio ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``
  (targeted: the targeted DLR below), invariant to shifting and scaling the logits;
- ``"dlr-targeted"``: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` (``z_pi`` the sorted
  logits). With ``target=None`` this is APGD-T: one run per target class among the
  ``targeted_classes`` highest-scoring wrong classes of the clean logits, each on the samples
  still robust; a sample keeps its first success (any misclassification).

Differences from the reference code (``autopgd_base.py``), where it departs from the paper: the
checkpoints are the paper's ``ceil(p_j N)`` for every ``N`` (the code's integer arithmetic agrees
for ``N = 100``); condition 1 is the paper's strict ``<``; condition 2 at the first checkpoint
follows the paper (``eta`` counts as unchanged at ``w_0 = 0``); after a restart the next increase
is counted against ``f(x_max)``; a failed sample returns its best point, not the clean image.
The random start is uniform in the ball (:meth:`~advlab.attacks.base.Attack._random_start`).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._util import AdvlabError, check_nonneg, check_positive_int
from ..metrics.robustness import is_success
from .base import Attack
from .geometry import check_norm
from .gradient import DEFAULT_EPS
from .logits import best_other
from .loop import ActiveSet, AttackLoop, autograd, ball_projection, check_interval, per_sample

__all__ = ["APGD", "APGDStep", "apgd_checkpoints", "dlr_loss", "dlr_targeted_loss", "eot_autograd"]

LOSSES = ("ce", "dlr", "dlr-targeted")


def apgd_checkpoints(steps: int) -> List[int]:
    """The checkpoints ``w_j = ceil(p_j * steps)`` of APGD's step-size schedule, ``p_j <= 1``:
    ``p_0 = 0``, ``p_1 = 0.22``, ``p_j+1 = p_j + max(p_j - p_j-1 - 0.03, 0.06)``. Computed in
    exact integer hundredths (``0.22 * 100`` in floats is 22.000000000000004, whose ceiling is
    23); repeated values (few steps) are listed once. For 100 steps: 0, 22, 41, 57, 70, 80, 87,
    93, 99."""
    steps = check_positive_int(steps, "steps")
    q = [0, 22]  # p_j in hundredths
    while True:
        nxt = q[-1] + max(q[-1] - q[-2] - 3, 6)
        if nxt > 100:
            break
        q.append(nxt)
    return sorted({-(-p * steps // 100) for p in q})


# ---------------------------------------------------------------------------- losses (ascended)

def _top(logits: torch.Tensor, k: int) -> torch.Tensor:
    return logits.topk(k, dim=1).values


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR loss ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` per sample
    (``z_pi1 >= z_pi2 >= ...`` the sorted logits); needs at least 3 classes."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    top = _top(logits, 3)
    return -(z_y - best_other(logits, y)) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` per sample;
    needs at least 4 classes."""
    z = logits.gather(1, torch.stack((y, target), dim=1))
    top = _top(logits, 4)
    return -(z[:, 0] - z[:, 1]) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def apgd_loss(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor], loss: str) -> torch.Tensor:
    """The per-sample loss APGD ascends (see the module docstring); ``target`` None is untargeted
    (``"dlr-targeted"`` needs a target here)."""
    if loss == "ce":
        if target is None:
            return F.cross_entropy(logits, y, reduction="none")
        return -F.cross_entropy(logits, target, reduction="none")
    if loss == "dlr" and target is None:
        return dlr_loss(logits, y)
    if loss in ("dlr", "dlr-targeted"):
        if target is None:
            raise AdvlabError("the targeted DLR loss needs a target class")
        return dlr_targeted_loss(logits, y, target)
    raise AdvlabError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")


# ---------------------------------------------------------------------------- gradient (EoT)

def eot_autograd(n: int) -> Callable:
    """A gradient function for :class:`~advlab.attacks.loop.AttackLoop` that averages the
    gradient and the objective over ``n`` forward/backward passes (expectation over
    transformation, for randomized models); the output returned is the last pass's. ``n = 1`` is
    plain :func:`~advlab.attacks.loop.autograd`."""
    n = check_positive_int(n, "eot_iter")
    if n == 1:
        return autograd

    def grad(fn: Callable, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g, out, obj = autograd(fn, v)
        for _ in range(n - 1):
            g_i, out, obj_i = autograd(fn, v)
            g.add_(g_i)
            obj = obj + obj_i
        return g.div_(n), out, obj / n
    return grad


# ---------------------------------------------------------------------------- the step rule

class APGDStep:
    """APGD's per-sample step and step-size control, as a step rule (``init``, ``__call__``) and
    an ``observe`` hook of the same object for :class:`~advlab.attacks.loop.AttackLoop`.

    The loop minimises ``obj = -f``. ``observe`` runs on the iterate ``x_k`` (``k = t - 1`` at
    loop step ``t``): it updates the best loss and point, counts the increases of ``f``, records
    the first successful iterate, and at a checkpoint ``k = w_j`` halves ``eta`` and moves the
    iterate back to ``x_max`` where condition 1 or 2 holds. The step then takes the momentum step
    from ``x_k`` (with the gradient at ``x_max`` for a sample just restarted). ``project`` is the
    loop's projection (used for the inner ``z = P(...)`` too), ``criterion(out, s) -> mask`` the
    success rule; with ``early_stop`` observe returns ``found`` (succeeded at this or an earlier
    iterate), so successful samples leave the batch at the loop's next check.

    Per-sample state in the active set: ``eta``, ``prev`` (``x_k-1``), ``x_best``, ``f_max``,
    ``g_best`` (the gradient at ``x_best``), ``prev_loss``, ``n_inc`` (increases since the last
    checkpoint), ``f_max_last``, ``reduced_last``, ``improved``, ``restart``, ``found`` and
    ``x_adv`` (the first successful iterate). Full-size outputs: ``x_best``, ``f_max``,
    ``found``, ``x_adv``.
    """

    def __init__(self, norm: str, eps: float, steps: int, project, criterion: Callable,
                 rho: float = 0.75, alpha: float = 0.75, early_stop: bool = True):
        self.norm, self.eps, self.project = check_norm(norm), float(eps), project
        self.rho, self.alpha, self.criterion, self.early_stop = float(rho), float(alpha), criterion, early_stop
        w = apgd_checkpoints(steps)
        # checkpoint iterate -> length of the interval it closes; w_0 = 0 only records the state
        self.checks: Dict[int, int] = {b: b - a for a, b in zip([0] + w[:-1], w) if b < steps}

    def init(self, s: ActiveSet) -> None:
        v = s.v
        n = v.shape[0]
        s.eta = torch.full((n,), 2 * self.eps, dtype=v.dtype, device=v.device)
        s.prev = v.clone()
        s.g_best = torch.zeros_like(v)
        s.x_best = v.clone()
        s.x_adv = v.clone()
        s.found = torch.zeros(n, dtype=torch.bool, device=v.device)
        s.f_max = torch.full((n,), float("-inf"), dtype=v.dtype, device=v.device)
        s.f_max_last = s.f_max.clone()
        s.prev_loss = torch.full((n,), float("inf"), dtype=v.dtype, device=v.device)  # no increase at k = 0
        s.n_inc = torch.zeros(n, dtype=torch.long, device=v.device)
        s.reduced_last = torch.zeros(n, dtype=torch.bool, device=v.device)
        s.improved = torch.zeros(n, dtype=torch.bool, device=v.device)
        s.restart = torch.zeros(n, dtype=torch.bool, device=v.device)
        for name in ("x_best", "f_max", "found", "x_adv"):
            s.add_output(name, s.get(name).clone())

    def observe(self, out: torch.Tensor, obj: torch.Tensor, s: ActiveSet, t: int) -> Optional[torch.Tensor]:
        k = t - 1
        f = -obj.to(s.f_max.dtype)
        v = s.v
        ok = self.criterion(out, s)
        new = ok & ~s.found
        s.x_adv = torch.where(per_sample(new, v), v, s.x_adv)
        s.found = s.found | ok
        s.improved = f > s.f_max
        s.f_max = torch.where(s.improved, f, s.f_max)
        s.x_best = torch.where(per_sample(s.improved, v), v, s.x_best)
        s.n_inc = s.n_inc + (f > s.prev_loss)
        s.prev_loss = f
        if k == 0:  # w_0: the reference state of the first interval
            s.f_max_last = s.f_max.clone()
            s.n_inc = torch.zeros_like(s.n_inc)
        elif k in self.checks:
            cond1 = s.n_inc < self.rho * self.checks[k]
            cond2 = ~s.reduced_last & (s.f_max <= s.f_max_last)
            reduce = cond1 | cond2
            s.eta = torch.where(reduce, s.eta * 0.5, s.eta)
            s.v = torch.where(per_sample(reduce, v), s.x_best, v)
            s.prev_loss = torch.where(reduce, s.f_max, f)
            s.restart = reduce
            s.reduced_last = reduce
            s.f_max_last = s.f_max.clone()
            s.n_inc = torch.zeros_like(s.n_inc)
        return s.found if self.early_stop else None

    def __call__(self, s: ActiveSet, g: torch.Tensor, t: int) -> None:
        s.g_best = torch.where(per_sample(s.improved, g), g, s.g_best)
        if t - 1 in self.checks:  # a sample just moved back to x_max steps with the gradient there
            g = torch.where(per_sample(s.restart, g), s.g_best, g)
            s.restart = torch.zeros_like(s.restart)
        x = s.v
        if self.norm == "inf":
            d = g.sign().neg_()
        else:
            d = g.div(per_sample(g.flatten(1).norm(dim=1).clamp_min(1e-12), g)).neg_()
        s.v = torch.addcmul(x, per_sample(s.eta, x), d)
        self.project(s)
        z = s.v
        a = 1.0 if t == 1 else self.alpha
        # x + a (z - x) + (1 - a) (x - x_prev); the loop projects it next
        s.v = z.sub_(x).mul_(a).add_(x.sub(s.prev), alpha=1.0 - a).add_(x)
        s.prev = x


# ---------------------------------------------------------------------------- the attack

class APGD(Attack):
    """APGD (Croce & Hein 2020) in the L-inf or L2 ball of radius ``eps`` (default 8/255 for
    L-inf, 0.5 for L2).

    ``steps`` iterations per run (one forward and backward each, times ``eot_iter``, plus one
    forward of the last iterate); ``loss`` ``"ce"``, ``"dlr"`` or ``"dlr-targeted"`` (see the
    module docstring; with ``target=None`` the last is APGD-T over ``targeted_classes`` target
    classes); ``rho`` the threshold of condition 1. Every run starts from a uniform random point
    of the ball (seeded by ``seed``); with ``restarts > 1`` the samples still robust are attacked
    again from a new one. A sample the model already gets wrong (or classifies as the target) is
    returned unchanged; a successful one returns its first successful iterate (with
    ``early_stop`` it leaves the batch there); a failed one its point of highest loss over its
    runs. ``eot_iter > 1`` averages the gradient over that many passes (randomized models).
    ``check_every``: with ``early_stop``, the successful samples leave the batch every that many
    steps (and after the last); these checks are the run's only host synchronisations, and the
    result does not depend on them (a success is recorded at the step it happens). None: every
    step on the CPU, every :data:`~advlab.attacks.loop.ACCELERATOR_CHECK_EVERY` on a GPU.
    """

    supports_targeted = True

    def __init__(self, model: nn.Module, eps: Optional[float] = None, norm: str = "inf", steps: int = 100,
                 loss: str = "ce", restarts: int = 1, rho: float = 0.75, seed: Optional[int] = 0,
                 targeted_classes: int = 9, eot_iter: int = 1, early_stop: bool = True,
                 scores: Optional[Callable] = None, check_every: Optional[int] = None):
        self.norm = check_norm(norm)
        super().__init__(model, eps=DEFAULT_EPS[self.norm] if eps is None else eps, seed=seed)
        if loss not in LOSSES:
            raise AdvlabError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.loss = loss
        self.scores = scores
        self.steps = check_positive_int(steps, "steps")
        self.restarts = check_positive_int(restarts, "restarts")
        self.rho = check_nonneg(rho, "rho")
        if self.rho > 1:
            raise AdvlabError(f"rho must be in [0, 1], got {rho}")
        self.targeted_classes = check_positive_int(targeted_classes, "targeted_classes")
        self.eot_iter = check_positive_int(eot_iter, "eot_iter")
        self.early_stop = bool(early_stop)
        self.check_every = None if check_every is None else check_positive_int(check_every, "check_every")

    # ------------------------------------------------------------------ one run
    def _run(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor],
             loss_target: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One APGD run from a random start. ``target`` is the goal (None: misclassification),
        ``loss_target`` the target of the loss. Returns (points, success, best loss)."""
        s = ActiveSet(x.shape[0], x.device, v=self._random_start(x, self.norm, self.eps), x=x, y=y,
                      target=target, loss_target=loss_target)
        project = ball_projection(self.norm, self.eps)
        rule = APGDStep(self.norm, self.eps, self.steps, project,
                        criterion=lambda out, s: is_success(out.argmax(1), s.y, s.get("target")),
                        rho=self.rho, early_stop=self.early_stop)
        loop = AttackLoop(forward=lambda s, v: self._decision(self.model(v), s.y),
                          objective=lambda out, s, v: -apgd_loss(out, s.y, s.get("loss_target"), self.loss),
                          step=rule, project=project, observe=rule.observe, grad=eot_autograd(self.eot_iter),
                          final_observe=True, check_every=check_interval(self.check_every, x.device))
        o = loop.run(s, self.steps).outputs
        found = o["found"]
        return torch.where(per_sample(found, x), o["x_adv"], o["x_best"]), found, o["f_max"]

    # ------------------------------------------------------------------ driver
    def _perturb(self, x, y, target):
        with torch.no_grad():
            logits = self._decision(self.model(x), y)
        nc = logits.shape[1]
        sweep = target is None and self.loss == "dlr-targeted"
        need = 4 if (self.loss == "dlr-targeted" or (self.loss == "dlr" and target is not None)) else \
            3 if self.loss == "dlr" else 2
        if nc < need:
            raise AdvlabError(f"loss {self.loss!r}{' (targeted)' if target is not None else ''} needs at least "
                              f"{need} classes, the model has {nc}")
        fooled = is_success(logits.argmax(1), y, target)
        result = x.clone()
        if self.eps == 0:
            return result
        best_loss = torch.full((x.shape[0],), float("-inf"), dtype=x.dtype, device=x.device)
        if sweep:
            # the wrong classes by clean logit, highest first (y masked, so never a target)
            order = logits.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)
            loss_targets = [order[:, j] for j in range(min(self.targeted_classes, nc - 1))]
        else:
            loss_targets = [target]
        for lt in loss_targets:
            for _ in range(self.restarts):
                todo = torch.nonzero(~fooled).squeeze(1)
                if todo.numel() == 0:
                    return result
                ts = None if target is None else target[todo]
                lts = None if lt is None else lt[todo]
                cand, ok, f = self._run(x[todo], y[todo], ts, lts)
                better = ok | (f.to(best_loss.dtype) > best_loss[todo])
                sel = todo[better]
                result[sel] = cand[better]
                best_loss[sel] = f[better].to(best_loss.dtype)
                fooled[sel] = ok[better]
        return result
