"""The Attack base class: input checks, eval-mode and frozen-parameter guard, exact projection
onto the box and the threat model's ball, streaming ``run`` with per-sample results."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from .._util import (AdvlabError, check_images, check_labels, check_nonneg, check_positive_int, frozen_eval,
                     make_generator, model_device)
from .. import REJECT
from ..metrics.robustness import is_success, perturbation_norms
from .loop import per_sample


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float | None, norm: str | None) -> torch.Tensor:
    """Project ``x_adv`` onto the ``norm`` ball of radius ``eps`` around ``x`` and the box [0, 1].

    For L-inf the result is exact: clamping to [x - eps, x + eps] then to [0, 1]. For L2 the
    difference is rescaled to norm <= eps, then clamped to [0, 1]; clamping never increases an
    L2 norm, so the ball still holds."""
    if eps is None or norm is None:
        return x_adv.clamp(0.0, 1.0)
    if norm == "inf":
        lo, hi = linf_box(x, eps)
        return torch.max(torch.min(x_adv, hi), lo)
    if norm == "2":
        d = x_adv - x
        n = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        # inside eps by more than float rounding can add back: storing x + d rounds each pixel by
        # at most half an ulp of 1 (pixels are in [0, 1]), so the realised norm exceeds the exact
        # one by at most sqrt(D) * eps_machine / 2; the margin is twice that
        margin = math.sqrt(x[0].numel()) * torch.finfo(x.dtype).eps
        factor = torch.clamp(max(eps * (1 - 1e-6) - margin, 0.0) / n, max=1.0)
        return (x + d * factor).clamp_(0.0, 1.0)
    raise AdvlabError(f"norm must be 'inf' or '2', got {norm!r}")


def linf_box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel bounds ``(lo, hi)`` of the L-inf ball of radius ``eps`` around ``x`` intersected
    with [0, 1], such that every value v in [lo, hi] has ``|v - x| <= eps`` exactly.

    ``x - eps`` rounded to float32 lands outside the ball for about half of the pixels at
    eps = 0.1. The bounds are computed in float64 and rounded towards ``x``, so the guarantee
    holds for the exact real difference, hence also in float32 arithmetic (in the tensor's own
    dtype on MPS, which lacks float64, and for float64 input)."""
    if x.dtype == torch.float64 or x.device.type == "mps":
        lo, hi = x - eps, x + eps
        for _ in range(3):
            lo = torch.where(x - lo > eps, torch.nextafter(lo, x), lo)
            hi = torch.where(hi - x > eps, torch.nextafter(hi, x), hi)
        wide = x
    else:
        wide = x.double()
        lo, hi = (wide - eps).to(x.dtype), (wide + eps).to(x.dtype)
        # round-to-nearest may have gone outward: one step towards x rounds inward
        lo = torch.where(wide - lo.double() > eps, torch.nextafter(lo, x), lo)
        hi = torch.where(hi.double() - wide > eps, torch.nextafter(hi, x), hi)
    # never reached in practice; keeps the guarantee unconditional without a host sync
    lo = torch.where(wide - lo.to(wide.dtype) > eps, x, lo)
    hi = torch.where(hi.to(wide.dtype) - wide > eps, x, hi)
    return lo.clamp_(min=0.0), hi.clamp_(max=1.0)


def check_norm(norm) -> str:
    norm = str(norm).lower().replace("l", "")
    if norm in ("inf", "linf"):
        return "inf"
    if norm == "2":
        return "2"
    raise AdvlabError(f"norm must be 'inf' or '2', got {norm!r}")


