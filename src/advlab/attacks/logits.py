"""Logit helpers shared by the attacks (runner-up class, best other logit, a defense's rejection
column merged into the true class, the last adversarial check) and the checks of a model's
output (2-D, finite) that every attack and the engine run on the clean forward."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._util import AdvlabError, model_device, restore_train_modes, train_modes
from ..metrics.robustness import is_success


def runner_up(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The highest-scoring class other than ``y`` per sample: the default target of the targeted
    minimum-norm attacks (L-BFGS, JSMA), the class ranked second on a correctly classified image.

    ``logits`` (N, C) scores, ``y`` (N,) labels; returns (N,) class indices."""
    return logits.detach().scatter(1, y[:, None], float("-inf")).argmax(1)


def best_other(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """``max_{k != cls} z_k`` per sample (the "best other logit" of margin losses): ``cls`` is
    masked with -inf, so the gradient reaches only the logit that attains the max.

    ``logits`` (N, C) scores, ``cls`` (N,) the class left out; returns (N,) values."""
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, cls[:, None], True)
    return logits.masked_fill(mask, float("-inf")).amax(dim=1)


def keep_if_adversarial(model, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                        target: Optional[torch.Tensor]) -> torch.Tensor:
    """One last forward on the returned batch: samples that are not adversarial there (a point on
    the boundary can flip with float rounding) get the clean image back, so a failure is always
    returned unchanged.

    ``model`` judges; ``x_adv``, ``x`` (N, C, H, W) in [0, 1]; ``y`` (N,) labels; ``target`` (N,)
    targets or None (untargeted). Returns ``x_adv`` with the failures replaced by ``x``."""
    with torch.no_grad():
        ok = is_success(model(x_adv.clamp(0.0, 1.0)).argmax(1), y, target)
    return torch.where(ok.view(-1, *([1] * (x.dim() - 1))), x_adv, x)


def merge_reject(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Scores (N, C) from a defended model's (N, C + 1) output whose last column is the
    "adversarial" class: that column is merged into the true class (its max), so a wrong class
    wins the argmax only where it beats both the true class and the rejection. Attacking these
    scores is attacking "be accepted as a wrong class"; a rejection counts as no progress."""
    z = out[:, :-1]
    zy = torch.maximum(z.gather(1, y[:, None]), out[:, -1:])
    return z.scatter(1, y[:, None], zy)


def check_output(out, n: int, where: str = "on the clean input") -> int:
    """Check a model's output: a floating (n, num_classes) tensor of finite values; returns
    num_classes. One host sync (the finiteness test); callers run it once per batch on the clean
    forward they do anyway, never inside an attack's loop."""
    if not isinstance(out, torch.Tensor):
        hint = " (it has .logits: wrap the model so that forward returns them)" if hasattr(out, "logits") else ""
        raise AdvlabError(f"the model must return a tensor of logits of shape (N, num_classes), got "
                          f"{type(out).__name__}{hint}")
    if out.dim() != 2 or out.shape[0] != n:
        raise AdvlabError(f"the model's output must have shape (N, num_classes) = ({n}, C) for {n} image(s), got "
                          f"shape {tuple(out.shape)} (flatten or squeeze it inside the model)")
    if not bool(torch.isfinite(out).all()):
        raise AdvlabError(f"model output contains NaN or infinite values {where}: check the model's weights, "
                          "its input normalisation and any log/division inside it")
    return int(out.shape[1])


def num_classes_of(model: nn.Module, x: torch.Tensor) -> int:
    """The number of classes of ``model``'s output on ``x[:1]``, which is checked on the way
    (:func:`check_output`: 2-D, finite)."""
    with torch.no_grad():
        try:
            out = model(x[:1])
        except RuntimeError as e:  # a shape or dtype torch cannot feed through the model
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AdvlabError(f"x of shape {tuple(x.shape)} does not fit the model: {first}") from None
        return check_output(out, min(1, x.shape[0]))


def checked_predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024,
                    where: str = "on the images judged") -> torch.Tensor:
    """:func:`advlab.train.predict` (the model's ``predict`` when it has one, else the argmax of
    its output, in eval mode, on the CPU) with each batch's output checked by :func:`check_output`
    (2-D, finite): the judge of :meth:`~advlab.attacks.Attack.run`, whose forward on the adversarials costs one
    sync per batch already, so a model that turned NaN during an attack is an error, not a label."""
    from ..train import predict

    if callable(getattr(model, "predict", None)):
        return predict(model, x, batch_size=batch_size)
    dev = model_device(model)
    was = train_modes(model)
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                z = model(x[i: i + batch_size].to(dev))
                check_output(z, min(batch_size, x.shape[0] - i), where)
                out.append(z.argmax(1).cpu())
    finally:
        restore_train_modes(was)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)
