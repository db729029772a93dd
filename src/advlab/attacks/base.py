"""The Attack base class: input checks, eval-mode and frozen-parameter guard, exact projection
onto the box and the threat model's ball, streaming ``run`` with per-sample results."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from .._util import (AdvlabError, check_images, check_labels, check_nonneg, frozen_eval, make_generator,
                     model_device)
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


def num_classes_of(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


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
        check_images(x, "x")
        per_sample = self._check_per_sample(per_sample, x.shape[0], model_device(self.model))
        dev = model_device(self.model)
        xin = x
        x = x.detach().to(dev)
        y = y.to(dev)
        with frozen_eval(self.model):
            nc = num_classes_of(self.model, x) if x.shape[0] else None
            check_labels(y, x.shape[0], nc, "y")
            if target is not None:
                if not self.supports_targeted:
                    raise AdvlabError(f"{type(self).__name__} does not support targeted attacks (target=)")
                target = check_labels(target.to(dev), x.shape[0], nc, "target")
            if x.shape[0] == 0:
                return xin.clone()
            if self.seed is not None and self._generator is None:
                self._generator = make_generator(self.seed, dev)
            x_adv = self._perturb(x, y, target, **per_sample)
        x_adv = project(x_adv.detach(), x, self.eps, self.norm)
        return x_adv.to(device=xin.device, dtype=xin.dtype)

    def _check_per_sample(self, per_sample: Dict[str, torch.Tensor], n: int, dev) -> Dict[str, torch.Tensor]:
        out = {}
        for name, v in per_sample.items():
            if name not in self.per_sample_inputs:
                raise AdvlabError(f"{type(self).__name__} takes no per-sample input {name!r}"
                                  + (f"; it takes: {', '.join(self.per_sample_inputs)}" if self.per_sample_inputs
                                     else ""))
            if v is None:
                continue
            v = torch.as_tensor(v)
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
        """Attack a whole dataset (``.images``/``.labels``, any (x, y) Dataset, a DataLoader, or an
        iterable of (x, y) batches) batch by batch and return an :class:`AttackResult`.

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
        from ..train import predict as _predict
        from ..train import progress_enabled

        world, rank = _run_world(shard)
        judge = predict_fn or (lambda xb: _predict(self.model, xb))
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
                yc = yb.cpu()
                tc = None if tb is None else tb.cpu()
                norms = perturbation_norms(xa.cpu() - xb.cpu())
                local[b] = {"labels": yc, "clean_pred": clean, "adv_pred": adv, "success": is_success(adv, yc, tc),
                            "l0": norms["l0"], "l2": norms["l2"], "linf": norms["linf"], "targets": tc,
                            "detected": adv == REJECT, "adv": xa.cpu() if keep_adversarials else None,
                            "extras": {k: v.cpu() for k, v in self.outcome(xb, xa, yb, tb, **ps).items()},
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
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        n = data[0].shape[0]
        for b in range(rank, (n + batch_size - 1) // batch_size, world):
            i = b * batch_size
            yield b, i, data[0][i: i + batch_size], data[1][i: i + batch_size]
    elif isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        n = len(data)
        mine = list(range(rank, (n + batch_size - 1) // batch_size, world))
        idx = [i for b in mine for i in range(b * batch_size, min((b + 1) * batch_size, n))]
        sub = torch.utils.data.Subset(data, idx)
        loader = torch.utils.data.DataLoader(sub, batch_size=batch_size, shuffle=False)
        for b, (xb, yb) in zip(mine, loader):
            yield b, b * batch_size, xb, yb
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
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
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
    if hasattr(data, "images") and hasattr(data, "labels"):
        for i in range(0, len(data.labels), batch_size):
            yield data.images[i: i + batch_size], data.labels[i: i + batch_size]
    elif isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        for i in range(0, data[0].shape[0], batch_size):
            yield data[0][i: i + batch_size], data[1][i: i + batch_size]
    elif isinstance(data, torch.utils.data.DataLoader):
        yield from data
    elif isinstance(data, torch.utils.data.Dataset):
        yield from torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    else:
        yield from data
