"""``evaluate``: the honest-evaluation battery for any classifier or defense.

>>> from advlab.eval import evaluate
>>> res = evaluate(model, x, y, norm="inf", eps=0.3, seed=0)
>>> res.clean_accuracy, res.robust_accuracy, res.per_attack, res.detected, res.flags, res.x_adv

AutoAttack's standard version (Croce & Hein 2020): APGD-CE, then APGD-T (the targeted DLR loss
against the 9 highest wrong classes by clean logit, 100 steps each), then FAB-T (9 targets, 100
steps), then Square (score-based, no gradients, 5000 queries), each run only on the points every
earlier attack failed on; a sample counts as robust only if it is still classified correctly
after all of them (per-sample worst case).

``targets`` trades APGD-T's breadth for time. On the Madry-trained LeNet-5 of
``benchmarks/evaluate.py`` (500 MNIST images, L-inf 0.3) 9, 3 and 1 targets leave the same 410
images robust after the whole battery, and APGD-T's time is about proportional to the number of
targets (35 s of a 101 s battery at 9); but on the I-defender reproduction's defended MNIST model
3 targets leave 1 image of 83 robust that 9 targets break, so the default stays at the reference
AutoAttack's 9.

Before the attacks the model is checked for gradient masking (:mod:`advlab.eval.checks`), and
the battery adapts:

- exactly-zero input gradients from a non-differentiable layer (a quantiser, ``sign``): the
  gradient attacks run through :func:`advlab.adaptive.auto_bpda` (straight-through BPDA, or the
  smoothed value table of an element-wise layer that changes the shape, a thermometer
  encoding); the adversarials are still judged by the real model;
- randomized outputs (or a defense with ``randomized = True``): the gradient attacks run on
  :class:`advlab.adaptive.EoT` (gradients averaged over draws, more draws while two estimates
  of the gradient disagree);
- a saturated softmax (probability or log-probability outputs): APGD-T's DLR loss is invariant
  to the scale of the scores, and Square needs no gradient;
- a defense whose ``predict`` may return ``advlab.REJECT``: the attacks' goal is "be accepted as
  a wrong class" (:func:`advlab.attacks.logits.merge_reject`), on its adversarial column
  (``reject_column``) or, without one, on its own decision made a column
  (:class:`advlab.adaptive.AcceptedScores`: the value is ``predict``, the gradient that of
  ``detect`` when it has one, BPDA through the layers that kill the detector's gradient); a
  targeted cross-entropy stage (APGD-T-CE) pushes a wrong class's confidence up until the decision
  accepts it, and Square attacks the decision without gradients. Robust accuracy counts correct
  predictions and the rejected share is reported as ``detected``; the number checks compare the
  attacker's success (accepted as a wrong class), and ``"rejections-absorbed"`` says when most
  of what the attacks moved ended rejected;
- any masking flag, or Square breaking an image every gradient stage left (a sign below the
  flag's tolerance), escalates the battery: the survivors are attacked again, from new random
  starts (FAB-T's too), with the DLR loss beside CE and twice Square's queries, round after round
  until one breaks nothing new (``escalate`` rounds at most; ``res.rounds``).

Each warning sign becomes a :class:`~advlab.eval.checks.Flag` in ``res.flags`` with what it means.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .. import REJECT
from .._util import (AdvlabError, check_eps_units, check_images, check_labels, check_positive_int,
                     format_eps, model_device, parse_eps, restore_train_modes, train_modes)
from ..attacks import APGD, FGSM, Square
from ..attacks.dtypes import model_dtype, to_input_dtype
from ..attacks.geometry import check_norm
from ..attacks.logits import check_output, checked_predict, merge_reject
from ..streaming import as_tensor
from ..adaptive.decision import AcceptedScores, can_reject, has_detector
from .checks import Flag, attack_checks, eps_sweep_check, model_checks
from .runner import AttackRun, not_fooled, survivor_chain

__all__ = ["evaluate", "EvaluationResult", "BATTERY", "load_evaluated", "write_report"]

#: the stages of the standard battery, in order (AutoAttack's standard version)
BATTERY = ("APGD-CE", "APGD-T", "FAB-T", "Square")
#: every stage ``attacks=`` may name: the battery's, and the targeted cross-entropy (confidence-
#: maximising) stage that joins it after APGD-T for a defense that can reject
STAGES = BATTERY + ("APGD-T-CE",)


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured. Accuracies are fractions of all ``n`` images, in [0, 1].

    ``norm`` / ``eps`` (pixel units), ``n``, ``seed``: the threat model and the run; ``clean_accuracy``,
    ``robust_accuracy`` (the per-sample worst case over every stage); ``per_attack``: the robust
    accuracy after each stage, in order; ``detected``: the share whose worst-case adversarial the
    model rejects; ``flags``: the masking :class:`~advlab.eval.checks.Flag` s; ``x_adv``: per image
    the adversarial that broke it, else the one rejected, else the image; ``status``: per image
    "robust", "broken", "detected" or "misclassified"; ``notes`` (what the battery did),
    ``standalone``, ``sweep``, ``rounds`` (escalation), ``seconds`` (per stage)."""

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
    #: the escalation rounds a masking flag set off: per round the attacks, their budgets, how many
    #: more images it broke or got rejected, the robust accuracy after it
    rounds: List[Dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """Every field as plain JSON-ready data (what ``results.json`` stores): the threat model, accuracies
        (fractions of all ``n`` images), stages, flags, notes, sweep, escalation rounds and seconds."""
        return {"norm": self.norm, "eps": self.eps, "n": self.n, "seed": self.seed,
                "clean_accuracy": self.clean_accuracy, "robust_accuracy": self.robust_accuracy,
                "per_attack": self.per_attack, "detected": self.detected, "standalone": self.standalone,
                "flags": [f.to_dict() for f in self.flags], "notes": self.notes, "sweep": self.sweep,
                "rounds": self.rounds, "seconds": self.seconds}

    def rows(self) -> List[Dict[str, Any]]:
        """One table row per stage: robust accuracy after it and what it broke."""
        out, before = [], self.clean_accuracy
        for name, acc in self.per_attack.items():
            out.append({"stage": name, "robust accuracy": acc, "broken by this stage": before - acc,
                        "seconds": self.seconds.get(name)})
            before = acc
        return out


#: the flags after which the battery attacks the survivors again, harder (every flag but the informational)
ESCALATING = ("zero-gradients", "probability-outputs", "log-probability-outputs", "randomized",
              "detector-zero-gradients", "rejects-inputs", "single-step-beats-iterative", "black-box-beats-white-box")


def _not_fooled_after(chain, stage: str, clean: torch.Tensor, y: torch.Tensor) -> float:
    """:func:`_not_fooled` of the survivor chain's links up to and including ``stage``."""
    fooled = clean != y
    for name, res in chain.results.items():
        fooled[chain.ran_on[name][res.success | ((res.adv_pred != res.labels) & ~res.detected)]] = True
        if name == stage:
            break
    return float((~fooled).double().mean())


def targeted_ce_until_accepted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor, judge,
                               eps: float, norm: str, steps: int, seed: int, restarts: int = 1) -> torch.Tensor:
    """APGD with the targeted cross-entropy (the target's confidence pushed up until the defense's
    decision ``judge`` accepts it as that wrong class) against each column of ``targets`` (N, T) in
    turn (seed ``seed + j`` for column j), each on the images no earlier column broke: the
    confidence-maximising stage for defenses that reject. Returns the adversarials (the clean image
    where none was accepted as a wrong class)."""
    out, todo = x.clone(), torch.arange(x.shape[0])
    for j in range(targets.shape[1]):
        if todo.numel() == 0:
            break
        atk = APGD(model, eps=eps, norm=norm, steps=steps, loss="ce", seed=seed + j, restarts=restarts,
                   scores=merge_reject)
        adv = atk.perturb(x[todo], y[todo], target=targets[todo, j])
        pred = judge(adv)
        hit = (pred != y[todo]) & (pred != REJECT)
        out[todo[hit]] = adv[hit]
        todo = todo[~hit]
    return out


