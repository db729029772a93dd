"""Adversarial training for any classifier (and for PCL), on :func:`advlab.train.fit`.

Two protocols:

- the PCL paper's (section 5.1, Algorithm 1 lines 10-13): every batch is augmented with its
  adversarial copy, clean and adversarial 1:1, eps drawn uniformly from a range per batch
  (``[0.1, 0.5]`` for MNIST / Fashion-MNIST, ``[0.01, 0.05]`` for CIFAR and SVHN), crafted by
  FGSM or PGD (10 steps of eps/10 from a random start) on the training loss (for PCL, the joint
  CE + PC loss: pass ``source``/``objective`` from :mod:`advlab.defenses.pcl`) or on CE;
- Madry et al. (2018), the standard baseline: adversarial examples only, fixed eps, PGD with a
  random start on cross-entropy (:func:`madry_fit`).

>>> adversarial_fit(model, train_set, attack="pgd", eps=(0.1, 0.5), epochs=2)         # PCL paper
>>> madry_fit(model, train_set, eps=0.3, steps=40, alpha=0.01, epochs=2)              # Madry PGD-AT
>>> fit(model, train_set, batch_transform=AdversarialBatches(model, "fgsm", eps=0.3))  # any fit call

The adversarial examples come from the attack registry (:func:`advlab.attacks.build_attack`),
crafted with the model in eval mode and its parameters frozen; training goes on in train mode.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
from torch import nn

from .._util import AdvlabError, check_nonneg, check_positive_int
from ..data import dataset_tensors
from .base import Defense, register_defense

__all__ = ["AdversarialBatches", "adversarial_fit", "madry_fit", "check_eps_range", "MadryDefense", "Undefended"]

EpsSpec = Union[float, Tuple[float, float]]


def check_eps_range(eps: EpsSpec) -> Tuple[float, float]:
    """``eps`` as a range (lo, hi) with 0 <= lo <= hi (a number is the range (eps, eps))."""
    if isinstance(eps, (int, float)):
        e = check_nonneg(float(eps), "eps")
        return e, e
    try:
        lo, hi = (float(v) for v in eps)
    except (TypeError, ValueError):
        raise AdvlabError(f"eps must be a number or a (low, high) pair, got {eps!r}") from None
    if not (0.0 <= lo <= hi) or hi != hi:
        raise AdvlabError(f"eps range must satisfy 0 <= low <= high, got ({lo}, {hi})")
    return lo, hi


class AdversarialBatches:
    """A ``batch_transform`` for :func:`advlab.train.fit`: crafts the adversarial copy of each
    batch and returns ``(x, x_adv)`` with labels ``(y, y)`` (``mix="both"``, the PCL paper's 1:1)
    or ``x_adv`` alone (``mix="adversarial"``, Madry et al.).

    ``attack``: ``"fgsm"`` or ``"pgd"`` (``steps`` steps of ``alpha``, default eps/steps, from a
    uniform random start; set ``random_start=False`` for BIM-like steps). ``eps``: a number or a
    (low, high) range drawn uniformly per batch from a seeded generator. ``source``: the module
    the attack differentiates (default ``model``); ``objective``: ``"ce"``, ``"margin"`` or a
    per-sample callable ``(out, y, target) -> (N,)`` on ``source``'s output (PCL's joint loss).
    ``ramp_batches``: eps (and a given ``alpha``) rise linearly over the first that many batches
    (a small model trained at the full eps from the first step can collapse to chance).
    ``eps_drawn`` records every eps used.
    """

    def __init__(self, model: nn.Module, attack: str = "pgd", eps: EpsSpec = (0.1, 0.5), steps: int = 10,
                 alpha: Optional[float] = None, random_start: bool = True, objective: Union[str, Callable] = "ce",
                 source: Optional[nn.Module] = None, mix: str = "both", seed: int = 0, ramp_batches: int = 0):
        if not isinstance(model, nn.Module):
            raise AdvlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if attack not in ("fgsm", "pgd"):
            raise AdvlabError(f"attack must be 'fgsm' or 'pgd', got {attack!r}")
        if mix not in ("both", "adversarial"):
            raise AdvlabError(f"mix must be 'both' (clean and adversarial 1:1) or 'adversarial', got {mix!r}")
        if not callable(objective) and objective not in ("ce", "margin"):
            raise AdvlabError(f"objective must be 'ce', 'margin' or a callable (out, y, target) -> (N,), "
                              f"got {objective!r}")
        self.source = source if source is not None else model
        self.attack, self.eps = attack, check_eps_range(eps)
        self.steps = check_positive_int(steps, "steps")
        self.alpha = None if alpha is None else check_nonneg(alpha, "alpha")
        self.random_start, self.objective, self.mix = bool(random_start), objective, mix
        self.seed = int(seed)
        self.ramp_batches = check_positive_int(ramp_batches, "ramp_batches", 0)
        self._g = torch.Generator().manual_seed(self.seed)
        self.batches = 0
        self.eps_drawn: list = []

    def draw_eps(self) -> float:
        """The eps of the next batch: uniform in the configured ``eps`` range (pixel units, [0, 1] scale), drawn
        from this transform's own seeded generator; the fixed value when the range is one number."""
        lo, hi = self.eps
        eps = lo if hi == lo else float(lo + (hi - lo) * torch.rand((), generator=self._g))
        return eps * self.ramp_factor()

    def ramp_factor(self) -> float:
        """The share of the drawn eps this batch uses: ``(batch + 1) / ramp_batches`` during the linear
        ramp of the first ``ramp_batches`` batches, 1 after it (and always 1 without a ramp)."""
        return 1.0 if self.ramp_batches == 0 else min(1.0, (self.batches + 1) / self.ramp_batches)

    def make_attack(self, eps: float):
        """The attack that crafts this batch's adversarial copy at ``eps`` on ``source``: FGSM, or PGD with
        ``steps`` steps of ``alpha`` (default eps / steps), seeded per batch so training is repeatable."""
        from ..attacks import build_attack

        seed = self.seed * 1_000_003 + self.batches
        if self.attack == "fgsm":
            return build_attack("fgsm", self.source, eps=eps, loss=self.objective, seed=seed)
        alpha = eps / self.steps if self.alpha is None else self.alpha * self.ramp_factor()
        return build_attack("pgd", self.source, eps=eps, alpha=alpha, steps=self.steps,
                            random_start=self.random_start, loss=self.objective, seed=seed)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        eps = self.draw_eps()
        x_adv = self.make_attack(eps)(x, y).detach()
        self.batches += 1
        self.eps_drawn.append(eps)
        if self.mix == "adversarial":
            return x_adv, y
        return torch.cat([x, x_adv]), torch.cat([y, y])


