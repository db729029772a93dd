"""Run attacks against a model on a set of images and turn the outcome into table rows.

Used by ``advlab attack``, the demo and the reproductions, so every report computes its numbers
the same way."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .._util import AdvlabError
from ..attacks.base import Attack, AttackResult
from ..metrics.robustness import attack_success_rate
from ..train import predict


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


def _similarity(x: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> Dict[str, float]:
    from ..metrics import similarity as sim

    if not bool(mask.any()):
        return {"ssim": float("nan"), "mse": float("nan")}
    xs, xa = x[mask], adv[mask]
    out = {"mse": float(sim.mse(xs, xa).mean())}
    if x.shape[1] == 3 and min(x.shape[-2:]) >= 32 and hasattr(sim, "ms_ssim"):
        out["ms_ssim"] = float(sim.ms_ssim(xs, xa).mean())
    out["ssim"] = float(sim.ssim(xs, xa).mean())
    return out


def result_row(name: str, res: AttackResult, x: torch.Tensor) -> Dict[str, float]:
    """One table row: clean accuracy, robust accuracy, ASR (with failed/detected split over the
    clean-correct samples), mean L2 / L-inf / L0 and SSIM / MSE of the successful adversarials."""
    split = attack_success_rate(res.adv_pred, res.labels, res.targets, clean_pred=res.clean_pred)
    ok = res.success & (res.clean_pred == res.labels)
    row = {"attack": name, "n": len(res), "clean_acc": res.clean_accuracy, "robust_acc": res.robust_accuracy,
           "asr": split["success"], "failed": split["failed"], "detected": split["detected"]}
    if bool(ok.any()):
        row.update({"mean_l2": float(res.l2[ok].mean()), "median_l2": float(res.l2[ok].median()),
                    "mean_linf": float(res.linf[ok].mean()), "mean_l0": float(res.l0[ok].float().mean())})
    else:
        row.update({"mean_l2": float("nan"), "median_l2": float("nan"), "mean_linf": float("nan"),
                    "mean_l0": float("nan")})
    if res.adversarials is not None:
        row.update(_similarity(x, res.adversarials, ok))
    row["seconds"] = res.seconds
    return row


def evaluate_attacks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Dict[str, Attack],
                     batch_size: int = 256, predict_fn: Optional[Callable] = None, progress: Optional[bool] = None,
                     targets: Optional[Dict[str, torch.Tensor]] = None):
    """Run each attack on (x, y); returns (rows, {name: AttackResult}). ``predict_fn`` judges the
    adversarials (a defended model's ``predict`` may return REJECT)."""
    rows, results = [], {}
    for name, atk in attacks.items():
        res = atk.run((x, y), batch_size=batch_size, keep_adversarials=True, progress=progress,
                      predict_fn=predict_fn, targets=None if targets is None else targets.get(name))
        results[name] = res
        rows.append(result_row(name, res, x))
    return rows, results
