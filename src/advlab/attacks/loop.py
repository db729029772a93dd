"""The one iterative attack loop, with hooks.

Every iterative attack in advlab (BIM, MIM, PGD, iterative L2, C&W L2, K-A3, the full-knowledge
M-SVDD-D attack, APGD) is a configuration of :class:`AttackLoop`: a *variable* per sample, a
*forward* from the variable to the model output, an *objective* (per-sample, minimised), a
*gradient function* (autograd by default; EoT averaging or BPDA plug in here), a *step rule*
(signed, L2-normalised, Adam, ...), a *projection*, and an *observe* hook that judges the
iterate (criterion, best-so-far bookkeeping) and says which samples are done. Samples that are
done leave the active batch (:class:`ActiveSet`), so the remaining steps cost only what is left.

One step costs one forward and one backward of the active batch. Nothing in the loop
synchronises with the device unless samples can finish early (``observe`` returns a mask), and
then only every ``check_every`` steps.

>>> s = ActiveSet(x.shape[0], x.device, v=x.clone(), x=x, y=y)
>>> loop = AttackLoop(forward=lambda s, v: model(v),
...                   objective=lambda out, s, v: -F.cross_entropy(out, s.y, reduction="none"),
...                   step=SignStep(alpha=0.01), project=LinfProjection(eps=0.3))
>>> loop.run(s, steps=40)
>>> x_adv = s.v                     # or s.outputs[...] for the rows written back on the way
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from .._util import AdvlabError, check_positive_int
from .geometry import linf_box

__all__ = ["ActiveSet", "AttackLoop", "SignStep", "L2Step", "AdamStep", "LinfProjection", "L2Projection",
           "BoxProjection", "autograd", "per_sample", "check_interval", "ACCELERATOR_CHECK_EVERY"]

#: steps between two checks for finished samples on an accelerator (CUDA, MPS, ...): a check reads
#: a value on the host, which waits for the device's queue to drain; the attacks whose finished
#: samples leave early take this default there (``check_every=None``)
ACCELERATOR_CHECK_EVERY = 10


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector (N,) to broadcast against ``like`` (N, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


class ActiveSet:
    """Per-sample tensors of the samples still being attacked, kept aligned.

    Every tensor given as a keyword (or set later with ``s.name = t``) has the batch as its first
    dimension; :meth:`keep` slices all of them at once and ``s.idx`` keeps the global row of each
    active sample. Tensors named in ``outputs`` are full-size results: :meth:`write_back` copies
    the active rows of the same-named per-sample tensor into them (before a shrink, and at the end
    of :meth:`AttackLoop.run`). A value that is not a plain tensor (e.g. CW-SSIM's reference
    pyramid) is sliced by a function given in ``slicers``."""

    def __init__(self, n: int, device, outputs: Iterable[str] = (), slicers: Optional[Dict[str, Callable]] = None,
                 **tensors):
        object.__setattr__(self, "_t", {})
        object.__setattr__(self, "_slicers", dict(slicers or {}))
        object.__setattr__(self, "idx", torch.arange(n, device=device))
        object.__setattr__(self, "n", n)
        for k, v in tensors.items():
            self._t[k] = v
        object.__setattr__(self, "outputs", {k: tensors[k].clone() for k in outputs})

    def __getattr__(self, name):
        try:
            return self._t[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        if name in ("idx", "outputs", "n"):
            object.__setattr__(self, name, value)
        else:
            self._t[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self._t

    def __len__(self) -> int:
        return int(self.idx.shape[0])

    def get(self, name: str, default=None):
        return self._t.get(name, default)

    def pop(self, name: str):
        return self._t.pop(name)

    def add_output(self, name: str, init: torch.Tensor) -> None:
        """A full-size result ``name`` (initialised to ``init``) fed from the per-sample ``name``."""
        self.outputs[name] = init

    def write_back(self) -> None:
        for name, full in self.outputs.items():
            if name in self._t:
                full[self.idx] = self._t[name]

    def keep(self, mask: torch.Tensor) -> bool:
        """Keep the rows where ``mask`` is true (write the others back first). Returns whether
        any sample is left."""
        self.write_back()
        k = mask.nonzero().squeeze(1)
        object.__setattr__(self, "idx", self.idx[k])
        for name, v in self._t.items():
            if v is None:
                continue
            if name in self._slicers:
                self._t[name] = self._slicers[name](v, k)
            elif isinstance(v, torch.Tensor) and v.dim() > 0:
                self._t[name] = v[k]
        return k.numel() > 0


def check_interval(check_every: Optional[int], device) -> int:
    """Steps between two checks for finished samples: ``check_every`` when given (a positive
    int), else 1 on the CPU, where reading a value on the host waits for nothing and a finished
    sample should leave at once, and :data:`ACCELERATOR_CHECK_EVERY` on any other device.

    Raises AdvlabError for a ``check_every`` that is not a positive int."""
    if check_every is not None:
        return check_positive_int(check_every, "check_every")
    return 1 if torch.device(device).type == "cpu" else ACCELERATOR_CHECK_EVERY


# ---------------------------------------------------------------------------- gradient functions

def autograd(fn: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
             v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain autograd: ``out, obj = fn(v)``; returns (d sum(obj) / dv, out, obj), all detached."""
    with torch.enable_grad():
        v = v.detach().requires_grad_(True)
        out, obj = fn(v)
        if not obj.requires_grad:
            raise AdvlabError("the attack needs gradients, but the model's output does not depend differentiably "
                              "on its input (detached or non-differentiable layers); for quantizing or clamping "
                              "defenses use BPDA (advlab.adaptive.BPDA) or a black-box attack (Square)")
        (g,) = torch.autograd.grad(obj.sum(), v)
    return g, detach(out), obj.detach()