def adversarial_fit(model: nn.Module, dataset, attack: str = "pgd", eps: EpsSpec = (0.1, 0.5), steps: int = 10,
                    alpha: Optional[float] = None, random_start: bool = True, objective: Union[str, Callable] = "ce",
                    source: Optional[nn.Module] = None, mix: str = "both", seed: int = 0, ramp_batches: int = 0,
                    **fit_kwargs):
    """Adversarially train ``model`` in place with :func:`advlab.train.fit` (``fit_kwargs``:
    epochs, lr, batch_size, optimizer, schedule, loss, ...); see :class:`AdversarialBatches`.
    Returns fit's History, with ``history.eps_drawn`` the eps of every batch.

    ``dataset``: the training set (images in [0, 1]); ``attack``: "fgsm" or "pgd", crafted on ``source``
    (default ``model``) with ``steps`` steps of ``alpha`` (default eps / steps) from a random start
    (``random_start``), ascending ``objective`` ("ce", "margin" or a callable); ``eps``: a number or a
    (low, high) range drawn per batch, pixel units; ``mix``: "both" (clean and adversarial 1:1) or
    "adversarial"; ``seed``: the attacks', the eps draws' and the batch order's seed; ``ramp_batches``: eps ramps up linearly
    over the first batches. Raises ``AdvlabError`` on a bad value."""
    from ..train import fit

    if "batch_transform" in fit_kwargs:
        raise AdvlabError("adversarial_fit sets batch_transform itself; call advlab.train.fit with "
                          "AdversarialBatches to combine it with another transform")
    adv = AdversarialBatches(model, attack=attack, eps=eps, steps=steps, alpha=alpha, random_start=random_start,
                             objective=objective, source=source, mix=mix, seed=seed, ramp_batches=ramp_batches)
    fit_kwargs.setdefault("desc", f"adv-train {attack}")
    hist = fit(model, dataset, seed=seed, batch_transform=adv, **fit_kwargs)
    hist.eps_drawn = adv.eps_drawn
    return hist


def madry_fit(model: nn.Module, dataset, eps: float = 0.3, steps: int = 40, alpha: Optional[float] = 0.01,
              seed: int = 0, ramp_batches: int = 0, **fit_kwargs):
    """Madry et al. (2018) PGD adversarial training: every batch replaced by its PGD adversarial
    (L-inf ``eps``, ``steps`` steps of ``alpha`` from a uniform random start, cross-entropy), eps
    and alpha ramped up linearly over the first ``ramp_batches`` batches when given.

    Trains ``model`` in place on ``dataset`` (images in [0, 1]; ``eps`` and ``alpha`` in pixel units)
    with ``seed`` for the attacks and the batch order; ``fit_kwargs`` go to :func:`advlab.train.fit`.
    Returns fit's History."""
    fit_kwargs.setdefault("desc", "madry pgd-at")
    return adversarial_fit(model, dataset, attack="pgd", eps=float(eps), steps=steps, alpha=alpha,
                           random_start=True, objective="ce", mix="adversarial", seed=seed, ramp_batches=ramp_batches,
                           **fit_kwargs)


