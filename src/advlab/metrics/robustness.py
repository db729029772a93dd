"""Robustness metrics as batched tensor functions."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .. import REJECT
from .._util import AdvlabError


def _check_classes(t, name: str, n: Optional[int] = None) -> torch.Tensor:
    """A 1-D integer tensor of class indices (of length ``n`` when given); shape checks only, no sync."""
    if not isinstance(t, torch.Tensor):
        raise AdvlabError(f"{name} must be a torch.Tensor of class indices, got {type(t).__name__}")
    if t.dim() != 1 or (n is not None and t.shape[0] != n):
        want = f"({n},)" if n is not None else "(N,)"
        raise AdvlabError(f"{name} must have shape {want}, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise AdvlabError(f"{name} must be an integer tensor of class indices, got dtype {t.dtype}")
    return t


def _check_predictions(pred, y, target=None, pred_name: str = "pred") -> None:
    n = _check_classes(pred, pred_name).shape[0]
    _check_classes(y, "y", n)
    if target is not None:
        _check_classes(target, "target", n)


def is_success(pred: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The one success rule of advlab, per sample: the prediction is the target (targeted) or any
    class other than ``y`` (untargeted), and never ``advlab.REJECT``. A rejected adversarial is
    a *detection*, not a success, everywhere: attacks' early stopping, ``AttackResult``, metrics
    and reports all call this function.

    ``pred`` (N,): predicted class indices (or ``advlab.REJECT``); ``y`` (N,) labels; ``target`` (N,)
    or None. Returns a boolean (N,) mask."""
    _check_predictions(pred, y, target)
    ok = pred == target if target is not None else pred != y
    return ok & (pred != REJECT)


def outcome(adv_pred: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Per-sample ``success`` / ``failed`` / ``detected`` boolean masks (N,) of the predictions
    ``adv_pred`` on the adversarials, against the labels ``y`` (or the ``target`` classes): exactly one
    is true per sample, and ``advlab.REJECT`` is always ``detected``. Raises ``AdvlabError`` on
    non-integer or mismatched inputs."""
    success = is_success(adv_pred, y, target)
    detected = adv_pred == REJECT
    return {"success": success, "failed": ~success & ~detected, "detected": detected}


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``pred == y``, in [0, 1] (a rejection, ``advlab.REJECT``, counts as wrong); NaN for
    no samples. ``pred`` and ``y`` are integer class indices of shape (N,); raises ``AdvlabError``
    when they are not, or their lengths differ."""
    _check_predictions(pred, y)
    if pred.numel() == 0:
        return float("nan")
    return float((pred == y).float().mean())


def robust_accuracy(adv_pred: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy on adversarial inputs: :func:`accuracy` of the predictions ``adv_pred`` (N,) on the
    adversarials against the true labels ``y`` (N,); a rejection is not a correct prediction."""
    return accuracy(adv_pred, y)


def attack_success_rate(adv_pred: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None,
                        clean_pred: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Attack success split as in the papers' tables.

    - ``success``: the model outputs a wrong class (untargeted) or the target (targeted);
    - ``detected``: the model abstains (``advlab.REJECT`` = -1);
    - ``failed``: neither (the true class, or for targeted attacks a non-target class).
    With ``clean_pred``, only samples the model classified correctly when clean are counted.
    The three rates sum to 1.

    ``adv_pred`` (N,): the predictions on the adversarials (class indices or ``advlab.REJECT``);
    ``y`` (N,): the true labels; ``target`` (N,): the targets of a targeted attack. Returns
    ``{"success", "failed", "detected", "n"}`` (fractions, and the number of samples counted).
    """
    _check_predictions(adv_pred, y, target, "adv_pred")
    if clean_pred is not None:
        _check_classes(clean_pred, "clean_pred", y.shape[0])
    keep = torch.ones_like(y, dtype=torch.bool) if clean_pred is None else clean_pred == y
    adv_pred, y = adv_pred[keep], y[keep]
    n = int(y.numel())
    if n == 0:
        return {"success": float("nan"), "failed": float("nan"), "detected": float("nan"), "n": 0}
    out = outcome(adv_pred, y, None if target is None else target[keep])
    return {k: float(v.float().mean()) for k, v in out.items()} | {"n": n}


def l0_norm(delta: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Number of changed pixel positions per sample, shape (N,): entries of ``delta`` with ``|delta| >
    tol``; for an (N, C, H, W) batch a pixel counts once over its channels."""
    return (delta.abs() > tol).any(dim=1).flatten(1).sum(1) if delta.dim() == 4 else (delta.abs() > tol).flatten(1).sum(1)


def l2_norm(delta: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm (N,) of a perturbation batch ``delta`` (N, ...), in pixel units ([0, 1] scale)."""
    return delta.flatten(1).norm(dim=1)


def linf_norm(delta: torch.Tensor) -> torch.Tensor:
    """Per-sample L-inf norm (N,) of a perturbation batch ``delta`` (N, ...), in pixel units ([0, 1] scale);
    zeros for a batch with no pixels."""
    return delta.flatten(1).abs().amax(dim=1) if delta.numel() else delta.new_zeros(delta.shape[0])


def perturbation_norms(delta: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sample L0 (changed pixels), L2 and L-inf norms of a perturbation batch ``delta`` (N, ...), as
    ``{"l0", "l2", "linf"}`` tensors of shape (N,), in pixel units of the [0, 1] scale. Raises
    ``AdvlabError`` for a non-tensor, fewer than 2 dimensions, or NaN / infinite values."""
    if not isinstance(delta, torch.Tensor):
        raise AdvlabError(f"delta must be a torch.Tensor of shape (N, ...), got {type(delta).__name__}")
    if delta.dim() < 2:
        raise AdvlabError(f"delta must have shape (N, ...) with one perturbation per row, got shape {tuple(delta.shape)}")
    if delta.numel() and not bool(torch.isfinite(delta).all()):
        raise AdvlabError("delta contains NaN or infinite values")
    return {"l0": l0_norm(delta), "l2": l2_norm(delta), "linf": linf_norm(delta)}
