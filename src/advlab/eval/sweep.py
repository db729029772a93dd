"""``eps_sweep``: robust accuracy against the perturbation budget in one call (foolbox's
``epsilons=[...]``).

>>> from advlab.eval import eps_sweep
>>> sw = eps_sweep("pgd", model, x, y, epsilons=[0.05, 0.1, 0.2, 0.3], seed=0, steps=40)
>>> sw.robust_accuracy, sw.success_rate, sw.detected
>>> sw.figure().savefig("accuracy-vs-eps.png")

Two ways to get the curve, chosen from the attack:

- a fixed-budget attack (one that takes ``eps``: fgsm, pgd, apgd, square, ...) is built afresh
  at every eps with the same ``seed`` and run through :meth:`advlab.attacks.Attack.run`, judged by
  ``predict_fn`` or the model's own decision (a defense's ``advlab.REJECT`` counts as detected,
  never as a success). Each point is what that attack measured at that eps, so the curve is not
  forced to be monotone: a point above a smaller eps's is a weak attack's sign (see
  :func:`advlab.eval.checks.eps_sweep_check`). At eps = 0 the ball is the image itself and the
  point is the clean accuracy (no attack is run).
- a minimum-norm attack (``norm`` None: cw, deepfool, lbfgs, jsma, ka3) runs once; a sample is
  broken at eps when the attack succeeded with a perturbation of norm <= eps. The norm
  (``threshold_norm``) is L2 for C&W, DeepFool and L-BFGS (the norm they minimise) and for any
  other such attack, L0 (changed pixel positions, a count) for JSMA, whose perturbation is
  sparse; "inf" thresholds on the L-inf norm instead. One run instead of one per eps, and robust
  accuracy is non-increasing in eps by construction.

``robust_accuracy`` is over all images (correct after the attack; a rejection is not correct),
``success_rate`` and ``detected`` over the images classified correctly when clean, as in
:class:`~advlab.attacks.AttackResult`.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .._util import AdvlabError, check_images, check_labels
from ..attacks.base import Attack
from ..attacks.dtypes import model_dtype
from ..attacks.logits import checked_predict
from ..attacks.registry import attack_parameters, build_attack
from ..attacks.result import AttackResult
from ..metrics.robustness import is_success
from ..streaming import as_tensor

__all__ = ["eps_sweep", "SweepResult", "check_epsilons", "sweeps_figure"]

_NORM_NAMES = {"0": "L0", "2": "L2", "inf": "L-inf"}


@dataclass
class SweepResult:
    """What :func:`eps_sweep` measured, one entry per eps (ascending, pixel units): ``robust_accuracy``
    (fraction of all images), ``success_rate`` and ``detected`` (fractions of the clean-correct
    images), with the ``attack``, its ``norm``, the ``method`` ("per-eps" or "threshold"), and the
    runs' :class:`~advlab.attacks.AttackResult` s in ``results``."""

    attack: str
    #: the norm eps is measured in: the attack's ("inf", "2"), or the thresholded one ("0", "2", "inf")
    norm: str
    #: "per-eps" (a fixed-budget attack run at each eps) or "threshold" (one minimum-norm run)
    method: str
    epsilons: List[float]
    #: fraction of all images classified correctly after the attack at each eps
    robust_accuracy: List[float]
    #: fraction of the clean-correct images the attack broke at each eps
    success_rate: List[float]
    #: fraction of the clean-correct images whose adversarial the model rejected at each eps
    detected: List[float]
    clean_accuracy: float
    n: int
    #: the runs: one :class:`AttackResult` per eps ("per-eps"), or the single run ("threshold")
    results: List[AttackResult] = field(default_factory=list, repr=False)
    seconds: float = 0.0
    params: Dict[str, Any] = field(default_factory=dict)
    seed: Optional[int] = 0

    @property
    def label(self) -> str:
        """A display name for the curve, e.g. ``"pgd (L-inf)"`` or ``"deepfool (L2, thresholded)"``."""
        how = ", thresholded" if self.method == "threshold" else ""
        return f"{self.attack} ({_NORM_NAMES.get(self.norm, self.norm)}{how})"

    def rows(self) -> List[Dict[str, Any]]:
        """One table row per eps."""
        return [{"attack": self.attack, "norm": _NORM_NAMES.get(self.norm, self.norm), "eps": e,
                 "robust accuracy": a, "success rate": s, "detected": d}
                for e, a, s, d in zip(self.epsilons, self.robust_accuracy, self.success_rate, self.detected)]

    def figure(self, title: str = "robust accuracy vs eps"):
        """A matplotlib line chart of robust accuracy against eps."""
        return sweeps_figure([self], title=title)

    def to_dict(self) -> Dict[str, Any]:
        """Every field as plain JSON-ready data (eps values in pixel units, accuracies and rates as fractions)."""
        return {"attack": self.attack, "norm": self.norm, "method": self.method, "epsilons": list(self.epsilons),
                "robust_accuracy": list(self.robust_accuracy), "success_rate": list(self.success_rate),
                "detected": list(self.detected), "clean_accuracy": self.clean_accuracy, "n": self.n,
                "seed": self.seed, "params": dict(self.params), "seconds": self.seconds}


