"""``evaluate``: the honest-evaluation battery for any classifier or defense.

>>> from advlab.eval import evaluate
>>> res = evaluate(model, x, y, norm="inf", eps=0.3, seed=0)
>>> res.clean_accuracy, res.robust_accuracy, res.per_attack, res.detected, res.flags, res.x_adv

In the spirit of AutoAttack's standard version (Croce & Hein 2020): APGD-CE, then APGD-T (the
targeted DLR loss against the 9 highest wrong classes by clean logit, 100 steps each), then
Square (score-based, no gradients, 5000 queries), each run only on the points every earlier
attack failed on; a sample counts as robust only if it is still classified correctly after all of
them (per-sample worst case).

``targets`` trades APGD-T's breadth for time. On the Madry-trained LeNet-5 of
``benchmarks/evaluate.py`` (500 MNIST images, L-inf 0.3) 9, 3 and 1 targets leave the same 410
images robust after the whole battery, and APGD-T's time is about proportional to the number of
targets (35 s of a 101 s battery at 9); but on the I-defender reproduction's defended MNIST model
3 targets leave 1 image of 83 robust that 9 targets break, so the default stays at the reference
AutoAttack's 9.

Before the attacks the model is checked for gradient masking (:mod:`advlab.eval.checks`), and
the battery adapts:

- exactly-zero input gradients from a non-differentiable layer (a quantiser, ``sign``): the
  gradient attacks run through :func:`advlab.adaptive.auto_bpda` (straight-through BPDA); the
  adversarials are still judged by the real model;
- randomized outputs (or a defense with ``randomized = True``): the gradient attacks run on
  :class:`advlab.adaptive.EoT` (gradients averaged over draws);
- a saturated softmax (probability or log-probability outputs): APGD-T's DLR loss is invariant
  to the scale of the scores, and Square needs no gradient;
- a defense whose ``predict`` may return ``advlab.REJECT`` and whose output has an adversarial
  column (``reject_column``): the attacks' goal is "be accepted as a wrong class"
  (:func:`advlab.attacks.logits.merge_reject`); robust accuracy counts correct predictions and the
  rejected share is reported as ``detected``.

Each warning sign becomes a :class:`~advlab.eval.checks.Flag` in ``res.flags`` with what it means.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .._util import (AdvlabError, check_eps_units, check_images, check_labels, check_positive_int,
                     format_eps, model_device, parse_eps, restore_train_modes, train_modes)
from ..attacks import APGD, FGSM, Square
from ..attacks.dtypes import model_dtype, to_input_dtype
from ..attacks.geometry import check_norm
from ..attacks.logits import check_output, checked_predict, merge_reject
from ..streaming import as_tensor
from .checks import Flag, attack_checks, eps_sweep_check, model_checks
from .runner import AttackRun, survivor_chain

__all__ = ["evaluate", "EvaluationResult", "BATTERY", "load_evaluated", "write_report"]

#: the stages of the standard battery, in order
BATTERY = ("APGD-CE", "APGD-T", "Square")


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured. Accuracies are fractions of all ``n`` images."""

    norm: str
    eps: float
    n: int
    clean_accuracy: float
    robust_accuracy: float
    #: robust accuracy after each stage of the battery (cumulative worst case), in order
    per_attack: Dict[str, float]
    #: fraction of the images whose worst-case adversarial the model rejects (0 without a detector)
    detected: float
    flags: List[Flag]
    #: per image: the adversarial that broke it, else the one the model rejected, else the image
    #: (on the CPU; a numpy array of x's dtype when x was one)
    x_adv: torch.Tensor
    #: per image: "robust", "broken", "detected" or "misclassified" (wrong when clean)
    status: List[str]
    seconds: Dict[str, float] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    #: robust accuracy of single attacks run on every image (the checks' evidence)
    standalone: Dict[str, float] = field(default_factory=dict)
    #: eps sweep of APGD (CE, or DLR when the checks flag masked CE gradients):
    #: {"eps": [...], "robust_accuracy": [...], "attack": ...}
    sweep: Optional[Dict[str, List[float]]] = None
    seed: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {"norm": self.norm, "eps": self.eps, "n": self.n, "seed": self.seed,
                "clean_accuracy": self.clean_accuracy, "robust_accuracy": self.robust_accuracy,
                "per_attack": self.per_attack, "detected": self.detected, "standalone": self.standalone,
                "flags": [f.to_dict() for f in self.flags], "notes": self.notes, "sweep": self.sweep,
                "seconds": self.seconds}

    def rows(self) -> List[Dict[str, Any]]:
        """One table row per stage: robust accuracy after it and what it broke."""
        out, before = [], self.clean_accuracy
        for name, acc in self.per_attack.items():
            out.append({"stage": name, "robust accuracy": acc, "broken by this stage": before - acc,
                        "seconds": self.seconds.get(name)})
            before = acc
        return out


