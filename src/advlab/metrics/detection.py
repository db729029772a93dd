"""Detection metrics: ROC curve and AUC (scikit-learn's ``roc_curve`` / ``roc_auc_score``), the
balanced accuracy of a thresholded decision, and the true-positive rate at a given false-positive
rate. Pure functions of per-sample scores (tensors, arrays or lists); larger scores mean "more
likely adversarial", natural samples are the negatives and adversarial ones the positives.

>>> auc = detection_auc(defense.detect(x_nat), defense.detect(x_adv))
>>> fpr, tpr, thr = roc(s_nat, s_adv)
>>> balanced_accuracy(flag_nat, flag_adv)       # booleans: True = flagged as adversarial
>>> tpr_at_fpr(s_nat, s_adv, 0.05)
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .._util import AdvlabError

__all__ = ["roc", "detection_auc", "balanced_accuracy", "tpr_at_fpr"]


def _scores(s, name: str, allow_empty: bool = False) -> np.ndarray:
    if s is None or isinstance(s, (str, bytes, dict)):
        raise AdvlabError(f"{name} must be per-sample scores (a tensor, array or list of numbers), got "
                          f"{type(s).__name__}")
    try:
        if hasattr(s, "detach"):
            s = s.detach().cpu().double().numpy()
        a = np.asarray(s, dtype=np.float64).reshape(-1) if not isinstance(s, np.ndarray) else \
            s.astype(np.float64).ravel()
    except (TypeError, ValueError, RuntimeError) as e:
        raise AdvlabError(f"{name} must be per-sample scores (numbers): {e}") from None
    if a.size == 0 and not allow_empty:
        raise AdvlabError(f"{name} is empty: a detection metric needs at least one score")
    if np.isnan(a).any():
        raise AdvlabError(f"{name} contains NaN scores")
    return a


def _labelled(natural, adversarial) -> Tuple[np.ndarray, np.ndarray]:
    n, a = _scores(natural, "natural"), _scores(adversarial, "adversarial")
    # +-inf scores are legal (a point far off every mixture); sklearn needs finite values and
    # only the order matters, so they are mapped just beyond the finite range
    both = np.concatenate([n, a])
    fin = both[np.isfinite(both)]
    lo, hi = (fin.min(), fin.max()) if fin.size else (0.0, 0.0)
    span = max(hi - lo, 1.0)
    both = np.where(np.isposinf(both), hi + span, np.where(np.isneginf(both), lo - span, both))
    return np.concatenate([np.zeros(n.size), np.ones(a.size)]), both


def roc(natural, adversarial) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of the detector whose scores are ``natural`` (negatives) and
    ``adversarial`` (positives), from :func:`sklearn.metrics.roc_curve`."""
    from sklearn.metrics import roc_curve

    y, s = _labelled(natural, adversarial)
    fpr, tpr, thr = roc_curve(y, s)
    return fpr, tpr, thr


def detection_auc(natural, adversarial) -> float:
    """Area under the ROC curve (:func:`sklearn.metrics.roc_auc_score`): the probability that an
    adversarial sample scores above a natural one (ties count one half)."""
    from sklearn.metrics import roc_auc_score

    y, s = _labelled(natural, adversarial)
    return float(roc_auc_score(y, s))


def balanced_accuracy(natural_flagged, adversarial_flagged) -> float:
    """Balanced accuracy of a thresholded decision: the mean of the true-negative rate on the
    natural samples (not flagged) and the true-positive rate on the adversarial ones (flagged).
    Inputs are booleans (or 0/1), True meaning "flagged as adversarial"; equal to the accuracy on
    a balanced set whatever the two counts are."""
    n = _scores(natural_flagged, "natural_flagged")
    a = _scores(adversarial_flagged, "adversarial_flagged")
    if not (np.isin(n, (0.0, 1.0)).all() and np.isin(a, (0.0, 1.0)).all()):
        raise AdvlabError("balanced_accuracy takes boolean decisions (True = flagged as adversarial)")
    return float(0.5 * ((1.0 - n.mean()) + a.mean()))


def tpr_at_fpr(natural, adversarial, fpr: float) -> float:
    """The largest true-positive rate on the ROC curve whose false-positive rate is at most
    ``fpr`` (in [0, 1])."""
    if not (0.0 <= float(fpr) <= 1.0):
        raise AdvlabError(f"fpr must be in [0, 1], got {fpr}")
    f, t, _ = roc(natural, adversarial)
    ok = f <= float(fpr) + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0