def sweeps_figure(sweeps: Sequence[SweepResult], title: str = "robust accuracy vs eps"):
    """One line per sweep (several attacks on one chart), drawn by :func:`advlab.eval.figures.line_chart`."""
    from .figures import line_chart

    norms = sorted({_NORM_NAMES.get(s.norm, s.norm) for s in sweeps})
    series = {s.label: (s.epsilons, s.robust_accuracy) for s in sweeps}
    return line_chart(series, title=title, xlabel=f"eps ({', '.join(norms)})", ylabel="robust accuracy")


def check_epsilons(epsilons, name: str = "epsilons") -> List[float]:
    """``epsilons`` as a sorted list of distinct floats: a non-empty sequence (list, tuple, numpy
    array, tensor; a single number is one eps) of finite numbers >= 0."""
    if isinstance(epsilons, (str, bytes)) or epsilons is None or isinstance(epsilons, bool):
        raise AdvlabError(f"{name} must be a non-empty list of numbers >= 0, got {epsilons!r}")
    if hasattr(epsilons, "tolist"):  # numpy arrays, tensors
        epsilons = epsilons.tolist()
    if isinstance(epsilons, (int, float)):
        epsilons = [epsilons]
    try:
        values = list(epsilons)
    except TypeError:
        raise AdvlabError(f"{name} must be a non-empty list of numbers >= 0, got {type(epsilons).__name__}") from None
    if not values:
        raise AdvlabError(f"{name} is empty: give at least one eps")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise AdvlabError(f"{name} must hold numbers, got {v!r}")
        f = float(v)
        if not math.isfinite(f) or f < 0:
            raise AdvlabError(f"{name} must be finite and >= 0, got {v!r}")
        out.append(f)
    return sorted(set(out))


def _threshold_norm(norm, atk: Attack) -> str:
    from ..attacks import JSMA

    if norm is None:
        return "0" if isinstance(atk, JSMA) else "2"
    key = str(norm).lower().replace("l", "").replace("-", "")
    if key in ("0", "2", "inf"):
        return key
    raise AdvlabError(f"threshold_norm must be '0', '2' or 'inf', got {norm!r}")


def _builder(attack, model: nn.Module):
    """``(label, build(**kw), accepted parameter names or None for any)`` of a registry name, an
    attack class or a factory ``factory(model, eps=..., seed=..., **params)``."""
    if isinstance(attack, str):
        return attack, (lambda **kw: build_attack(attack, model, **kw)), attack_parameters(attack)
    if isinstance(attack, Attack):
        return type(attack).__name__, None, set()
    if callable(attack):
        label = getattr(attack, "__name__", type(attack).__name__)
        try:
            sig = inspect.signature(attack)
        except (TypeError, ValueError):
            return label, (lambda **kw: attack(model, **kw)), None
        params = sig.parameters.values()
        accepted = None if any(p.kind is p.VAR_KEYWORD for p in params) else {p.name for p in params}
        return label, (lambda **kw: attack(model, **kw)), accepted
    raise AdvlabError(f"attack must be a registered attack name, an Attack class or a factory "
                      f"factory(model, eps=..., **params), got {type(attack).__name__}")


