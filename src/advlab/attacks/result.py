"""The per-sample outcome of :meth:`advlab.attacks.Attack.run`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from .. import REJECT


@dataclass
class AttackResult:
    """Per-sample outcome of :meth:`Attack.run`, on the CPU.

    ``success`` follows the one success rule (:func:`advlab.metrics.is_success`: misclassified,
    or the target when targeted, and never ``advlab.REJECT``) unless an attack defines its own
    goal (K-A3: every target above the true label); ``detected`` marks the samples a defended
    model rejected; ``failed`` is neither. A detected sample is never a success, whatever the
    attack's criterion says.

    Rates (``success_rate``, ``summary()``) are over the samples the judge classified correctly
    when clean, as in the papers' tables; norms over the true successes among them.
    ``robust_accuracy`` is over all samples (a rejection is not a correct prediction)."""

    labels: torch.Tensor
    clean_pred: torch.Tensor
    adv_pred: torch.Tensor
    success: torch.Tensor
    l0: torch.Tensor
    l2: torch.Tensor
    linf: torch.Tensor
    seconds: float
    targets: Optional[torch.Tensor] = None
    detected: Optional[torch.Tensor] = None
    adversarials: Optional[torch.Tensor] = None
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.detected is None:
            self.detected = self.adv_pred == REJECT
        self.success = self.success.bool() & ~self.detected

    def __setattr__(self, name, value):
        # an attack-specific criterion set later (K-A3) still cannot count a rejection as a success
        if name == "success" and getattr(self, "detected", None) is not None:
            value = value.bool() & ~self.detected
        object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def failed(self) -> torch.Tensor:
        """Boolean (N,) mask of the samples neither broken nor rejected (``~success & ~detected``)."""
        return ~self.success & ~self.detected

    @property
    def counted(self) -> torch.Tensor:
        """The samples the rates are over: classified correctly when clean."""
        return self.clean_pred == self.labels

    @property
    def clean_accuracy(self) -> float:
        """Fraction of the samples the judge classified correctly when clean (NaN for an empty result)."""
        return float(self.counted.float().mean()) if len(self) else float("nan")

    @property
    def robust_accuracy(self) -> float:
        """Fraction of all samples still classified correctly on their adversarial (a rejection is not
        correct); NaN for an empty result."""
        return float((self.adv_pred == self.labels).float().mean()) if len(self) else float("nan")

    def _rate(self, mask: torch.Tensor) -> float:
        keep = self.counted
        return float(mask[keep].double().mean()) if bool(keep.any()) else float("nan")

    @property
    def success_rate(self) -> float:
        """Attack success rate: the fraction of the clean-correct samples broken (a rejection is never a
        success); NaN when no sample was clean-correct."""
        return self._rate(self.success)

    @property
    def detected_rate(self) -> float:
        """Fraction of the clean-correct samples whose adversarial the defended model rejected (``advlab.REJECT``)."""
        return self._rate(self.detected)

    @property
    def failed_rate(self) -> float:
        """Fraction of the clean-correct samples neither broken nor rejected."""
        return self._rate(self.failed)

    def summary(self) -> Dict[str, float]:
        """The headline numbers as a dict of floats: ``n``, ``clean_acc``, ``robust_acc``, ``asr``, ``failed``,
        ``detected`` (fractions in [0, 1], rates over the clean-correct samples), ``mean_l2``, ``median_l2``,
        ``mean_linf`` and ``mean_l0`` (pixel units in [0, 1] space, over the true successes only; NaN when
        there are none) and ``seconds`` (wall time of the run)."""
        ok = self.success & self.counted
        def med(t):
            return float(t[ok].median()) if bool(ok.any()) else float("nan")
        def mean(t):
            return float(t[ok].double().mean()) if bool(ok.any()) else float("nan")
        return {
            "n": len(self), "clean_acc": self.clean_accuracy, "robust_acc": self.robust_accuracy,
            "asr": self.success_rate, "failed": self.failed_rate, "detected": self.detected_rate,
            "mean_l2": mean(self.l2), "median_l2": med(self.l2), "mean_linf": mean(self.linf),
            "mean_l0": mean(self.l0), "seconds": self.seconds,
        }
