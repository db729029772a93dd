"""The Attack base class: input checks, eval-mode and frozen-parameter guard, exact projection
onto the box and the threat model's ball, streaming ``run`` with per-sample results."""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from .._util import (AdvlabError, check_images, check_labels, check_nonneg, check_positive_int, frozen_eval,
                     make_generator, model_device, progress_enabled)
from .. import REJECT
from ..distributed import compact
from ..metrics.robustness import is_success, perturbation_norms
from ..streaming import as_data, as_tensor, batch_seed, num_batches, own_batches, run_world, sliced_batches
from .dtypes import model_dtype, to_input_dtype
from .geometry import linf_box, project
from .logits import checked_predict, num_classes_of
from .loop import per_sample
from .result import AttackResult


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
    #: output; e.g. :func:`~advlab.attacks.logits.merge_reject` makes "be accepted as a wrong class" the goal against a
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
        (:func:`~advlab.attacks.dtypes.to_input_dtype`). The model's output on ``x[:1]`` is checked once (2-D, finite),
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
        image key (:data:`~advlab.streaming.IMAGE_KEYS`: "image", "images", "x", "input", "pixel_values") and a label
        key (:data:`~advlab.streaming.LABEL_KEYS`: "label", "labels", "y", "target"); its arrays may be numpy.

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

        batch_size = check_positive_int(batch_size, "batch_size")
        world, rank = run_world(shard)
        data = as_data(data)
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
        n_batches = num_batches(data, batch_size)
        total = n_batches if n_batches is None or world == 1 else len(range(rank, n_batches, world))
        stream = self._stream_seed()
        main_generator = self._generator
        count = 0
        try:
            bar = tqdm(own_batches(data, batch_size, world, rank), total=total, desc=type(self).__name__,
                       disable=not show, leave=False)
            for b, offset, xb, yb in bar:
                count = max(count, b + 1)
                if xb is None:  # another rank's batch of an iterable: only counted
                    continue
                tb = None if targets is None else targets[offset: offset + xb.shape[0]]
                ps = {k: v[offset: offset + xb.shape[0]] for k, v in (per_sample or {}).items()}
                if stream is not None:
                    self._generator = make_generator(batch_seed(stream, b), model_device(self.model))
                t0 = time.perf_counter()
                xa = self.perturb(xb, yb, target=tb, **ps)
                if xa.is_cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                clean = judge(xb).cpu()
                adv = judge(xa).cpu()
                # int32 numpy labels: stored as the int64 every result holds
                yc = yb.detach().to("cpu", torch.long)
                tc = None if tb is None else tb.detach().to("cpu", torch.long)
                norms = perturbation_norms(xa.cpu() - xb.cpu())
                # every entry holds copies of this batch's samples only (compact): a view such as
                # the batch's slice of the whole label tensor would pickle the whole set per batch
                # in the sharded gather
                local[b] = compact({
                    "labels": yc, "clean_pred": clean, "adv_pred": adv, "success": is_success(adv, yc, tc),
                    "l0": norms["l0"], "l2": norms["l2"], "linf": norms["linf"], "targets": tc,
                    "detected": adv == REJECT, "adv": xa if keep_adversarials else None,
                    "extras": self.outcome(in_model_dtype(xb), in_model_dtype(xa), yb, tb, **ps),
                    "seconds": dt})
        finally:
            if stream is not None:
                self._generator = main_generator
        if world > 1:
            from .. import distributed

            sliced = sliced_batches(data, batch_size)
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


def _or_empty(t: Optional[torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    return torch.empty(0, dtype=dtype) if t is None else t