def _attack_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, flags: List[Flag], randomized: bool,
                  eot_samples: int, bpda: str, notes: List[str]) -> nn.Module:
    """The model the gradient attacks differentiate: BPDA through gradient killers, EoT for
    randomness; the adversarials are always judged by ``model`` itself."""
    from ..adaptive.bpda import EoT, auto_bpda

    names = {f.name for f in flags}
    out = model
    if "zero-gradients" in names and bpda == "auto":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, layers = auto_bpda(model, x, y)
        if layers:
            notes.append(f"gradient attacks ran through BPDA (straight-through) on {', '.join(layers)}")
        for w in caught:
            notes.append(str(w.message))
    if randomized:
        out = EoT(out, samples=eot_samples)
        notes.append(f"gradient attacks ran on EoT (gradients averaged over {eot_samples} draws)")
    return out


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str = "inf", eps: float = 0.3,
             seed: int = 0, steps: int = 100, square_queries: int = 5000, targets: int = 9,
             attacks: Sequence[str] = BATTERY,
             batch_size: int = 256, sweep: Optional[Sequence[float]] = None, checks: bool = True,
             bpda: str = "auto", eot_samples: int = 10, progress: Optional[bool] = None) -> EvaluationResult:
    """Evaluate ``model`` (any ``nn.Module`` giving logits, or a :class:`advlab.defenses.Defense`)
    on ``(x, y)`` under the ``norm`` ball of radius ``eps``; see the module docstring.

    ``attacks``: the stages, a subset of ``("APGD-CE", "APGD-T", "Square")`` in any order;
    ``steps``: APGD iterations; ``square_queries``: Square's budget per image; ``targets``: the
    number of wrong classes APGD-T runs against (highest clean logit first); ``sweep``: extra
    eps values for the accuracy-vs-eps curve (APGD at each, plus ``eps`` itself); ``checks``:
    run the masking checks (model and numbers); ``bpda``: "auto" (straight-through through the
    layers that kill the gradient when the checks find zero gradients) or "off".

    ``x`` and ``y`` may be numpy arrays (float32/float64 NCHW images in [0, 1], integer labels):
    ``res.x_adv`` is then a numpy array of ``x``'s dtype. Images whose dtype differs from the
    model's are attacked in the model's dtype; ``x_adv`` is brought back to theirs and projected
    onto the ball around them. The model's first output is checked (2-D, finite)."""
    as_numpy = isinstance(x, np.ndarray)
    x = as_tensor(x, "x")
    y = as_tensor(y, "y", "class indices of shape (N,)")
    check_images(x, "x")
    norm = check_norm(norm)
    eps = parse_eps(eps, "eps")  # a number, or text such as "8/255"
    steps = check_positive_int(steps, "steps")
    square_queries = check_positive_int(square_queries, "square_queries")
    targets = check_positive_int(targets, "targets")
    batch_size = check_positive_int(batch_size, "batch_size")
    eot_samples = check_positive_int(eot_samples, "eot_samples")
    if sweep is not None:  # checked before any work (a bad value would otherwise fail after the battery)
        if isinstance(sweep, (str, bytes)) or not hasattr(sweep, "__iter__"):
            raise AdvlabError(f"sweep must be a sequence of eps values (finite numbers >= 0), got {sweep!r}")
        sweep = [parse_eps(e, "sweep eps") for e in sweep]
    if x.shape[0] == 0:
        raise AdvlabError("x is an empty batch")
    if not isinstance(model, nn.Module):
        raise AdvlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if bpda not in ("auto", "off"):
        raise AdvlabError(f"bpda must be 'auto' or 'off', got {bpda!r}")
    unknown = [a for a in attacks if a not in BATTERY]
    if unknown or not attacks:
        raise AdvlabError(f"attacks must be a non-empty subset of {', '.join(BATTERY)}; unknown: {unknown}")
    t_all = time.perf_counter()
    check_eps_units(eps, norm, x.shape[1:])  # 8 meant as 8/255: a warning that says so
    dev = model_device(model)
    x, y = x.detach().cpu(), y.detach().cpu()
    x_given, mdt = x, model_dtype(model)
    if mdt is not None and mdt != x.dtype:  # float64 numpy images, a float32 model
        x = x.to(mdt)
    with torch.no_grad():
        was = train_modes(model)
        model.eval()
        try:
            nc = check_output(model(x[:1].to(dev)), 1)
        finally:
            restore_train_modes(was)
    reject_column = bool(getattr(model, "reject_column", False))
    check_labels(y, x.shape[0], nc - 1 if reject_column else nc, "y")
    # the model's own decision, REJECT allowed; an output that turns NaN on an adversarial is an error
    judge = lambda xb: checked_predict(model, xb, where="on the attack's images")  # noqa: E731
    n = x.shape[0]
    clean = judge(x)
    flags: List[Flag] = []
    notes: List[str] = []
    seconds: Dict[str, float] = {}
    probe = torch.arange(min(n, 128))
    if checks:
        t0 = time.perf_counter()
        flags += model_checks(model, x[probe], y[probe], batch_size=batch_size)
        seconds["checks"] = time.perf_counter() - t0
    randomized = bool(getattr(model, "randomized", False)) or any(f.name == "randomized" for f in flags)
    grad_model = _attack_model(model, x[probe], y[probe], flags, randomized, eot_samples, bpda, notes)
    scores = merge_reject if reject_column else None
    if reject_column:
        notes.append("the attacks' goal is 'be accepted as a wrong class' (the adversarial column is merged into "
                     "the true class)")

    def build(name: str, budget: float):
        if name == "APGD-CE":
            return APGD(grad_model, eps=budget, norm=norm, steps=steps, loss="ce", seed=seed, scores=scores)
        if name == "APGD-T":
            return APGD(grad_model, eps=budget, norm=norm, steps=steps, loss="dlr-targeted", seed=seed,
                        targeted_classes=min(targets, (nc - 1 if reject_column else nc) - 1), scores=scores)
        return Square(model, eps=budget, norm=norm, queries=square_queries, seed=seed, scores=scores)

    links = [AttackRun(name, build(name, eps)) for name in attacks] if eps > 0 else []
    chain = survivor_chain(links, x, y, judge, clean=clean, batch_size=batch_size, progress=progress)
    seconds.update(chain.seconds)
    per_attack = dict(chain.stages) if links else {name: float((clean == y).double().mean()) for name in attacks}
    standalone: Dict[str, float] = {}
    if "APGD-CE" in chain.results and len(chain.ran_on["APGD-CE"]) == n:
        standalone["APGD-CE"] = chain.results["APGD-CE"].robust_accuracy
    broken, detected, x_adv = ~chain.robust & ~chain.detected, chain.detected, chain.x_adv
    code = torch.where(clean != y, 3, torch.where(broken, 1, torch.where(detected, 2, 0)))
    status = [("robust", "broken", "detected", "misclassified")[c] for c in code.tolist()]

    if checks and eps > 0:
        t0 = time.perf_counter()
        fgsm = FGSM(grad_model, eps=eps) if norm == "inf" else None
        robust = dict(standalone)
        if fgsm is not None:
            robust["FGSM"] = fgsm.run((x, y), batch_size=batch_size, predict_fn=judge, progress=False).robust_accuracy
        gradient_stages = [a for a in attacks if a != "Square"]
        if "Square" in attacks and gradient_stages:
            robust["white-box battery"] = per_attack[gradient_stages[-1]]
            robust["Square"] = per_attack["Square"]
        flags += attack_checks(robust, single_step=("FGSM",), iterative=("APGD-CE", "white-box battery"),
                               black_box=("Square",), tol=0.02)
        standalone.update({k: v for k, v in robust.items() if k in ("FGSM",)})
        seconds["attack checks"] = time.perf_counter() - t0
    sweep_out = None
    if sweep:
        t0 = time.perf_counter()
        grid = sorted({float(e) for e in sweep} | {float(eps)})
        accs = []
        # the scale-invariant DLR loss where the checks found a saturated or masked CE gradient
        masked = {f.name for f in flags} & {"zero-gradients", "probability-outputs", "log-probability-outputs"}
        loss = "dlr" if masked else "ce"
        for e in grid:
            res = APGD(grad_model, eps=e, norm=norm, steps=steps, loss=loss, seed=seed, scores=scores).run(
                (x, y), batch_size=batch_size, predict_fn=judge, progress=False)
            accs.append(res.robust_accuracy)
        sweep_out = {"eps": grid, "robust_accuracy": accs, "attack": f"APGD-{loss.upper()}"}
        if checks and len(grid) >= 2:
            flags += eps_sweep_check(grid, accs)
        seconds["sweep"] = time.perf_counter() - t0
    if x is not x_given:
        x_adv = to_input_dtype(x_adv, x, x_given, eps, norm)
    if as_numpy:
        x_adv = x_adv.numpy()
    seconds["total"] = time.perf_counter() - t_all
    robust_acc = per_attack[attacks[-1]] if per_attack else float("nan")
    return EvaluationResult(norm=norm, eps=eps, n=n, clean_accuracy=float((clean == y).double().mean()),
                            robust_accuracy=robust_acc, per_attack=per_attack,
                            detected=float(detected.double().mean()), flags=flags, x_adv=x_adv, status=status,
                            seconds=seconds, notes=notes, standalone=standalone, sweep=sweep_out, seed=seed)



