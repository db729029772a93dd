"""Detection metrics: ROC curve and AUC (scikit-learn's ``roc_curve`` / ``roc_auc_score``) with its
standard error, the balanced accuracy of a thresholded decision, and the true-positive rate at a
given false-positive rate. Pure functions of per-sample scores (tensors, arrays or lists); larger
scores mean "more likely adversarial", natural samples are the negatives and adversarial ones the
positives.

>>> auc = detection_auc(defense.detect(x_nat), defense.detect(x_adv))
>>> fpr, tpr, thr = roc(s_nat, s_adv)
>>> balanced_accuracy(flag_nat, flag_adv)       # booleans: True = flagged as adversarial
>>> tpr_at_fpr(s_nat, s_adv, 0.05)
>>> auc_standard_error(auc, len(x_nat), len(x_adv))   # Hanley & McNeil
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from .._util import AdvlabError

__all__ = ["roc", "detection_auc", "auc_standard_error", "balanced_accuracy", "tpr_at_fpr"]


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


def detection_auc(natural, adversarial, allow_empty: bool = False) -> Optional[float]:
    """Area under the ROC curve (:func:`sklearn.metrics.roc_auc_score`): the probability that an
    adversarial sample scores above a natural one (ties count one half). ``allow_empty``: None
    when either set has no score (e.g. no adversarial fooled the model), instead of an error."""
    from sklearn.metrics import roc_auc_score

    if allow_empty and (_scores(natural, "natural", True).size == 0
                        or _scores(adversarial, "adversarial", True).size == 0):
        return None
    y, s = _labelled(natural, adversarial)
    return float(roc_auc_score(y, s))


def auc_standard_error(auc: float, n_natural: int, n_adversarial: int) -> float:
    """Hanley & McNeil's (1982) standard error of an AUC ``auc`` measured on ``n_natural`` and
    ``n_adversarial`` scores."""
    a, n1, n2 = float(auc), int(n_natural), int(n_adversarial)
    if not (0.0 <= a <= 1.0) or n1 < 1 or n2 < 1:
        raise AdvlabError(f"auc must be in [0, 1] and both counts >= 1, got {auc}, {n_natural}, {n_adversarial}")
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return math.sqrt(max(0.0, a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2))


def balanced_accuracy(natural_flagged, adversarial_flagged) -> float:
    """Balanced accuracy of a thresholded decision: the mean of the true-negative rate on the
    natural samples (not flagged) and the true-positive rate on the adversarial ones (flagged).
    Inputs are booleans (or 0/1), True meaning "flagged as adversarial"; equal to the accuracy on
    a balanced set whatever the two counts are.

    ``natural_flagged``, ``adversarial_flagged``: the decisions on the natural and on the
    adversarial samples (1-D). Returns a float in [0, 1]."""
    n = _scores(natural_flagged, "natural_flagged")
    a = _scores(adversarial_flagged, "adversarial_flagged")
    if not (np.isin(n, (0.0, 1.0)).all() and np.isin(a, (0.0, 1.0)).all()):
        raise AdvlabError("balanced_accuracy takes boolean decisions (True = flagged as adversarial)")
    return float(0.5 * ((1.0 - n.mean()) + a.mean()))


def tpr_at_fpr(natural, adversarial, fpr: float) -> float:
    """The largest true-positive rate on the ROC curve whose false-positive rate is at most
    ``fpr`` (in [0, 1]).

    ``natural``, ``adversarial``: the detector's scores (larger: more likely adversarial) on the
    natural (negative) and the adversarial (positive) samples."""
    if not (0.0 <= float(fpr) <= 1.0):
        raise AdvlabError(f"fpr must be in [0, 1], got {fpr}")
    f, t, _ = roc(natural, adversarial)
    ok = f <= float(fpr) + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0