def eps_sweep(attack: Union[str, Callable[..., Attack], Attack], model: nn.Module, x, y,
              epsilons: Sequence[float] = (0.05, 0.1, 0.2, 0.3), seed: Optional[int] = 0, batch_size: int = 256,
              predict_fn: Optional[Callable] = None, targets=None, threshold_norm: Optional[str] = None,
              progress: Optional[bool] = None, **attack_params) -> SweepResult:
    """Attack ``(x, y)`` at every eps of ``epsilons`` and return the accuracy-vs-eps curve (see
    the module docstring for the two methods).

    ``attack``: a name of the registry (:data:`advlab.attacks.ATTACKS`, built by
    :func:`advlab.attacks.build_attack`), an attack class, or a factory called as
    ``factory(model, eps=eps, seed=seed, **attack_params)`` (``eps`` and ``seed`` only if it takes
    them); for a minimum-norm attack also an instance. ``x``, ``y`` (and ``targets``) may be
    tensors or numpy arrays. ``epsilons``: finite numbers >= 0, sorted and deduplicated in the
    result. ``seed``: every eps's attack gets the same seed, so one eps equals a direct
    ``build_attack(name, model, eps=eps, seed=seed).run((x, y))``. ``predict_fn(x) -> labels``
    judges the adversarials (default: the model's ``predict`` or argmax). ``threshold_norm``
    ("2", "inf", "0"; minimum-norm attacks only) overrides the norm that is thresholded.

    ``batch_size``: images per attack batch; ``progress``: tqdm bars (default: on a terminal).
    Returns a :class:`SweepResult`; raises ``AdvlabError`` on bad input."""
    eps_list = check_epsilons(epsilons)
    if "eps" in attack_params:
        raise AdvlabError("give the budgets as epsilons=[...], not eps=")
    if not isinstance(model, nn.Module):
        raise AdvlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x = as_tensor(x, "x")
    y = as_tensor(y, "y", "class indices of shape (N,)")
    targets = as_tensor(targets, "targets", "class indices of shape (N,)")
    check_images(x, "x")
    if x.shape[0] == 0:
        raise AdvlabError("x is an empty batch")
    check_labels(y, x.shape[0], None, "y")
    label, build, accepted = _builder(attack, model)

    def kwargs(**extra):
        kw = dict(attack_params)
        if seed is not None and (accepted is None or "seed" in accepted):
            kw["seed"] = seed
        kw.update(extra)
        return kw

    t0 = time.perf_counter()
    takes_eps = build is not None and (accepted is None or "eps" in accepted)
    run_kw = dict(batch_size=batch_size, targets=targets, predict_fn=predict_fn, progress=progress)
    params = dict(attack_params)
    if not takes_eps:  # a minimum-norm attack: one run, thresholded
        atk = attack if build is None else build(**kwargs())
        if atk.norm is not None:
            raise AdvlabError(f"{label} is a fixed-budget attack (L{atk.norm}) but takes no eps; pass its name, its "
                              "class or a factory taking eps=, so that it can be built at each eps")
        tnorm = _threshold_norm(threshold_norm, atk)
        res = atk.run((x, y), **run_kw)
        size = {"0": res.l0, "2": res.l2, "inf": res.linf}[tnorm].double()
        counted = res.counted
        wrong = res.adv_pred != res.labels
        rob, suc, det = [], [], []
        for e in eps_list:
            within = size <= e
            rob.append(float((counted & ~(within & wrong)).float().mean()))  # as AttackResult.robust_accuracy
            if bool(counted.any()):
                suc.append(float((res.success & within)[counted].double().mean()))
                det.append(float((res.detected & within)[counted].double().mean()))
            else:
                suc.append(float("nan"))
                det.append(float("nan"))
        return SweepResult(attack=label, norm=tnorm, method="threshold", epsilons=eps_list, robust_accuracy=rob,
                           success_rate=suc, detected=det, clean_accuracy=res.clean_accuracy, n=len(res),
                           results=[res], seconds=time.perf_counter() - t0, params=params, seed=seed)
    if threshold_norm is not None:
        raise AdvlabError("threshold_norm applies to minimum-norm attacks (cw, deepfool, lbfgs, jsma) only; "
                          f"{label} takes eps and is run at each eps")
    results: List[AttackResult] = []
    norm = None
    for e in eps_list:
        if e == 0:  # the ball is the image itself
            results.append(_clean_result(model, x, y, targets, predict_fn))
            continue
        atk = build(**kwargs(eps=e))
        if atk.norm is None:
            raise AdvlabError(f"{label} takes eps but has no threat-model norm; eps_sweep needs a fixed-budget "
                              "attack (norm 'inf' or '2') or a minimum-norm one (no eps)")
        norm = atk.norm
        results.append(atk.run((x, y), **run_kw))
    if norm is None:  # only eps = 0: the norm of the attack at any budget
        norm = getattr(build(**kwargs(eps=1.0)), "norm", None) or "inf"
    return SweepResult(attack=label, norm=norm, method="per-eps", epsilons=eps_list,
                       robust_accuracy=[r.robust_accuracy for r in results],
                       success_rate=[r.success_rate for r in results], detected=[r.detected_rate for r in results],
                       clean_accuracy=results[0].clean_accuracy, n=len(results[0]), results=results,
                       seconds=time.perf_counter() - t0, params=params, seed=seed)


def _clean_result(model: nn.Module, x: torch.Tensor, y: torch.Tensor, targets, predict_fn) -> AttackResult:
    """The :class:`AttackResult` of the zero budget: every adversarial is its clean image."""
    if predict_fn is None:
        mdt = model_dtype(model)
        pred = checked_predict(model, x if mdt is None or mdt == x.dtype else x.to(mdt))
    else:
        pred = predict_fn(x).cpu()
    yc = y.cpu()
    zeros = torch.zeros(x.shape[0], dtype=x.dtype)
    return AttackResult(labels=yc, clean_pred=pred, adv_pred=pred,
                        success=is_success(pred, yc, None if targets is None else targets.cpu()),
                        l0=torch.zeros(x.shape[0], dtype=torch.long), l2=zeros, linf=zeros.clone(), seconds=0.0,
                        targets=None if targets is None else targets.cpu())