def _check_fit(model, dataset) -> torch.Tensor:
    """The checks every defense's ``fit`` makes before any work: ``model`` an ``nn.Module``; the
    dataset's images in [0, 1] (N, C, H, W) and its labels class indices of the model. Returns the images."""
    from .._util import check_images, model_device

    if not isinstance(model, nn.Module):
        raise AdvlabError(f"model must be a torch.nn.Module (a trained classifier), got {type(model).__name__}")
    x, y = dataset_tensors(dataset)
    check_images(x, "dataset images")
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            classes = model(x[:1].to(model_device(model))).shape[-1]
        finally:
            model.train(was)
    y = torch.as_tensor(y)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise AdvlabError(f"dataset labels must lie in [0, {classes - 1}] (the model has {classes} classes), found "
                          f"range [{int(y.min())}, {int(y.max())}]")
    return x


class _PlainClassifier(Defense):
    """A defense that is one classifier (``.model``): ``forward`` and ``predict`` are the
    model's, nothing rejects, nothing is random."""

    claimed_threat = "white-box"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@register_defense("none", "no defense: the trained model as it is (the baseline row of a comparison)")
class Undefended(_PlainClassifier):
    """The trained model itself, as a :class:`Defense` (``advlab compare``'s baseline row)."""

    title = "undefended"

    @classmethod
    def fit(cls, model: nn.Module, dataset=None, seed: int = 0, device=None, progress: Optional[bool] = None,
            **unused) -> "Undefended":
        """A copy of ``model`` in eval mode (``dataset`` and ``seed`` are not used, but a bad
        dataset is an error as for every defense); extra parameters are an error, since none apply."""
        import copy

        if unused:
            raise AdvlabError(f"the undefended model takes no parameters, got {', '.join(sorted(unused))}")
        if not isinstance(model, nn.Module):
            raise AdvlabError(f"model must be a torch.nn.Module (a trained classifier), got {type(model).__name__}")
        if dataset is not None:  # not used, but a bad one is an error like every other defense's
            _check_fit(model, dataset)
        net = copy.deepcopy(model)
        if device is not None:
            net = net.to(device)
        return cls(net).eval()


@register_defense("madry", "Madry et al. (2018) PGD adversarial training (L-inf), fine-tuned from the trained model")
class MadryDefense(_PlainClassifier):
    """A classifier adversarially trained by :func:`madry_fit` (Madry et al. 2018), as a
    :class:`Defense`: ``forward``/``predict`` are the trained model's. The paper's threat model is
    white-box PGD on the model itself."""

    title = "Madry PGD-AT"

    def __init__(self, model: nn.Module, eps: float = 0.3):
        super().__init__(model)
        self.eps = float(eps)

    def config(self):
        return {"eps": self.eps}

    @classmethod
    def fit(cls, model: nn.Module, dataset, eps: Optional[float] = None, steps: int = 10,
            alpha: Optional[float] = None, epochs: int = 8, ramp_epochs: float = 3.0, lr: float = 1e-3,
            batch_size: int = 64, seed: int = 0, device=None, progress: Optional[bool] = None) -> "MadryDefense":
        """Fine-tune a copy of the trained ``model`` on ``dataset`` with PGD adversarial training:
        L-inf ``eps`` in pixel units (default 0.3 for one-channel images, 8/255 otherwise), ``steps``
        PGD steps of ``alpha`` (default ``eps / 4``) from a uniform random start per batch,
        ``epochs`` epochs of Adam at ``lr``, eps and alpha rising linearly over the first
        ``ramp_epochs`` (a LeNet-5 put at eps 0.3 at once loses 20 points of clean accuracy on
        mnist-10k). The defaults are sized for a CPU (the paper: 40 steps of 0.01, 100k
        iterations); ``model`` is left unchanged."""
        import copy

        x = _check_fit(model, dataset)
        if eps is None:
            eps = 0.3 if x.shape[1] == 1 else 8 / 255
        eps = check_nonneg(float(eps), "eps")
        steps = check_positive_int(steps, "steps")
        net = copy.deepcopy(model)
        if device is not None:
            net = net.to(device)
        defense = cls(net, eps=eps)
        per_epoch = -(-x.shape[0] // check_positive_int(batch_size, "batch_size"))
        hist = madry_fit(net, dataset, eps=eps, steps=steps, alpha=eps / 4 if alpha is None else alpha, seed=seed,
                         epochs=epochs, lr=lr, batch_size=batch_size, progress=progress,
                         ramp_batches=int(round(check_nonneg(float(ramp_epochs), "ramp_epochs") * per_epoch)))
        defense.history = {"epochs": hist.epochs, "steps": steps, "epochs_run": len(hist.epochs)}
        return defense.eval()