def runner_up(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The highest-scoring class other than ``y`` per sample: the default target of the targeted
    minimum-norm attacks (L-BFGS, JSMA), the class ranked second on a correctly classified image."""
    return logits.detach().scatter(1, y[:, None], float("-inf")).argmax(1)


def best_other(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """``max_{k != cls} z_k`` per sample (the "best other logit" of margin losses): ``cls`` is
    masked with -inf, so the gradient reaches only the logit that attains the max."""
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, cls[:, None], True)
    return logits.masked_fill(mask, float("-inf")).amax(dim=1)


def keep_if_adversarial(model, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                        target: Optional[torch.Tensor]) -> torch.Tensor:
    """One last forward on the returned batch: samples that are not adversarial there (a point on
    the boundary can flip with float rounding) get the clean image back, so a failure is always
    returned unchanged."""
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
    (2-D, finite): the judge of :meth:`Attack.run`, whose forward on the adversarials costs one
    sync per batch already, so a model that turned NaN during an attack is an error, not a label."""
    from ..train import predict

    if callable(getattr(model, "predict", None)):
        return predict(model, x, batch_size=batch_size)
    dev = model_device(model)
    was = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                z = model(x[i: i + batch_size].to(dev))
                check_output(z, min(batch_size, x.shape[0] - i), where)
                out.append(z.argmax(1).cpu())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


#: dict keys of a batch's images and labels that :meth:`Attack.run` accepts, in order of preference
IMAGE_KEYS = ("image", "images", "x", "input", "pixel_values")
LABEL_KEYS = ("label", "labels", "y", "target")


def as_tensor(v, name: str, what: str = "images of shape (N, C, H, W)"):
    """A numpy array as a tensor (sharing its memory where numpy's layout allows; a read-only,
    non-contiguous or byte-swapped array is copied), a tensor (or None) unchanged; anything else
    is an error naming ``name``."""
    if v is None or isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        a = v if v.dtype.isnative else v.astype(v.dtype.newbyteorder("="))
        a = np.ascontiguousarray(a)
        if not a.flags.writeable:
            a = a.copy()
        try:
            return torch.from_numpy(a)
        except TypeError:
            raise AdvlabError(f"{name} is a numpy array of dtype {v.dtype}, which torch cannot hold; "
                              f"expected {what}") from None
    raise AdvlabError(f"{name} must be a torch.Tensor or a numpy array of {what}, got {type(v).__name__}")


def model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's first floating-point parameter (or buffer); None without one."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    for t in model.buffers():
        if t.is_floating_point():
            return t.dtype
    return None


def to_input_dtype(x_adv: torch.Tensor, x_work: torch.Tensor, x0: torch.Tensor, eps: Optional[float],
                   norm: Optional[str]) -> torch.Tensor:
    """An adversarial found on ``x_work`` (``x0`` cast to the model's dtype) brought back to
    ``x0``'s dtype and device: pixels the attack left unchanged get ``x0``'s exact value, and the
    result is projected onto the box and the ball around ``x0`` in ``x0``'s own dtype, so the
    guarantee holds for the images the caller gave."""
    xa = x_adv.detach().to(device=x0.device, dtype=x0.dtype)
    xs = x_work.detach().to(device=x0.device, dtype=x0.dtype)
    x0 = x0.detach()
    return project(torch.where(xa == xs, x0, xa), x0, eps, norm)


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
        return ~self.success & ~self.detected

    @property
    def counted(self) -> torch.Tensor:
        """The samples the rates are over: classified correctly when clean."""
        return self.clean_pred == self.labels

    @property
    def clean_accuracy(self) -> float:
        return float(self.counted.float().mean()) if len(self) else float("nan")

    @property
    def robust_accuracy(self) -> float:
        return float((self.adv_pred == self.labels).float().mean()) if len(self) else float("nan")

    def _rate(self, mask: torch.Tensor) -> float:
        keep = self.counted
        return float(mask[keep].double().mean()) if bool(keep.any()) else float("nan")

    @property
    def success_rate(self) -> float:
        return self._rate(self.success)

    @property
    def detected_rate(self) -> float:
        return self._rate(self.detected)

    @property
    def failed_rate(self) -> float:
        return self._rate(self.failed)

    def summary(self) -> Dict[str, float]:
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


class Attack:
    """Base class of every advlab attack.

    Subclasses set ``norm`` ("inf", "2" or None for minimum-norm attacks), ``supports_targeted``,
    and implement ``_perturb(x, y, target) -> x_adv``. ``__call__`` checks the inputs, runs
    ``_perturb`` with the model in eval mode and its parameters frozen (restored after, nothing
    left in ``.grad``), and projects the result onto [0, 1] and the ball exactly.
    """

    norm: Optional[str] = None
    supports_targeted: bool = False
    #: names of the per-sample keyword inputs the attack takes besides ``target`` (K-A3's
    #: ``groups``): tensors of length N given to ``perturb``/``__call__`` (checked and moved to the
    #: model's device, then passed to ``_perturb``), or to :meth:`run` as ``per_sample={name:
    #: tensor over the whole stream}``, sliced per batch like ``targets``
    per_sample_inputs: tuple = ()
    #: label-aware scores ``scores(logits, y) -> (N, C)`` that the attacks with a ``scores=``
    #: parameter (APGD, Square) use for their loss and their success check instead of the raw
    #: output; e.g. :func:`merge_reject` makes "be accepted as a wrong class" the goal against a
    #: defense whose output has an adversarial column
    scores: Optional[Callable] = None

    def __init__(self, model: nn.Module, eps: Optional[float] = None, seed: Optional[int] = None):
        if not isinstance(model, nn.Module):
            raise AdvlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.eps = None if eps is None else check_nonneg(eps, "eps")
        self.seed = seed
        self._generator: Optional[torch.Generator] = None

    # ------------------------------------------------------------------ public API
    def __call__(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None,
                 **per_sample: torch.Tensor) -> torch.Tensor:
        return self.perturb(x, y, target=target, **per_sample)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None,
                **per_sample: torch.Tensor) -> torch.Tensor:
        """``x_adv`` for ``(x, y)``: same shape, dtype and device as ``x``, inside [0, 1] and the ball.

        ``x``, ``y``, ``target`` and the per-sample inputs may be numpy arrays (float32/float64
        NCHW images in [0, 1], integer labels); with a numpy ``x`` the adversarial is a numpy array
        of its dtype. Images whose dtype differs from the model's (float64 numpy images and a
        float32 model) are attacked in the model's dtype and brought back to their own
        (:func:`to_input_dtype`). The model's output on ``x[:1]`` is checked once (2-D, finite),
        and the result for NaN (a model or gradient that became NaN during the attack)."""
        as_numpy = isinstance(x, np.ndarray)
        x = as_tensor(x, "x")
        y = as_tensor(y, "y", "class indices of shape (N,)")
        target = as_tensor(target, "target", "class indices of shape (N,)")
        check_images(x, "x")
        per_sample = self._check_per_sample(per_sample, x.shape[0], model_device(self.model))
        dev = model_device(self.model)
        xin = x
        mdt = model_dtype(self.model)
        cast = mdt is not None and mdt != x.dtype
        x = x.detach().to(dev, mdt) if cast else x.detach().to(dev)
        y = y.to(dev)
        with frozen_eval(self.model):
            nc = num_classes_of(self.model, x) if x.shape[0] else None
            y = check_labels(y, x.shape[0], nc, "y").long()  # int32 numpy labels: the losses want int64
            if target is not None:
                if not self.supports_targeted:
                    raise AdvlabError(f"{type(self).__name__} does not support targeted attacks (target=)")
                target = check_labels(target.to(dev), x.shape[0], nc, "target").long()
            if x.shape[0] == 0:
                return xin.clone().numpy() if as_numpy else xin.clone()
            if self.seed is not None and self._generator is None:
                self._generator = make_generator(self.seed, dev)
            x_adv = self._perturb(x, y, target, **per_sample)
        if cast:
            x_adv = to_input_dtype(x_adv, x, xin, self.eps, self.norm)
        else:
            x_adv = project(x_adv.detach(), x, self.eps, self.norm)
        # one sync per call: projected pixels are in [0, 1] or NaN, so the sum is NaN iff one is
        if not math.isfinite(float(x_adv.sum())):
            raise AdvlabError(f"model output contains NaN or infinite values during the attack: {type(self).__name__} "
                              "produced NaN pixels (the model's output or its gradient became NaN/inf on a perturbed "
                              "image, e.g. a log of 0 or a division by 0 inside the model)")
        x_adv = x_adv.to(device=xin.device, dtype=xin.dtype)
        return x_adv.numpy() if as_numpy else x_adv

    def _check_per_sample(self, per_sample: Dict[str, torch.Tensor], n: int, dev) -> Dict[str, torch.Tensor]:
        out = {}
        for name, v in per_sample.items():
            if name not in self.per_sample_inputs:
                raise AdvlabError(f"{type(self).__name__} takes no per-sample input {name!r}"
                                  + (f"; it takes: {', '.join(self.per_sample_inputs)}" if self.per_sample_inputs
                                     else ""))
            if v is None:
                continue
            v = as_tensor(v, name, f"{n} per-sample values") if isinstance(v, np.ndarray) else torch.as_tensor(v)
            if v.shape[:1] != (n,):
                raise AdvlabError(f"{name} must have one entry per sample, shape ({n}, ...), got {tuple(v.shape)}")
            out[name] = v.to(dev)
        return out

    def outcome(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor],
                **per_sample: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-sample extras that :meth:`run` records in ``AttackResult.extras`` for each batch
        (none by default). An entry ``"success"`` replaces the one success rule with the attack's
        own goal (K-A3: every target above the true label); a rejection stays a detection."""
        return {}

    def reset(self) -> None:
        """Restart the random stream: the next calls repeat those after construction."""
        self._generator = None

    def _perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def _rand(self, shape, device) -> torch.Tensor:
        """Uniform [0, 1) noise from the attack's seeded generator (or torch's global one)."""
        return torch.rand(shape, generator=self._generator, device=device)

    def _randn(self, shape, device) -> torch.Tensor:
        return torch.randn(shape, generator=self._generator, device=device)

    def _decision(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return out if self.scores is None else self.scores(out, y)

    def _random_start(self, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
        """A uniform random point of the ``norm`` ball of radius ``eps`` around ``x`` (clipped to
        [0, 1]), from the attack's seeded generator: uniform per pixel for L-inf; for L2 a
        Gaussian direction with radius ``eps * u^(1/d)``, uniform in the ball's volume."""
        if eps == 0:
            return x.clone()
        if norm == "inf":
            noise = self._rand(x.shape, x.device).to(x.dtype).mul_(2 * eps).sub_(eps)
            lo, hi = linf_box(x, eps)
            return noise.add_(x).clamp_(lo, hi)
        d = x[0].numel()
        direction = self._randn(x.shape, x.device).to(x.dtype)
        direction.div_(per_sample(direction.flatten(1).norm(dim=1).clamp_min_(1e-12), x))
        radius = self._rand((x.shape[0],), x.device).to(x.dtype).pow_(1.0 / d).mul_(eps)
        return direction.mul_(per_sample(radius, x)).add_(x).clamp_(0.0, 1.0)

    def run(self, data, batch_size: int = 256, targets: Optional[torch.Tensor] = None, keep_adversarials: bool = False,
            progress: Optional[bool] = None, predict_fn=None,
            per_sample: Optional[Dict[str, torch.Tensor]] = None, shard: Optional[bool] = None) -> AttackResult:
        """Attack a whole dataset (``.images``/``.labels``, an ``(x, y)`` pair of tensors or numpy
        arrays, any (x, y) Dataset, a DataLoader, or an iterable of batches) batch by batch and
        return an :class:`AttackResult`. A batch is an ``(x, y)`` tuple or list, or a dict with an
        image key (:data:`IMAGE_KEYS`: "image", "images", "x", "input", "pixel_values") and a label
        key (:data:`LABEL_KEYS`: "label", "labels", "y", "target"); its arrays may be numpy.

        ``predict_fn(x) -> labels`` judges the adversarials (default: the attacked model's argmax,
        or its ``predict`` method); a defended model may return ``advlab.REJECT`` there, which
        counts as detected, never as a success. ``per_sample`` holds the attack's per-sample inputs
        (:attr:`per_sample_inputs`) for the whole stream; :meth:`outcome` adds per-sample extras.

        Seeded randomness: with a ``seed``, batch ``b`` of the stream is attacked with a generator
        seeded from ``(the attack's stream, b)`` (one number is drawn from the attack's generator
        per run, so a second run differs and :meth:`reset` repeats the first). The result of a
        batch therefore depends only on the seed, the batch's index and its contents, not on
        which process attacks it or what ran before it on that process.

        Sharding (``shard``: None = when a ``torch.distributed`` process group with more than one
        process is initialised, e.g. under ``torchrun``; False = never; True = required): the
        stream is split by whole batches, batch ``b`` to rank ``b % world``; each rank attacks its
        batches only, and the per-batch results (labels, predictions, success, detected, norms,
        targets, extras, adversarials when kept) are gathered once (one ``all_gather_object``)
        into the original order on every rank. Same batches, same per-batch generators: the
        result equals the single-process one sample by sample for a deterministic model (a
        randomized model's own noise, or an attack without ``seed`` drawing from torch's global
        RNG, is not covered). ``seconds`` is then the slowest rank's attack time. Sized inputs
        (tensors, ``.images``, map-style Datasets) load only the rank's batches; a DataLoader or
        another iterable is read in full on every rank and its other batches skipped.
        """
        from tqdm.auto import tqdm
        from ..train import progress_enabled

        batch_size = check_positive_int(batch_size, "batch_size")
        world, rank = _run_world(shard)
        data = _as_data(data)
        targets = as_tensor(targets, "targets", "class indices of shape (N,)")
        per_sample = {k: as_tensor(v, k, "per-sample values") if isinstance(v, np.ndarray) else v
                      for k, v in (per_sample or {}).items()}
        mdt = model_dtype(self.model)

        def in_model_dtype(xb):  # float64 numpy images for a float32 model: judged as the attack saw them
            return xb if mdt is None or xb.dtype == mdt else xb.to(mdt)
        judge = predict_fn or (lambda xb: checked_predict(self.model, in_model_dtype(xb),
                                                          where="on the attack's images"))
        keys = ("labels", "clean_pred", "adv_pred", "success", "l0", "l2", "linf", "targets", "detected", "adv")
        local: Dict[int, Dict] = {}
        show = progress_enabled(progress) and rank == 0
        n_batches = _num_batches(data, batch_size)
        total = n_batches if n_batches is None or world == 1 else len(range(rank, n_batches, world))
        stream = self._stream_seed()
        main_generator = self._generator
        count = 0
        try:
            bar = tqdm(_own_batches(data, batch_size, world, rank), total=total, desc=type(self).__name__,
                       disable=not show, leave=False)
            for b, offset, xb, yb in bar:
                count = max(count, b + 1)
                if xb is None:  # another rank's batch of an iterable: only counted
                    continue
                tb = None if targets is None else targets[offset: offset + xb.shape[0]]
                ps = {k: v[offset: offset + xb.shape[0]] for k, v in (per_sample or {}).items()}
                if stream is not None:
                    self._generator = make_generator(_batch_seed(stream, b), model_device(self.model))
                t0 = time.perf_counter()
                xa = self.perturb(xb, yb, target=tb, **ps)
                if xa.is_cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                clean = judge(xb).cpu()
                adv = judge(xa).cpu()
                yc = yb.cpu().long()  # int32 numpy labels: stored as the int64 every result holds
                tc = None if tb is None else tb.cpu().long()
                norms = perturbation_norms(xa.cpu() - xb.cpu())
                local[b] = {"labels": yc, "clean_pred": clean, "adv_pred": adv, "success": is_success(adv, yc, tc),
                            "l0": norms["l0"], "l2": norms["l2"], "linf": norms["linf"], "targets": tc,
                            "detected": adv == REJECT, "adv": xa.cpu() if keep_adversarials else None,
                            "extras": {k: v.cpu() for k, v in self.outcome(in_model_dtype(xb), in_model_dtype(xa),
                                                                           yb, tb, **ps).items()},
                            "seconds": dt}
        finally:
            if stream is not None:
                self._generator = main_generator
        if world > 1:
            from .. import distributed

            sliced = _sliced_batches(data, batch_size)
            entries = distributed.gather_indexed(local, total=count if sliced is None else sliced)
            seconds = max(sum(e["seconds"] for e in entries[r::world]) for r in range(world)) if entries else 0.0
        else:
            entries = [local[b] for b in sorted(local)]
            seconds = sum(e["seconds"] for e in entries)
        cat = {k: (torch.cat([e[k] for e in entries]) if entries and entries[0][k] is not None else None)
               for k in keys}
        ext = {k: torch.cat([e["extras"][k] for e in entries]) for k in (entries[0]["extras"] if entries else {})}
        success = ext.pop("success", cat["success"])
        return AttackResult(labels=_or_empty(cat["labels"], torch.long), clean_pred=_or_empty(cat["clean_pred"], torch.long),
                            adv_pred=_or_empty(cat["adv_pred"], torch.long),
                            success=_or_empty(success, torch.bool), l0=_or_empty(cat["l0"]), l2=_or_empty(cat["l2"]),
                            linf=_or_empty(cat["linf"]), seconds=seconds, targets=cat["targets"],
                            detected=_or_empty(cat["detected"], torch.bool), adversarials=cat["adv"], extras=ext)

    def _stream_seed(self) -> Optional[int]:
        """One number from the attack's seeded generator (created from ``seed`` if needed): the
        seed of this run's per-batch generators; None without a seed."""
        if self.seed is None:
            return None
        if self._generator is None:
            self._generator = make_generator(self.seed, model_device(self.model))
        g = self._generator
        return int(torch.randint(0, 2 ** 62, (1,), generator=g, device=g.device).item())

    def __repr__(self) -> str:
        params = {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "model"}
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in params.items())})"