def detach(out):
    """Detach a model output, or each tensor of a tuple of outputs."""
    if isinstance(out, tuple):
        return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out)
    return out.detach()


def logit_grads(model, x: torch.Tensor, weights) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``x`` (N, C) and the K input gradients ``d(weights[k] . logits) / dx`` (K, N, ...),
    from one forward and one vmapped backward (``is_grads_batched``). ``weights`` is a (K, N, C)
    tensor or a function of the (detached) logits returning one. Models whose ops have no
    batching rule fall back to one backward of a K-times replicated batch."""
    xg = x.detach().requires_grad_(True)
    logits = model(xg)
    w = weights(logits.detach()) if callable(weights) else weights
    if w.shape[0] == 1:
        (g,) = torch.autograd.grad(logits, xg, w[0])
        return logits.detach(), g[None]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vmap's "performance drop" notes for ops without a rule
            (g,) = torch.autograd.grad(logits, xg, w, is_grads_batched=True)
        return logits.detach(), g
    except RuntimeError:
        pass
    k = w.shape[0]
    xr = x.detach().repeat(k, *([1] * (x.dim() - 1))).requires_grad_(True)
    (g,) = torch.autograd.grad((model(xr) * w.reshape(-1, w.shape[-1])).sum(), xr)
    return logits.detach(), g.view(k, *x.shape)


# ---------------------------------------------------------------------------- step rules (descent)

class SignStep:
    """``v -= alpha * sign(g)`` (L-inf steepest descent); with ``decay`` the sign of an
    L1-normalised momentum ``m = decay * m + g / mean|g|`` (MIM)."""

    def __init__(self, alpha: float, decay: Optional[float] = None):
        self.alpha, self.decay = float(alpha), decay

    def init(self, s: ActiveSet) -> None:
        if self.decay is not None:
            s.momentum = torch.zeros_like(s.v)

    def __call__(self, s: ActiveSet, g: torch.Tensor, t: int) -> None:
        if self.decay is not None:
            l1 = g.abs().flatten(1).mean(dim=1).clamp_min_(1e-12)
            s.momentum.mul_(self.decay).add_(g.div_(per_sample(l1, g)))
            g = torch.sign(s.momentum, out=g)
        else:
            g = g.sign_()
        s.v.sub_(g, alpha=self.alpha)


class L2Step:
    """``v -= alpha * g / ||g||_2`` (L2 steepest descent)."""

    def __init__(self, alpha: float):
        self.alpha = float(alpha)

    def init(self, s: ActiveSet) -> None:
        pass

    def __call__(self, s: ActiveSet, g: torch.Tensor, t: int) -> None:
        n = g.flatten(1).norm(dim=1).clamp_min_(1e-12)
        s.v.addcdiv_(g, per_sample(n, g), value=-self.alpha)


class AdamStep:
    """Adam on the variable, per sample (the moments live in the active set, so they shrink with
    it): ``v -= lr * m_hat / (sqrt(v_hat) + eps)``. ``lr`` may be a per-sample tensor name."""

    def __init__(self, lr: float, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, (self.b1, self.b2), self.eps = float(lr), betas, eps

    def init(self, s: ActiveSet) -> None:
        s.adam_m = torch.zeros_like(s.v)
        s.adam_v = torch.zeros_like(s.v)

    def __call__(self, s: ActiveSet, g: torch.Tensor, t: int) -> None:
        s.adam_m.mul_(self.b1).add_(g, alpha=1 - self.b1)
        s.adam_v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        denom = (s.adam_v / (1 - self.b2 ** t)).sqrt_().add_(self.eps)
        s.v.addcdiv_(s.adam_m, denom, value=-self.lr / (1 - self.b1 ** t))


# ---------------------------------------------------------------------------- projections

class LinfProjection:
    """Onto the exact L-inf ball around ``s.x`` intersected with [0, 1]; the per-pixel bounds are
    computed once (:func:`~advlab.attacks.geometry.linf_box`) and kept in the active set."""

    def __init__(self, eps: float):
        self.eps = float(eps)

    def init(self, s: ActiveSet) -> None:
        s.lo, s.hi = linf_box(s.x, self.eps)

    def __call__(self, s: ActiveSet) -> None:
        s.v.clamp_(s.lo, s.hi)


class L2Projection:
    """Onto the L2 ball of radius ``eps`` around ``s.x``, then [0, 1] (clamping never increases
    the L2 norm, so the ball still holds)."""

    def __init__(self, eps: float):
        self.eps = float(eps)

    def init(self, s: ActiveSet) -> None:
        pass

    def __call__(self, s: ActiveSet) -> None:
        delta = s.v.sub_(s.x)  # reuse the buffer for the perturbation
        n = delta.flatten(1).norm(dim=1).clamp_min_(1e-12)
        delta.mul_(per_sample(torch.clamp(self.eps / n, max=1.0), delta))
        delta.add_(s.x).clamp_(0.0, 1.0)


class BoxProjection:
    """Onto [0, 1] (for a variable in pixel space), or for a perturbation ``v = delta`` onto
    ``x + delta in [0, 1]`` (``delta=True``)."""

    def __init__(self, delta: bool = False):
        self.delta = delta

    def init(self, s: ActiveSet) -> None:
        pass

    def __call__(self, s: ActiveSet) -> None:
        if self.delta:
            s.v.add_(s.x).clamp_(0.0, 1.0).sub_(s.x)
        else:
            s.v.clamp_(0.0, 1.0)


def ball_projection(norm: Optional[str], eps: Optional[float]):
    """The projection of a threat model: L-inf or L2 ball of ``eps`` (plus the box), or the box."""
    if norm is None or eps is None:
        return BoxProjection()
    if norm == "inf":
        return LinfProjection(eps)
    if norm == "2":
        return L2Projection(eps)
    raise AdvlabError(f"norm must be 'inf' or '2', got {norm!r}")


def step_rule(norm: str, alpha: float, decay: Optional[float] = None):
    """The steepest-descent step of a norm: signed for L-inf, normalised for L2."""
    return SignStep(alpha, decay) if norm == "inf" else L2Step(alpha)


# ---------------------------------------------------------------------------- the loop

class AttackLoop:
    """Iterate ``steps`` times: gradient of the objective at the variable ``s.v``, observe, step,
    project; drop the samples that are done.

    Order within step ``t``: gradient (one forward + backward), ``observe``, then at every
    ``check_every``-th step the finished samples leave (written back first, so a sample returns
    the iterate it was judged on), then ``step``, ``project`` and ``after_step``.

    Hooks (``s`` is the :class:`ActiveSet`):

    - ``forward(s, v) -> out``: the model output at the variable ``v`` (e.g. ``model(v)``, or
      ``model((tanh(v) + 1) / 2)`` for C&W's tanh space);
    - ``objective(out, s, v) -> (N,)``: per-sample value to *minimise* (an attack that ascends a
      loss returns its negative);
    - ``grad(fn, v) -> (g, out, obj)``: gradient function (:func:`autograd` by default; EoT
      averaging over random draws and BPDA wrap here or around the model);
    - ``observe(out, obj, s, t) -> done or None``: the criterion and best-so-far bookkeeping on the
      iterate *before* step ``t``; returns a per-sample bool mask of finished samples (or None,
      and then the loop never synchronises);
    - ``step``: a rule with ``init(s)`` and ``__call__(s, g, t)`` updating ``s.v`` in place;
    - ``project``: a rule with ``init(s)`` and ``__call__(s)`` (in place);
    - ``after_step(s, t)``: per-step schedules (e.g. K-A3's weight continuation);
    - ``check_every``: how often finished samples leave the batch.

    ``final_observe=True`` judges the iterate after the last step too (a success found there is
    kept). Returns the active set; rows written back in ``s.outputs``.
    """

    def __init__(self, forward: Callable, objective: Callable, step, project=None, observe: Optional[Callable] = None,
                 grad: Callable = autograd, after_step: Optional[Callable] = None, check_every: int = 1,
                 final_observe: bool = False):
        self.forward, self.objective, self.step, self.project = forward, objective, step, project
        self.observe, self.grad, self.after_step = observe, grad, after_step
        self.check_every = check_positive_int(check_every, "check_every")
        self.final_observe = bool(final_observe)

    def _fn(self, s: ActiveSet):
        def fn(v):
            out = self.forward(s, v)
            return out, self.objective(out, s, v)
        return fn

    def run(self, s: ActiveSet, steps: int) -> ActiveSet:
        self.step.init(s)
        if self.project is not None:
            self.project.init(s)
        t = 0
        for t in range(1, steps + 1):
            g, out, obj = self.grad(self._fn(s), s.v)
            done = self.observe(out, obj, s, t) if self.observe is not None else None
            if done is not None and (t % self.check_every == 0 or t == steps) and bool(done.any()):
                # finished samples leave before the step, so what they return is the judged iterate
                s.g = g
                if not s.keep(~done):
                    return s
                g = s.pop("g")
            self.step(s, g, t)
            if self.project is not None:
                self.project(s)
            if self.after_step is not None:
                self.after_step(s, t)
        if self.final_observe and self.observe is not None and len(s):
            with torch.no_grad():
                out = self.forward(s, s.v)
                self.observe(out, self.objective(out, s, s.v), s, t + 1)
        s.write_back()
        return s
