"""Rank anonymity of the true label (K-A3 paper, eq. 5-6, Fig. 4).

>>> ranks = label_rank(model(x_adv), y)         # 1 = still classified correctly
>>> pmf = rank_pmf(ranks, num_classes=10)        # pmf[j - 1] = P(rank = j)
>>> satisfies_k_anonymity(pmf, K=5)              # eq. 5 and 6
"""

from __future__ import annotations

import torch

from .._util import AdvlabError, check_labels, check_positive_int

__all__ = ["label_rank", "rank_pmf", "satisfies_k_anonymity", "k_anonymity_violation"]


def label_rank(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1-based rank of the true label ``y`` in each row of ``logits`` (N, C): one plus the number
    of classes scored strictly higher (a tie counts in favour of the true label). Rank 1 means
    the model still predicts ``y``."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise AdvlabError(f"logits must be a (N, C) tensor, got "
                          f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    check_labels(y, logits.shape[0], logits.shape[1], "y")
    if logits.numel() and not bool(torch.isfinite(logits).all()):
        raise AdvlabError("logits contains NaN or infinite values")
    y = y.to(logits.device)
    true = logits.gather(1, y.view(-1, 1))
    return (logits > true).sum(1) + 1


def rank_pmf(ranks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``pmf[j - 1] = P(rank = j)`` for j = 1..num_classes over a set of 1-based ranks (e.g. from
    :func:`label_rank`): a float64 tensor of shape (num_classes,) summing to 1. Raises ``AdvlabError``
    for ranks outside 1..num_classes or an empty set."""
    num_classes = check_positive_int(num_classes, "num_classes")
    try:
        ranks = torch.as_tensor(ranks).reshape(-1).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise AdvlabError(f"ranks must be a tensor (or list) of 1-based integer ranks, got {type(ranks).__name__}") from None
    if ranks.dtype == torch.bool or ranks.dtype.is_complex:
        raise AdvlabError(f"ranks must hold 1-based integer ranks, got dtype {ranks.dtype}")
    if ranks.dtype.is_floating_point:
        if not bool(torch.isfinite(ranks).all()) or not bool((ranks == ranks.round()).all()):
            raise AdvlabError("ranks must hold 1-based integer ranks (found NaN, infinite or fractional values)")
    ranks = ranks.long()
    if ranks.numel() == 0:
        raise AdvlabError("ranks is empty: the pmf of an empty set is undefined")
    if int(ranks.min()) < 1 or int(ranks.max()) > num_classes:
        raise AdvlabError(f"ranks must lie in [1, {num_classes}], got range [{int(ranks.min())}, {int(ranks.max())}]")
    counts = torch.bincount(ranks - 1, minlength=num_classes).double()
    return counts / counts.sum()


def k_anonymity_violation(pmf: torch.Tensor, K: int) -> float:
    """How far a rank pmf is from eq. 5-6: ``max(p(1), max_j p(j) - 1/K)`` (<= 0 only when no
    sample keeps its label at rank 1 and no position holds more than 1/K of the set)."""
    K = check_positive_int(K, "K")
    pmf = _check_pmf(pmf)
    return max(float(pmf[0]), float(pmf.max()) - 1.0 / K)


def satisfies_k_anonymity(pmf: torch.Tensor, K: int, tol: float = 0.0) -> bool:
    """True when ``pmf`` meets the paper's conditions with slack ``tol``: eq. 5, p(1) <= tol (the
    label is never recovered at rank 1), and eq. 6, p(j) <= 1/K + tol for every position j."""
    if not float(tol) >= 0.0:
        raise AdvlabError(f"tol must be >= 0, got {tol}")
    K = check_positive_int(K, "K")
    pmf = _check_pmf(pmf)
    return bool(float(pmf[0]) <= tol and float(pmf.max()) <= 1.0 / K + tol)


def _check_pmf(pmf) -> torch.Tensor:
    pmf = torch.as_tensor(pmf, dtype=torch.float64).reshape(-1)
    if pmf.numel() == 0 or bool((pmf < 0).any()) or abs(float(pmf.sum()) - 1.0) > 1e-6:
        raise AdvlabError("pmf must be a non-empty vector of probabilities summing to 1 (see rank_pmf)")
    return pmf
