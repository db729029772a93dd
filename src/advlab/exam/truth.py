"""The true robustness of a gallery entry: the strongest defense-aware attack advlab has for its
mechanism, with many steps and restarts, per-sample worst case, judged by the entry's own
decision. It knows what the evaluator is not told (which layers have no gradient and their
right approximation, where the logits are before the temperature, how random the model is).

- ``"bpda"``: BPDA through the entry's non-differentiable layers (the identity, or the entry's
  own smooth approximation: a soft thermometer);
- ``"eot"``: Expectation over Transformation with many draws;
- ``"logits"``: the attacks run on the logits before the temperature / log-softmax;
- ``"decision"``: the entry's decision made an adversarial column
  (:class:`~advlab.adaptive.AcceptedScores`: value = its ``predict``, gradient = its detector's),
  BPDA through the detector's non-differentiable layers, and targeted cross-entropy against every
  wrong class (a wrong class's confidence pushed up until the decision accepts it);
- controls (no mechanism): PGD and APGD with restarts on the model itself.

Every kind then runs the same set: PGD-CE (``steps`` steps, ``restarts`` restarts), APGD-CE and
APGD-DLR (``restarts`` restarts), APGD-T against every wrong class and, against a defense that
rejects, the targeted cross-entropy against every wrong class.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch
from torch import nn

from ..adaptive.bpda import BPDA, EoT
from ..adaptive.decision import AcceptedScores
from ..attacks import APGD, PGD
from ..attacks.logits import checked_predict, merge_reject
from ..eval.evaluate import targeted_ce_until_accepted
from ..eval.runner import AttackRun, survivor_chain

__all__ = ["true_robustness", "KINDS"]

KINDS = ("bpda", "eot", "logits", "decision", "control")


def _stand_in(defense: nn.Module, kind: str, info: Dict[str, object], eot_samples: int) -> nn.Module:
    if kind == "bpda":
        return BPDA(defense, layers=info["layers"], approx=info.get("approx"))
    if kind == "eot":
        return EoT(defense, samples=eot_samples)
    if kind == "logits":
        return getattr(defense, str(info.get("logits", "model")))
    if kind == "decision":
        inner = BPDA(defense, layers=info["layers"]) if info.get("layers") else defense
        return AcceptedScores(inner)
    return defense


def _targeted_ce_all(model, eps, norm, steps, restarts, classes, seed, judge):
    """The targeted CE stage against every wrong class, y + 1, y + 2, ... (seeds seed + 1, ...)."""
    def run(x, y):
        targets = torch.stack([(y + k) % classes for k in range(1, classes)], dim=1)
        return targeted_ce_until_accepted(model, x, y, targets, judge, eps, norm, steps, seed + 1, restarts=restarts)
    return run


def true_robustness(defense: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, info: Dict[str, object],
                    eps: float, norm: str = "inf", steps: int = 200, restarts: int = 3, eot_samples: int = 40,
                    seed: int = 0, batch_size: int = 256, progress: Optional[bool] = False) -> Dict[str, object]:
    """Run the true-robustness attack of ``kind`` (see the module docstring) on ``defense``;
    returns robust accuracy, the rejected share, "not fooled" (robust or rejected: one minus the
    attacker's success), how it was obtained, and the seconds."""
    t0 = time.perf_counter()
    stand = _stand_in(defense, kind, info, eot_samples)
    rejecting = kind == "decision" or bool(getattr(defense, "reject_column", False))
    scores = merge_reject if rejecting else None
    judge = lambda xb: checked_predict(defense, xb, where="on the attack's images")  # noqa: E731
    with torch.no_grad():
        classes = defense(x[:1]).shape[1] - (1 if getattr(defense, "reject_column", False) else 0)
    links: List[AttackRun] = []
    if not rejecting:
        links.append(AttackRun("PGD-CE", PGD(stand, eps=eps, norm=norm, steps=steps, alpha=2.5 * eps / steps,
                                             restarts=restarts, seed=seed)))
    links += [
        AttackRun("APGD-CE", APGD(stand, eps=eps, norm=norm, steps=steps, loss="ce", restarts=restarts, seed=seed,
                                  scores=scores)),
        AttackRun("APGD-DLR", APGD(stand, eps=eps, norm=norm, steps=steps, loss="dlr", restarts=restarts,
                                   seed=seed + 1, scores=scores)),
        AttackRun("APGD-T", APGD(stand, eps=eps, norm=norm, steps=steps, loss="dlr-targeted", seed=seed + 2,
                                 targeted_classes=classes - 1, scores=scores)),
    ]
    if rejecting:
        links.append(AttackRun("APGD-T-CE", _targeted_ce_all(stand, eps, norm, steps, restarts, classes, seed + 3,
                                                             judge)))
    chain = survivor_chain(links, x, y, judge, batch_size=batch_size, progress=progress)
    clean = chain.clean_pred
    correct = clean == y
    return {"robust_accuracy": chain.robust_accuracy,
            "detected": float((chain.detected & correct).double().mean()),
            "not_fooled": float((correct & (chain.robust | chain.detected)).double().mean()),
            "clean_accuracy": float(correct.double().mean()),
            "stages": dict(chain.stages),
            "how": f"{kind}: " + ", ".join(r.name for r in links)
                   + f" ({steps} steps, {restarts} restarts"
                   + (f", EoT {eot_samples} draws" if kind == "eot" else "") + "), per-sample worst case",
            "seconds": time.perf_counter() - t0}
