"""The one evaluation runner: attacks under named threat models, one row definition, the
per-sample worst case.

Used by ``advlab attack``, the demo, ``advlab defend`` and every reproduction, so every report
computes its numbers the same way:

- an :class:`AttackRun` is an attack built on its *source* model plus the name of its threat
  model: ``white-box`` (the attacked model itself), ``transfer`` (crafted on another model, e.g.
  a defense's surrogate, and fed to the attacked one), ``full-knowledge`` / ``adaptive`` (an
  attack that knows the defense, e.g. :class:`advlab.adaptive.MSVDDFullKnowledge`);
- :func:`run_attacks` runs each through :meth:`Attack.run`, judged by the attacked model's own
  decision (``predict``, which may return ``advlab.REJECT``: a detection, never a success), and
  keeps the per-sample worst case: a sample counts as robust only if every attack failed on it;
- :func:`survivor_chain` is the one chain of attacks: each runs only on the images every earlier
  one failed on; it gives the per-sample worst case and the robust accuracy after each link (the
  :func:`advlab.eval.evaluate` battery and the reproductions' adaptive rows are chains);
- :func:`result_row` is the one table row: clean and robust accuracy, ASR split into success /
  failed / detected over the clean-correct samples, norms and SSIM / MS-SSIM / MSE over the true
  successes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._util import AdvlabError, check_positive_int
from ..attacks.base import Attack
from ..attacks.result import AttackResult
from ..metrics.robustness import is_success, perturbation_norms
from ..train import predict

#: threat-model labels used in reports
THREATS = ("white-box", "transfer", "full-knowledge", "adaptive", "black-box")


def pick_images(model: nn.Module, dataset, n: Optional[int] = None, only_correct: bool = False, seed: int = 0,
                predict_fn: Optional[Callable] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` test images drawn by a seeded permutation; with ``only_correct`` the first ``n`` of that
    order which the model classifies correctly (as the papers attack)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(dataset.labels), generator=g)
    x, y = dataset.images[perm], dataset.labels[perm]
    if only_correct:
        pred = (predict_fn or (lambda xb: predict(model, xb)))(x)
        keep = pred.cpu() == y
        x, y = x[keep], y[keep]
    if n is not None:
        if n < 1:
            raise AdvlabError(f"n must be >= 1, got {n}")
        x, y = x[:n], y[:n]
    return x, y


def random_targets(y: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """One seeded random target != y per sample (the papers' targeted protocol)."""
    g = torch.Generator().manual_seed(seed)
    return (y.cpu() + torch.randint(1, num_classes, y.shape, generator=g)) % num_classes


def similarity_scores(x: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> Dict[str, float]:
    """Mean SSIM, MS-SSIM (inputs of 32 px or more) and per-pixel MSE over the ``mask`` rows."""
    from ..metrics import similarity as sim

    if not bool(mask.any()):
        return {"ssim": float("nan"), "ms_ssim": float("nan"), "mse": float("nan")}
    xs, xa = x[mask], adv[mask]
    out = {"ssim": float(sim.ssim(xs, xa).double().mean()), "mse": float(sim.mse(xs, xa).double().mean())}
    out["ms_ssim"] = float(sim.ms_ssim(xs, xa).double().mean()) if min(x.shape[-2:]) >= 11 else float("nan")
    return out


def result_row(name: str, res: AttackResult, x: Optional[torch.Tensor] = None,
               threat: str = "white-box") -> Dict[str, float]:
    """One table row: clean accuracy, robust accuracy, ASR with its failed / detected split over the
    clean-correct samples, mean / median L2, mean L-inf / L0 and (with ``x`` and the kept
    adversarials) SSIM / MS-SSIM / MSE, all over the true successes among them."""
    row = {"attack": name, "threat model": threat, **res.summary()}
    if x is not None and res.adversarials is not None:
        row.update(similarity_scores(x, res.adversarials, res.success & res.counted))
    return row


def rejudge(res: AttackResult, x: torch.Tensor, judge: Callable[[torch.Tensor], torch.Tensor],
            untargeted: bool = False) -> AttackResult:
    """The same adversarials judged by another decision (e.g. a defense at another threshold, or
    the defended model after crafting on its surrogate): predictions and success recomputed.
    ``untargeted``: success is "a wrong class" even for a targeted attack (the papers' ASR)."""
    if res.adversarials is None:
        raise AdvlabError("rejudge needs the adversarials: run the attack with keep_adversarials=True")
    targets = None if untargeted else res.targets
    clean, adv = judge(x).cpu(), judge(res.adversarials).cpu()
    return AttackResult(labels=res.labels, clean_pred=clean, adv_pred=adv,
                        success=is_success(adv, res.labels, targets), l0=res.l0, l2=res.l2, linf=res.linf,
                        seconds=res.seconds, targets=targets, adversarials=res.adversarials,
                        extras=dict(res.extras))


def adversarial_result(x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, judge: Callable,
                       seconds: float = 0.0, targets: Optional[torch.Tensor] = None) -> AttackResult:
    """An :class:`AttackResult` for adversarials made elsewhere (a transfer set, another tool)."""
    norms = perturbation_norms((x_adv - x).cpu())
    clean, adv = judge(x).cpu(), judge(x_adv).cpu()
    return AttackResult(labels=y.cpu(), clean_pred=clean, adv_pred=adv, success=is_success(adv, y.cpu(), targets),
                        seconds=seconds, targets=targets, adversarials=x_adv.cpu(), **norms)


def result_state(res: AttackResult) -> Dict[str, object]:
    """``res`` as plain data (its fields), what a stage stores; ``AttackResult(**state)`` rebuilds it."""
    return {f.name: getattr(res, f.name) for f in fields(res)}


@dataclass
class AttackRun:
    """One attack of an evaluation: built on its source model, labelled with its threat model.
    In a :func:`survivor_chain`, ``attack`` may also be any function ``(x, y) -> x_adv`` (another
    chain, a batched attack call), judged by the chain's judge."""

    name: str
    attack: Union[Attack, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    threat: str = "white-box"
    targets: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.threat not in THREATS:
            raise AdvlabError(f"threat must be one of {', '.join(THREATS)}, got {self.threat!r}")


@dataclass
class Evaluation:
    """Rows and results of :func:`run_attacks`, plus the per-sample worst case."""

    rows: List[Dict[str, float]]
    results: Dict[str, AttackResult]
    seconds: float = 0.0
    worst: Optional[AttackResult] = None
    extras: Dict[str, object] = field(default_factory=dict)

    def worst_row(self, name: str = "worst case", threat: str = "all of the above") -> Dict[str, float]:
        """The table row (:func:`result_row`) of the per-sample worst case over every attack run."""
        return result_row(name, self.worst, threat=threat)

    def to_state(self) -> Dict[str, object]:
        """Plain data (rows, each result's tensors, seconds) that :meth:`from_state` rebuilds the
        evaluation from: what a resumable reproduction stores (:mod:`advlab.eval.stages`)."""
        return {"rows": self.rows, "seconds": self.seconds, "extras": self.extras,
                "results": {n: result_state(r) for n, r in self.results.items()}}

    @classmethod
    def from_state(cls, state: Dict[str, object]) -> "Evaluation":
        """Rebuild an evaluation from :meth:`to_state`'s plain data (the worst case is recomputed)."""
        results = {n: AttackResult(**r) for n, r in state["results"].items()}
        return cls(list(state["rows"]), results, float(state["seconds"]),
                   worst_case(results.values()) if results else None, dict(state.get("extras") or {}))


def worst_case(results: Sequence[AttackResult]) -> AttackResult:
    """Per-sample worst case over several attacks on the same images: a sample is a success if any
    attack succeeded on it (that attack's adversarial is kept), robust only if every attack left it
    correctly classified, detected if no attack succeeded and one was rejected."""
    results = list(results)
    if not results:
        raise AdvlabError("worst_case needs at least one result")
    base = results[0]
    success = torch.stack([r.success for r in results])
    wrong = torch.stack([r.adv_pred != r.labels for r in results])
    detected = torch.stack([r.detected for r in results])
    # per sample, the attack whose outcome is the worst for the defender: a success first, then a
    # wrong (e.g. missed-target) prediction, then a rejection, else the first attack
    score = 4 * success.int() + 2 * (wrong & ~detected).int() + detected.int()
    pick = score.argmax(0)
    rows = torch.arange(len(base))

    def take(name):
        vals = [getattr(r, name) for r in results]
        if any(v is None for v in vals):
            return None
        return torch.stack(vals)[pick, rows]

    return AttackResult(labels=base.labels, clean_pred=base.clean_pred, adv_pred=take("adv_pred"),
                        success=success.any(0), l0=take("l0"), l2=take("l2"), linf=take("linf"),
                        seconds=sum(r.seconds for r in results), detected=take("detected") & ~success.any(0),
                        adversarials=take("adversarials"), extras={"attack_index": pick})


def not_fooled(res: AttackResult) -> float:
    """Fraction of all images classified correctly when clean and not turned into a success by the
    attack (robust or rejected): one minus the attacker's success, the quantity the attack-outcome
    checks compare where a defense can reject (robust accuracy alone counts a rejection as a loss
    for the defender)."""
    return float((res.counted & ~res.success).double().mean()) if len(res) else float("nan")


def outcome_checks(runs: Sequence[AttackRun], results: Dict[str, AttackResult], tol: float = 0.02) -> list:
    """The attack-outcome checks (:func:`advlab.eval.checks.attack_checks`: single-step beating
    iterative, black-box or transfer beating every white-box attack) on untargeted attacks run on
    the same images, comparing :func:`not_fooled`; the groups come from each run's threat model
    (``transfer``, ``black-box``; the rest white-box) and its attack (FGSM is single-step, the
    other gradient attacks iterative)."""
    from ..attacks import FGSM
    from .checks import attack_checks

    robust: Dict[str, float] = {}
    groups: Dict[str, List[str]] = {"single_step": [], "iterative": [], "black_box": [], "transfer": []}
    for run in runs:
        if run.name not in results or run.targets is not None:
            continue
        robust[run.name] = not_fooled(results[run.name])
        if run.threat == "transfer":
            groups["transfer"].append(run.name)
        elif run.threat == "black-box":
            groups["black_box"].append(run.name)
        elif isinstance(run.attack, FGSM):
            groups["single_step"].append(run.name)
        elif getattr(run.attack, "steps", 1) > 1:
            groups["iterative"].append(run.name)
    if len(robust) < 2:
        return []
    return attack_checks(robust, tol=tol, **groups)


def run_attacks(runs: Sequence[AttackRun], x: torch.Tensor, y: torch.Tensor, judge: Optional[Callable] = None,
                batch_size: int = 256, progress: Optional[bool] = None, keep_adversarials: bool = True,
                log: Callable[[str], None] = lambda msg: None) -> Evaluation:
    """Run every attack on (x, y), judged by ``judge(x) -> labels`` (the attacked model's decision,
    ``advlab.REJECT`` allowed; default: each attack's own model). Returns an :class:`Evaluation`
    with one :func:`result_row` per attack and the per-sample worst case over all of them."""
    batch_size = check_positive_int(batch_size, "batch_size")
    rows, results = [], {}
    t0 = time.perf_counter()
    for run in runs:
        if run.name in results:
            raise AdvlabError(f"two attacks are named {run.name!r}")
        res = run.attack.run((x, y), batch_size=batch_size, targets=run.targets, keep_adversarials=keep_adversarials,
                             progress=progress, predict_fn=judge)
        results[run.name] = res
        rows.append(result_row(run.name, res, x if keep_adversarials else None, run.threat))
        log(f"  {run.name} ({run.threat}): ASR {100 * rows[-1]['asr']:.1f}%, robust accuracy "
            f"{100 * rows[-1]['robust_acc']:.1f}%, {res.seconds:.1f} s")
    ev = Evaluation(rows, results, time.perf_counter() - t0)
    if results:
        ev.worst = worst_case(results.values())
    return ev


@dataclass
class Chain:
    """The outcome of :func:`survivor_chain` on ``n`` images.

    ``stages``: robust accuracy after each link (cumulative, in order); ``results``: each link's
    :class:`AttackResult` over the images it ran on (``ran_on``: their indices); ``robust`` /
    ``detected``: per-sample masks after the last link (a detected image is not robust);
    ``x_adv``: per sample, the adversarial that broke it, else the last one a detector rejected,
    else the clean image; ``worst``: all of it as one :class:`AttackResult` over the ``n`` images."""

    stages: Dict[str, float]
    results: Dict[str, AttackResult]
    ran_on: Dict[str, torch.Tensor]
    seconds: Dict[str, float]
    clean_pred: torch.Tensor
    robust: torch.Tensor
    detected: torch.Tensor
    x_adv: torch.Tensor
    worst: AttackResult

    @property
    def robust_accuracy(self) -> float:
        """Fraction of the chain's images left robust after every link (NaN for an empty chain)."""
        return float(self.robust.double().mean()) if len(self.robust) else float("nan")


def survivor_chain(runs: Sequence[AttackRun], x: torch.Tensor, y: torch.Tensor, judge: Callable,
                   start: Optional[AttackResult] = None, clean: Optional[torch.Tensor] = None,
                   batch_size: int = 256, progress: Optional[bool] = None,
                   log: Callable[[str], None] = lambda msg: None) -> Chain:
    """Run ``runs`` in order, each only on the images that every earlier link (and ``start``)
    failed on, all judged by ``judge(x) -> labels`` (``advlab.REJECT`` allowed).

    An image is *broken* once a link makes the judge give it a wrong class (a rejection is a
    detection: the image stays in the chain, and a later link may still break it); without
    ``start`` the clean-misclassified images count as broken from the outset; with ``start`` (an
    earlier result on all of ``x``, e.g. the :func:`worst_case` of attacks run on every image)
    exactly the images whose adversarial there was classified correctly or rejected go on. ``clean``: the
    judge's labels for ``x`` when the caller has them already (a randomized judge is then not
    asked twice). An :class:`Attack` link runs through :meth:`Attack.run` (its targets indexed
    along); a function link ``(x, y) -> x_adv`` is judged here. Returns a :class:`Chain`."""
    batch_size = check_positive_int(batch_size, "batch_size")
    x, y = x.cpu(), y.cpu()
    n = x.shape[0]
    if clean is None:
        clean = judge(x).cpu() if start is None else start.clean_pred
    detected = torch.zeros(n, dtype=torch.bool)
    if start is None:
        broken, x_adv, adv_pred = clean != y, x.clone(), clean.clone()
    else:
        # a rejection in ``start`` is a detection, as in a link: not broken (never a success), stays in
        broken, adv_pred = (start.adv_pred != y) & ~start.detected, start.adv_pred.clone()
        detected = start.detected.clone()
        x_adv = start.adversarials.clone() if start.adversarials is not None else x.clone()
    stages: Dict[str, float] = {}
    results: Dict[str, AttackResult] = {}
    ran_on: Dict[str, torch.Tensor] = {}
    seconds: Dict[str, float] = {}
    for run in runs:
        if run.name in results or run.name in stages:
            raise AdvlabError(f"two links of the chain are named {run.name!r}")
        idx = (~broken).nonzero().squeeze(1)
        if idx.numel():
            t0 = time.perf_counter()
            if isinstance(run.attack, Attack):
                tg = None if run.targets is None else run.targets[idx]
                res = run.attack.run((x[idx], y[idx]), batch_size=batch_size, targets=tg, keep_adversarials=True,
                                     progress=progress, predict_fn=judge)
            else:
                res = adversarial_result(x[idx], y[idx], run.attack(x[idx], y[idx]), judge)
            seconds[run.name] = res.seconds = time.perf_counter() - t0
            hit = res.adv_pred != res.labels
            newly, rejected = hit & ~res.detected, res.detected & ~detected[idx]
            x_adv[idx[rejected]] = res.adversarials[rejected]
            adv_pred[idx[rejected]] = res.adv_pred[rejected]
            detected[idx[rejected]] = True
            x_adv[idx[newly]] = res.adversarials[newly]
            adv_pred[idx[newly]] = res.adv_pred[newly]
            broken[idx[newly]] = True
            detected[idx[newly]] = False
            results[run.name], ran_on[run.name] = res, idx
        stages[run.name] = float((~broken & ~detected & (clean == y)).double().mean()) if n else float("nan")
        log(f"  {run.name} ({run.threat}): robust accuracy {100 * stages[run.name]:.1f}% after it"
            + (f", {seconds[run.name]:.1f} s on {idx.numel()} images" if run.name in seconds else ""))
    robust = ~broken & ~detected & (clean == y)
    norms = perturbation_norms((x_adv - x).double())
    worst = AttackResult(labels=y, clean_pred=clean, adv_pred=adv_pred, success=broken & (clean == y),
                         seconds=sum(seconds.values()), detected=detected, adversarials=x_adv,
                         **{k: v.float() for k, v in norms.items()})
    return Chain(stages, results, ran_on, seconds, clean, robust, detected, x_adv, worst)