def _targeted_ce(model: nn.Module, eps: float, norm: str, steps: int, targets: int, seed: int,
                 judge) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """:func:`targeted_ce_until_accepted` against the ``targets`` wrong classes highest by clean
    score (the battery's APGD-T-CE stage)."""
    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dev = model_device(model)
        with torch.no_grad():
            z = merge_reject(model(x.to(dev)), y.to(dev)).cpu()
        order = z.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)
        return targeted_ce_until_accepted(model, x, y, order[:, :targets], judge, eps, norm, steps, seed)
    return run


class _DetectOut(nn.Module):
    """The detector's score as a one-column output, to find the layers that kill its gradient."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.detect(x)[:, None]


def _detector_killers(model: nn.Module, x: torch.Tensor) -> List[str]:
    """The layers inside ``model`` through which the gradient of its ``detect`` score dies."""
    from ..adaptive.bpda import find_gradient_killers

    prefix = "model."
    try:
        found = find_gradient_killers(_DetectOut(model), x)
    except AdvlabError:
        return []
    return [n[len(prefix):] for n in found if n.startswith(prefix)]


def _eot_agreement(model: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int) -> float:
    """Mean cosine similarity of two independent EoT gradient estimates (``samples`` draws each)
    of the CE loss on ``x``: near 1 when that many draws average the randomness out."""
    from ..adaptive.bpda import EoT

    dev = model_device(model)
    eot = EoT(model, samples=samples)
    grads = []
    was = train_modes(model)
    model.eval()
    try:
        with torch.enable_grad():
            for _ in range(2):
                xd = x.detach().to(dev).requires_grad_(True)
                out = eot(xd)
                out = out[:, :-1] if getattr(model, "reject_column", False) else out
                (g,) = torch.autograd.grad(nn.functional.cross_entropy(out, y.to(dev), reduction="sum"), xd)
                grads.append(g.flatten(1))
    finally:
        restore_train_modes(was)
    return float(nn.functional.cosine_similarity(grads[0], grads[1], dim=1, eps=1e-30).mean())


def _attack_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, flags: List[Flag], randomized: bool,
                  eot_samples: int, bpda: str, notes: List[str], rejecting: bool) -> nn.Module:
    """The model the gradient attacks differentiate: BPDA through gradient killers (of the scores
    and of a detector's score), the defense's decision as an adversarial column when it rejects,
    EoT for randomness, with more draws while two estimates of the gradient disagree; the
    adversarials are always judged by ``model`` itself."""
    from ..adaptive.bpda import BPDA, EoT, auto_bpda
    from ..adaptive.decision import AcceptedScores, has_detector

    names = {f.name for f in flags}
    out = model
    if "zero-gradients" in names and bpda == "auto":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, layers = auto_bpda(model, x, y)
        if layers:
            approx = [n for n in layers if out._approx.get(n) is not None]
            notes.append(f"gradient attacks ran through BPDA on {', '.join(layers)}"
                         + (f" (smoothed value tables for {', '.join(approx)}, straight-through for the rest)"
                            if approx else " (straight-through)"))
        for w in caught:
            notes.append(str(w.message))
    if rejecting and bpda == "auto" and has_detector(model):
        killers = _detector_killers(model, x)
        if killers:
            flags.append(Flag(
                "detector-zero-gradients",
                f"the detector's score passes no gradient through {', '.join(killers)}",
                "an attacker who differentiates the detector gets no signal through these layers, so a white-box "
                "attack on the detector is blind there; the attacks differentiate them as the identity (BPDA)"))
            layers = list(getattr(out, "layer_names", ())) + [k for k in killers if k not in getattr(out, "layer_names", ())]
            approx = dict(getattr(out, "_approx", {}))
            out = BPDA(model, layers=layers, approx={n: approx.get(n) for n in layers})
            notes.append(f"the detector's score is differentiated through BPDA on {', '.join(killers)}")
    if rejecting:
        out = AcceptedScores(out)
    if randomized:
        samples = eot_samples
        agreement = _eot_agreement(out, x[:32], y[:32], samples)
        while agreement < 0.75 and samples < 4 * eot_samples:
            samples *= 2
            agreement = _eot_agreement(out, x[:32], y[:32], samples)
        out = EoT(out, samples=samples)
        notes.append(f"gradient attacks ran on EoT (gradients averaged over {samples} draws; two estimates agree "
                     f"at cosine {agreement:.2f})")
    return out


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str = "inf", eps: float = 0.3,
             seed: int = 0, steps: int = 100, square_queries: int = 5000, targets: int = 9,
             attacks: Sequence[str] = BATTERY,
             batch_size: int = 256, sweep: Optional[Sequence[float]] = None, checks: bool = True,
             bpda: str = "auto", eot_samples: int = 10, escalate: int = 3,
             progress: Optional[bool] = None) -> EvaluationResult:
    """Evaluate ``model`` (any ``nn.Module`` giving logits, or a :class:`advlab.defenses.Defense`)
    on ``(x, y)`` under the ``norm`` ball of radius ``eps``; see the module docstring.

    ``attacks``: the stages, a subset of :data:`STAGES` in any order (``"APGD-T-CE"`` joins after
    APGD-T by itself against a defense that can reject); ``steps``: APGD and FAB iterations;
    ``square_queries``: Square's budget per image; ``targets``: the number of wrong classes the
    targeted stages run against (highest clean score first); ``sweep``: extra eps values for the
    accuracy-vs-eps curve (APGD at each, plus ``eps`` itself); ``checks``: run the masking checks
    (model and numbers); ``bpda``: "auto" (BPDA through the layers that kill the gradient when the
    checks find zero gradients, and through those of a detector's score) or "off";
    ``eot_samples``: the draws EoT averages at first (doubled, up to 4 times, while two estimates
    of the gradient disagree); ``escalate``: at most this many extra rounds when a masking flag is
    raised or Square broke what the gradient stages left (0: none).

    ``x`` and ``y`` may be numpy arrays (float32/float64 NCHW images in [0, 1], integer labels):
    ``res.x_adv`` is then a numpy array of ``x``'s dtype. Images whose dtype differs from the
    model's are attacked in the model's dtype; ``x_adv`` is brought back to theirs and projected
    onto the ball around them. The model's first output is checked (2-D, finite).

    ``seed``: every random start and draw (the same seed gives the same numbers on the same
    machine); ``batch_size``: images per attack batch; ``progress``: tqdm bars (default: on a
    terminal). Returns an :class:`EvaluationResult`; raises ``AdvlabError`` on bad input (shapes,
    values outside [0, 1], a negative eps, an unknown stage)."""
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
    unknown = [a for a in attacks if a not in STAGES]
    if unknown or not attacks:
        raise AdvlabError(f"attacks must be a non-empty subset of {', '.join(STAGES)}; unknown: {unknown}")
    if isinstance(escalate, bool) or not isinstance(escalate, int) or escalate < 0:
        raise AdvlabError(f"escalate must be a number of rounds >= 0, got {escalate!r}")
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
    classes = nc - 1 if reject_column else nc
    rejecting = not reject_column and can_reject(model, x[probe], clean[probe])
    if rejecting and checks:
        flags.append(Flag(
            "rejects-inputs",
            f"the defense's decision rejects {100 * float((clean == REJECT).double().mean()):.1f}% of the clean images"
            + (" and it has a detector (detect)" if has_detector(model) else ""),
            "the robust accuracy counts only correct decisions and the rejections are reported as detected; the "
            "battery aims at 'accepted as a wrong class' through the defense's own decision (its predict as an "
            "adversarial column, its detector's gradient where it has one, confidence-maximising targeted losses)"))
    grad_model = _attack_model(model, x[probe], y[probe], flags, randomized, eot_samples, bpda, notes, rejecting)
    scores = merge_reject if (reject_column or rejecting) else None
    # Square needs no gradient: it attacks the decision itself (through the column when the defense rejects)
    query_model = AcceptedScores(model) if rejecting else model
    if reject_column or rejecting:
        notes.append("the attacks' goal is 'be accepted as a wrong class' (the "
                     + ("defense's decision as an adversarial column, " if rejecting else "adversarial column ")
                     + "merged into the true class)")
    attacks = tuple(attacks)
    if (rejecting or reject_column) and "APGD-T" in attacks and "APGD-T-CE" not in attacks:
        at = attacks.index("APGD-T") + 1
        attacks = attacks[:at] + ("APGD-T-CE",) + attacks[at:]

    def build(name: str, budget: float, seed: int = seed, queries: int = square_queries, again: bool = False):
        if name == "APGD-CE":
            return APGD(grad_model, eps=budget, norm=norm, steps=steps, loss="ce", seed=seed, scores=scores)
        if name == "APGD-T":
            return APGD(grad_model, eps=budget, norm=norm, steps=steps, loss="dlr-targeted", seed=seed,
                        targeted_classes=min(targets, classes - 1), scores=scores)
        if name == "APGD-DLR":
            return APGD(grad_model, eps=budget, norm=norm, steps=steps, loss="dlr", seed=seed, scores=scores)
        if name == "APGD-T-CE":
            return _targeted_ce(grad_model, budget, norm, steps, min(targets, classes - 1), seed, judge)
        if name == "FAB-T":
            from ..attacks import FAB

            # the first run from the clean image; an escalation round's from a random start (seeded)
            return FAB(grad_model, eps=budget, norm=norm, steps=steps, targeted_classes=min(targets, classes - 1),
                       seed=seed, scores=scores, random_start=again)
        return Square(query_model, eps=budget, norm=norm, queries=queries, seed=seed, scores=scores)

    links = [AttackRun(name, build(name, eps)) for name in attacks] if eps > 0 else []
    chain = first = survivor_chain(links, x, y, judge, clean=clean, batch_size=batch_size, progress=progress)
    seconds.update(chain.seconds)
    per_attack = dict(chain.stages) if links else {name: float((clean == y).double().mean()) for name in attacks}
    standalone: Dict[str, float] = {}
    if "APGD-CE" in first.results and len(first.ran_on["APGD-CE"]) == n:
        standalone["APGD-CE"] = first.results["APGD-CE"].robust_accuracy
    if checks and eps > 0:
        t0 = time.perf_counter()
        fgsm = FGSM(grad_model, eps=eps) if norm == "inf" else None
        # against a defense that can reject, the checks compare the attacker's success (accepted as a
        # wrong class): robust accuracy alone counts a rejection as a win for the attack
        outcome = not_fooled if (rejecting or reject_column) else (lambda r: r.robust_accuracy)
        robust = {k: outcome(first.results[k]) for k in standalone}
        if fgsm is not None:
            robust["FGSM"] = outcome(fgsm.run((x, y), batch_size=batch_size, predict_fn=judge, progress=False))
        gradient_stages = [a for a in attacks if a != "Square"]
        if "Square" in attacks and gradient_stages and links:
            robust["white-box battery"] = _not_fooled_after(first, gradient_stages[-1], clean, y)
            robust["Square"] = _not_fooled_after(first, "Square", clean, y)
        flags += attack_checks(robust, single_step=("FGSM",), iterative=("APGD-CE", "white-box battery"),
                               black_box=("Square",), tol=0.02)
        standalone.update({k: v for k, v in robust.items() if k in ("FGSM",)})
        seconds["attack checks"] = time.perf_counter() - t0
    rounds: List[Dict[str, Any]] = []
    masking = [f for f in flags if f.name in ESCALATING]
    # Square breaking what every gradient stage left (even within the flag's tolerance) says the
    # gradients mislead there: escalate without a flag (AutoAttack's own check warns from 0.2%)
    square_extra = int(round(n * (robust.get("white-box battery", 0.0) - robust.get("Square", 0.0)))) \
        if checks and eps > 0 else 0
    if links and escalate and (masking or square_extra > 0):
        # a warning sign: attack the survivors again, harder, until a round breaks nothing new
        for r in range(1, escalate + 1):
            t0 = time.perf_counter()
            # a new random start of every stage (FAB-T's too; the other loss, DLR, beside CE) and twice
            # Square's queries
            names = list(attacks)
            if "APGD-CE" in names:
                names.insert(names.index("APGD-CE") + 1, "APGD-DLR")
            more = [AttackRun(f"{a} (round {r})", build(a, eps, seed=seed + 1000 * r, queries=square_queries * 2,
                                                        again=True)) for a in names]
            before = chain.robust.clone()
            chain = survivor_chain(more, x, y, judge, start=chain.worst, clean=clean, batch_size=batch_size,
                                   progress=progress)
            newly = int((before & ~chain.robust).sum())
            per_attack[f"round {r}"] = chain.robust_accuracy
            rounds.append({"round": r, "attacks": [m.name for m in more], "seed": seed + 1000 * r,
                           "square_queries": square_queries * 2, "newly_broken_or_rejected": newly,
                           "robust_accuracy": chain.robust_accuracy, "seconds": time.perf_counter() - t0})
            seconds[f"round {r}"] = time.perf_counter() - t0
            if newly == 0:
                break
        why = (f"masking flags ({', '.join(f.name for f in masking)})" if masking else
               f"Square breaking {square_extra} image(s) every gradient stage left")
        notes.append(f"{why} escalated the battery: "
                     + "; ".join(f"round {d['round']} (new random starts, FAB-T from a random point, APGD-DLR, Square "
                                 f"{d['square_queries']} "
                                 f"queries) moved {d['newly_broken_or_rejected']} more image(s)" for d in rounds))
    broken, detected, x_adv = ~chain.robust & ~chain.detected, chain.detected, chain.x_adv
    code = torch.where(clean != y, 3, torch.where(broken, 1, torch.where(detected, 2, 0)))
    status = [("robust", "broken", "detected", "misclassified")[c] for c in code.tolist()]
    if checks and links and (rejecting or reject_column):
        moved = int(((clean == y) & ~chain.robust).sum())
        absorbed = int(((clean == y) & detected).sum())
        if absorbed and absorbed >= 0.5 * moved:
            flags.append(Flag(
                "rejections-absorbed",
                f"{absorbed} of the {moved} correctly classified images the attacks moved end rejected, not "
                "accepted as a wrong class",
                "the defense's number rests on its rejections: the attacks found adversarials but the decision "
                "rejected them; an attacker who knows the detector may get them accepted (attack the detector's "
                "score, or its decision without gradients), so read 'detected' as an upper bound on what it "
                "catches"))

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
    # the worst case after the last stage, or after the last escalation round
    robust_acc = list(per_attack.values())[-1] if per_attack else float("nan")
    return EvaluationResult(norm=norm, eps=eps, n=n, clean_accuracy=float((clean == y).double().mean()),
                            robust_accuracy=robust_acc, per_attack=per_attack,
                            detected=float(detected.double().mean()), flags=flags, x_adv=x_adv, status=status,
                            seconds=seconds, notes=notes, standalone=standalone, sweep=sweep_out, seed=seed,
                            rounds=rounds)



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