def load_evaluated(path, device=None, **options) -> nn.Module:
    """Any model the one loader reads (:func:`advlab.models.inputs.open_model`: an advlab checkpoint,
    a saved defense of the :data:`advlab.defenses.DEFENSES` registry, a torch.export program,
    TorchScript, ``module:factory`` with ``weights=``), weights-only; ``options`` are
    :func:`advlab.models.load_model`'s (weights, mean, std, num_classes)."""
    from .. import defenses  # noqa: F401 - registers the saved defenses' formats with the model loader
    from ..models.inputs import open_model

    return open_model(path, device=device, **options).model


def write_report(res: EvaluationResult, out_dir, name: str = "advlab evaluate", reported: Optional[float] = None,
                 spec: Optional[Dict[str, Any]] = None, model: Optional[Dict[str, Any]] = None):
    """``results.json`` (RobustBench style: clean, each stage, the worst case, the reported number
    beside ours, flags, versions, seed), ``report.md`` and the accuracy-vs-eps PNG."""
    from .figures import line_chart
    from .report import Report

    rep = Report(out_dir, name, spec=spec or {}, seed=res.seed)
    threat = f"L{'-inf' if res.norm == 'inf' else '2'} eps={format_eps(res.eps)}, white-box adaptive battery"
    rep.add_text(f"Threat model: {threat}; {res.n} images. Clean accuracy **{100 * res.clean_accuracy:.2f}%**, "
                 f"robust accuracy **{100 * res.robust_accuracy:.2f}%** (per-sample worst case over "
                 f"{', '.join(res.per_attack)})" + (f", reported {100 * reported:.2f}%" if reported is not None else "")
                 + (f"; {100 * res.detected:.2f}% of the images end rejected by the detector" if res.detected else "")
                 + ".")
    if model:
        rep.add_text(f"Model: {model.get('format')} `{model.get('source')}`"
                     + (f" with weights `{model['weights']}`" if model.get("weights") else "")
                     + (f"; the loader: {'; '.join(model['notes'])}" if model.get("notes") else "") + ".")
    rep.add_table("Battery (robust accuracy after each stage)", res.rows())
    if res.flags:
        rep.add_table("Gradient-masking flags", [f.to_dict() for f in res.flags], ["name", "message", "meaning"],
                      note="A flag means the number above may be an artefact of the attack failing; see its meaning.")
    else:
        rep.add_text("No gradient-masking flag: zero gradients, probability outputs, randomness, single-step "
                     "beating iterative, black-box beating white-box and the eps sweep all look normal.")
    if res.notes:
        rep.add_text("What the battery adapted: " + "; ".join(res.notes) + ".")
    if res.sweep:
        rep.add_table("Accuracy vs eps", [{"eps": e, "robust accuracy": a} for e, a in
                                          zip(res.sweep["eps"], res.sweep["robust_accuracy"])],
                      note=f"{res.sweep['attack']} at each eps (one attack: an upper bound on the battery's number).")
        rep.add_figure("accuracy-vs-eps", line_chart({res.sweep["attack"]: (res.sweep["eps"],
                                                                              res.sweep["robust_accuracy"])},
                                                     title="robust accuracy vs eps", xlabel="eps",
                                                     ylabel="robust accuracy"), "robust accuracy against eps")
    rep.results.update(res.to_dict())
    rep.results["robust_accuracy_reported"] = reported
    rep.results["threat_model"] = threat
    rep.results["eps_255"] = res.eps * 255.0
    if model:
        rep.results["model"] = model
    rep.time("total", res.seconds.get("total", 0.0))
    return rep.save()