def _batch_seed(stream: int, b: int) -> int:
    """The seed of batch ``b``'s generator in a run whose stream seed is ``stream``."""
    return (stream + (b + 1) * 0x9E3779B97F4A7C15) % (2 ** 63)


def _run_world(shard: Optional[bool]) -> tuple:
    """``(world size, rank)`` of :meth:`Attack.run`: ``(1, 0)`` unless sharding is on."""
    from .. import distributed

    if shard is False:
        return 1, 0
    if distributed.is_distributed():
        return distributed.world_size(), distributed.rank()
    if shard and distributed.world_size() > 1:
        raise AdvlabError("shard=True: WORLD_SIZE > 1 but no process group is initialised; call "
                          "advlab.distributed.init() first (under torchrun)")
    return 1, 0


def _or_empty(t: Optional[torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    return torch.empty(0, dtype=dtype) if t is None else t


def _own_batches(data, batch_size: int, world: int, rank: int) -> Iterable:
    """``(batch index, offset, x, y)`` for the batches of ``data`` that ``rank`` of ``world``
    attacks (batch b goes to rank b % world; all of them alone). Sized data is sliced (or loaded)
    for those batches only; other iterables are read in full, other ranks' batches yielded as
    ``(b, offset, None, None)`` so the indices and offsets stay those of the whole stream."""
    if world == 1:
        offset = 0
        for b, (xb, yb) in enumerate(_iter_batches(data, batch_size)):
            yield b, offset, xb, yb
            offset += xb.shape[0]
        return
    if hasattr(data, "images") and hasattr(data, "labels"):
        data = (data.images, data.labels)
    if _is_pair(data):
        n = data[0].shape[0]
        for b in range(rank, (n + batch_size - 1) // batch_size, world):
            i = b * batch_size
            yield (b, i, *_batch_pair((data[0][i: i + batch_size], data[1][i: i + batch_size])))
    elif isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        n = len(data)
        mine = list(range(rank, (n + batch_size - 1) // batch_size, world))
        idx = [i for b in mine for i in range(b * batch_size, min((b + 1) * batch_size, n))]
        sub = torch.utils.data.Subset(data, idx)
        loader = torch.utils.data.DataLoader(sub, batch_size=batch_size, shuffle=False)
        for b, batch in zip(mine, loader):
            yield (b, b * batch_size, *_batch_pair(batch))
    else:
        offset = 0
        for b, (xb, yb) in enumerate(_iter_batches(data, batch_size)):
            if b % world == rank:
                yield b, offset, xb, yb
            else:
                yield b, offset, None, None
            offset += xb.shape[0]


def _sliced_batches(data, batch_size) -> Optional[int]:
    """Number of batches of the inputs :func:`_own_batches` slices per rank (tensors, ``.images``,
    map-style Datasets); None for the others (read in full, counted while read)."""
    if hasattr(data, "images") and hasattr(data, "labels"):
        return (len(data.labels) + batch_size - 1) // batch_size
    if _is_pair(data):
        return (data[0].shape[0] + batch_size - 1) // batch_size
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        return (len(data) + batch_size - 1) // batch_size
    return None


def _num_batches(data, batch_size):
    sliced = _sliced_batches(data, batch_size)
    if sliced is not None:
        return sliced
    try:  # a DataLoader or a list of batches: its length counts batches
        return len(data)
    except TypeError:
        return None


def _iter_batches(data, batch_size: int) -> Iterable:
    """``(x, y)`` tensor batches of ``data`` (see :meth:`Attack.run`), in order."""
    if hasattr(data, "images") and hasattr(data, "labels"):
        for i in range(0, len(data.labels), batch_size):
            yield _batch_pair((data.images[i: i + batch_size], data.labels[i: i + batch_size]))
    elif _is_pair(data):
        for i in range(0, data[0].shape[0], batch_size):
            yield data[0][i: i + batch_size], data[1][i: i + batch_size]
    elif isinstance(data, torch.utils.data.Dataset):  # samples, batched here (an IterableDataset too)
        for batch in torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False):
            yield _batch_pair(batch)
    else:  # a DataLoader or any iterable of batches
        try:
            it = iter(data)
        except TypeError:
            raise AdvlabError(f"data must be a dataset (.images/.labels), an (x, y) pair of tensors or numpy "
                              f"arrays, a Dataset, a DataLoader or an iterable of batches, got "
                              f"{type(data).__name__}") from None
        for batch in it:
            yield _batch_pair(batch)


def _is_pair(data) -> bool:
    """An ``(x, y)`` pair of whole arrays (a tuple of tensors as :func:`_as_data` leaves it)."""
    return isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor)


def _as_data(data):
    """The input of :meth:`Attack.run` with whole numpy arrays as tensors (sharing memory): an
    ``(x, y)`` tuple or list whose ``x`` is a tensor or numpy array, or a dict of whole arrays
    with an image key and a label key, becomes a tuple of tensors; anything else is unchanged
    (its batches are converted one by one by :func:`_batch_pair`)."""
    if isinstance(data, Mapping):
        return tuple(_batch_pair(data))
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, np.ndarray)):
        if isinstance(data, list) and data[0].ndim != 4:
            return data  # a list of two batches of another form: read as batches
        return (as_tensor(data[0], "x"), as_tensor(data[1], "y", "class indices of shape (N,)"))
    return data


def _batch_pair(batch) -> tuple:
    """``(x, y)`` of one batch: an (x, y) tuple or list, or a dict with one of :data:`IMAGE_KEYS`
    and one of :data:`LABEL_KEYS`; numpy arrays become tensors."""
    if isinstance(batch, Mapping):
        xk = next((k for k in IMAGE_KEYS if k in batch), None)
        yk = next((k for k in LABEL_KEYS if k in batch), None)
        if xk is None or yk is None:
            raise AdvlabError(f"a batch of data is a dict with keys {sorted(map(str, batch))}; Attack.run needs an "
                              f"image key (one of {', '.join(IMAGE_KEYS)}) and a label key (one of "
                              f"{', '.join(LABEL_KEYS)})")
        xb, yb = batch[xk], batch[yk]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        xb, yb = batch
    else:
        what = (f"a {type(batch).__name__} of {len(batch)} items" if isinstance(batch, (tuple, list))
                else type(batch).__name__)
        raise AdvlabError(f"each batch of data must be an (x, y) tuple or list, or a dict with an image key "
                          f"({', '.join(IMAGE_KEYS)}) and a label key ({', '.join(LABEL_KEYS)}); got {what}")
    return as_tensor(xb, "x (a batch of data)"), as_tensor(yb, "y (a batch of data)", "class indices of shape (N,)")
