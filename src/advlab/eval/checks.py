"""Gradient-masking checks of the honest-evaluation battery.

A defense is guilty of gradient masking until shown otherwise. The checks here look for the
warning signs that a white-box robustness number is an artefact of the attack failing rather
than of the model being robust, and say what the evaluation should do about each:

- on the model (:func:`model_checks`): input gradients that are exactly zero
  (:func:`zero_gradient_fraction`), probability or log-probability outputs whose saturating
  softmax kills the cross-entropy gradient (:func:`output_kind`), and randomness at eval time
  (:func:`is_randomized`);
- on the numbers (:func:`attack_checks`, :func:`eps_sweep_check`): a single-step attack that
  beats an iterative one, a black-box or transfer attack that beats every white-box attack, and a
  robust accuracy that does not fall (to about 0) as the budget grows.

Sources: AutoAttack's ``checks.py`` (Croce & Hein 2020: ``check_zero_gradients``,
``check_range_output``, ``check_randomized``, ``check_square_sr``); Athalye, Carlini & Wagner
2018, "Obfuscated gradients give a false sense of security": section 3 for the kinds of
obfuscated gradients the model checks look for (shattered, stochastic, vanishing), section 3.1
for the "warning signs" the number checks look for, section 4 for the remedies (BPDA, EoT); and
the PCL paper (Mustafa et al. 2019, "Adversarial defense by restricting the hidden space of deep
neural networks"), section 5.5 "Identifying obfuscated gradients", which lists the number checks'
signs (iterative beats single-step, black-box does not beat white-box, accuracy falls to 0 as
the budget grows).

Every model check runs the model under :func:`advlab._util.frozen_eval` (eval mode, parameters
frozen; both restored afterwards, nothing left in ``.grad``), batch by batch on the model's
device, and uses no randomness of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .._util import (
    AdvlabError,
    check_images,
    check_labels,
    check_nonneg,
    check_positive_int,
    frozen_eval,
    model_device,
)
from ..attacks.gradient import Loss, _check_loss, attack_objective

__all__ = [
    "OUTPUT_KINDS",
    "Flag",
    "attack_checks",
    "eps_sweep_check",
    "is_randomized",
    "model_checks",
    "output_kind",
    "zero_gradient_fraction",
]

#: the values :func:`output_kind` returns
OUTPUT_KINDS = ("logits", "probabilities", "log-probabilities")

_TRUST_OTHERS = ("BPDA through the offending part, transfer and black-box (Square) numbers are the ones to trust, "
                 "and the reported robust accuracy is the lowest over all attacks")


@dataclass
class Flag:
    """One warning sign raised by a check.

    ``name`` is a short stable id ("zero-gradients", "probability-outputs",
    "log-probability-outputs", "randomized", "single-step-beats-iterative",
    "black-box-beats-white-box", "no-convergence-at-large-eps", "accuracy-rises-with-eps");
    ``message`` says what was measured, with the numbers; ``meaning`` says what it implies for the
    robustness number and what the evaluation does about it."""

    name: str
    message: str
    meaning: str

    def to_dict(self) -> dict:
        """``{"name", "message", "meaning"}``, for JSON reports."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------- helpers
def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise AdvlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_batch(x: torch.Tensor) -> torch.Tensor:
    check_images(x, "x")
    if x.shape[0] == 0:
        raise AdvlabError("x is an empty batch: the checks need at least one image")
    return x


def _scores(out, n: int) -> torch.Tensor:
    """Check that a model output is a floating (n, K) score matrix."""
    if not isinstance(out, torch.Tensor):
        raise AdvlabError(f"the model must return a tensor of scores of shape (N, K), got {type(out).__name__}")
    if out.dim() != 2 or out.shape[0] != n:
        raise AdvlabError(f"the model must return scores of shape ({n}, K) for {n} images, got shape {tuple(out.shape)}")
    if not out.is_floating_point():
        raise AdvlabError(f"the model must return floating-point scores, got dtype {out.dtype} "
                          "(a model that returns class indices has no gradient to check)")
    return out


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for i in range(0, n, batch_size):
        yield slice(i, i + batch_size)


def _pct(v: float) -> str:
    return f"{100.0 * v:.1f}%"


# ---------------------------------------------------------------------------------------------- model checks
def zero_gradient_fraction(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Loss = "ce",
                           batch_size: int = 256) -> float:
    """Fraction of the inputs whose input gradient of the attack loss is exactly zero everywhere.

    Detects *shattered* and *vanishing* gradients (Athalye et al. 2018, section 3; AutoAttack's
    ``check_zero_gradients``): a non-differentiable preprocessing step (quantisation, JPEG,
    thresholding; its gradient is zero almost everywhere) or a saturated softmax (probability /
    log-probability outputs, a temperature in front of the softmax) leave a gradient attack with
    no direction to step in, so it returns the clean image and the robust accuracy it reports is
    meaningless; BPDA (Athalye et al., section 4.1) or the margin loss are the remedies. The
    PCL paper, section 5.5, sees the consequence (single-step beating iterative attacks, see
    :func:`attack_checks`) rather than the cause.

    The loss is taken on the model's outputs *treated as logits*, as an attack would: ``"ce"``
    (cross-entropy of ``y``), ``"margin"`` (the C&W logit margin) or a callable
    ``loss(logits, y, target) -> (N,)`` (see :func:`advlab.attacks.gradient.attack_objective`).
    A model whose output does not depend on ``x`` through autograd counts as all zero.
    Non-finite gradients are not counted as zero.
    """
    _check_model(model)
    _check_batch(x)
    loss = _check_loss(loss)
    batch_size = check_positive_int(batch_size, "batch_size")
    n = x.shape[0]
    check_labels(y, n, None, "y")
    dev = model_device(model)
    zero = 0
    with frozen_eval(model), torch.enable_grad():
        for sl in _batches(n, batch_size):
            xb = x[sl].detach().to(dev).requires_grad_(True)
            out = _scores(model(xb), xb.shape[0])
            if sl.start == 0:
                check_labels(y, n, out.shape[1], "y")
            yb = y[sl].to(dev)
            if not out.requires_grad:
                zero += xb.shape[0]
                continue
            obj = attack_objective(out, yb, None, loss)
            (grad,) = torch.autograd.grad(obj.sum(), xb, allow_unused=True)
            if grad is None:
                zero += xb.shape[0]
                continue
            zero += int((grad.detach().flatten(1) == 0).all(dim=1).sum())
    return zero / n


def output_kind(model: nn.Module, x: torch.Tensor, atol: float = 1e-4, *, batch_size: int = 256) -> str:
    """What the model returns: ``"probabilities"`` (every row non-negative and summing to 1 within
    ``atol``), ``"log-probabilities"`` (every row <= 0 and its logsumexp 0 within ``atol``), or
    ``"logits"`` (anything else).

    Detects a softmax left at the end of the model (AutoAttack's ``check_range_output``; the
    vanishing gradients of Athalye et al. 2018, section 3): attacks treat the output as logits,
    and the cross-entropy of probabilities is nearly flat, while that of log-probabilities is the
    true cross-entropy but saturates (exactly zero gradient in float32) once the softmax is
    confident. A defense that hides a sharp softmax behind log-probabilities masks gradients.
    Checked on every row of ``x``; NaN scores raise :class:`AdvlabError`. (The PCL paper,
    section 5.5, does not list this sign; it shows up there as single-step attacks beating
    iterative ones.)"""
    _check_model(model)
    _check_batch(x)
    atol = check_nonneg(atol, "atol")
    batch_size = check_positive_int(batch_size, "batch_size")
    dev = model_device(model)
    is_prob = is_logprob = True
    with frozen_eval(model), torch.no_grad():
        for sl in _batches(x.shape[0], batch_size):
            xb = x[sl].detach().to(dev)
            out = _scores(model(xb), xb.shape[0]).double()
            if bool(torch.isnan(out).any()):
                raise AdvlabError("the model returned NaN scores; its outputs cannot be classified")
            if is_prob:
                is_prob = bool((out >= -atol).all()) and bool(((out.sum(1) - 1.0).abs() <= atol).all())
            if is_logprob:
                is_logprob = bool((out <= atol).all()) and bool((out.logsumexp(1).abs() <= atol).all())
            if not (is_prob or is_logprob):
                return "logits"
    return "probabilities" if is_prob else "log-probabilities"


def is_randomized(model: nn.Module, x: torch.Tensor, repeats: int = 3, *, rtol: float = 1e-4,
                  batch_size: int = 256) -> bool:
    """Whether two or more forward passes on the same input, in eval mode, differ.

    Detects *stochastic gradients* (Athalye et al. 2018, section 3, remedy EoT in section 4.2;
    AutoAttack's ``check_randomized``): a model that adds noise, drops activations or transforms its input at
    random at test time makes a single gradient a noisy sample, so attacks that do not average
    over the randomness (Expectation over Transformation) underestimate it; a changing prediction
    also makes the robust accuracy itself a random variable. A pass differs from the first when
    the predicted class changes on any row or when a row of scores moves by more than ``rtol``
    relative to its L2 norm (the tolerance absorbs the rounding of non-deterministic GPU kernels).
    """
    _check_model(model)
    _check_batch(x)
    repeats = check_positive_int(repeats, "repeats", minimum=2)
    rtol = check_nonneg(rtol, "rtol")
    batch_size = check_positive_int(batch_size, "batch_size")
    dev = model_device(model)
    with frozen_eval(model), torch.no_grad():
        for sl in _batches(x.shape[0], batch_size):
            xb = x[sl].detach().to(dev)
            first = _scores(model(xb), xb.shape[0])
            scale = first.double().nan_to_num(0.0, posinf=0.0, neginf=0.0).norm(dim=1).clamp_min(1e-12)
            for _ in range(repeats - 1):
                out = _scores(model(xb), xb.shape[0])
                if out.shape != first.shape:
                    return True
                if bool((out.argmax(1) != first.argmax(1)).any()):
                    return True
                if not torch.equal(torch.isnan(out), torch.isnan(first)):
                    return True
                # an output that turns infinite (or changes the sign of its infinity) between two calls
                if not (torch.equal(torch.isposinf(out), torch.isposinf(first))
                        and torch.equal(torch.isneginf(out), torch.isneginf(first))):
                    return True
                # infinities now sit in the same places in both: their difference is NaN, counted as 0
                diff = (out.double() - first.double()).nan_to_num(0.0, posinf=0.0, neginf=0.0).norm(dim=1)
                if bool((diff > rtol * scale).any()):
                    return True
    return False


def model_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, zero_grad_threshold: float = 0.1, *,
                 loss: Loss = "ce", repeats: int = 3, batch_size: int = 256) -> list[Flag]:
    """Run the three model checks and return the flags they raise (empty when none does).

    - ``"zero-gradients"``: the fraction of inputs with an exactly-zero loss gradient
      (:func:`zero_gradient_fraction`) exceeds ``zero_grad_threshold`` (shattered / vanishing
      gradients, Athalye et al. 2018 section 3; AutoAttack's ``check_zero_gradients``);
    - ``"probability-outputs"`` / ``"log-probability-outputs"``: the model returns a softmax or a
      log-softmax (:func:`output_kind`; AutoAttack's ``check_range_output``), whose saturation
      masks the cross-entropy gradient;
    - ``"randomized"``: forward passes differ in eval mode (:func:`is_randomized`; stochastic
      gradients, Athalye et al. 2018 section 3; AutoAttack's ``check_randomized``): EoT is needed.

    These look at the causes of masking; the PCL paper's section 5.5 signs are its symptoms in the
    numbers (:func:`attack_checks`, :func:`eps_sweep_check`). ``x`` should be a few hundred clean
    test images with their labels ``y``; ``loss``, ``repeats`` and ``batch_size`` are passed to
    the checks."""
    _check_model(model)
    _check_batch(x)
    if isinstance(zero_grad_threshold, bool) or not (0.0 <= float(zero_grad_threshold) <= 1.0):
        raise AdvlabError(f"zero_grad_threshold must be in [0, 1], got {zero_grad_threshold}")
    threshold = float(zero_grad_threshold)
    n = x.shape[0]
    flags: list[Flag] = []

    frac = zero_gradient_fraction(model, x, y, loss=loss, batch_size=batch_size)
    if frac > threshold:
        flags.append(Flag(
            "zero-gradients",
            f"the {loss if isinstance(loss, str) else 'custom'}-loss input gradient is exactly zero on "
            f"{_pct(frac)} of {n} clean inputs ({round(frac * n)} images; threshold {_pct(threshold)})",
            "gradients are masked (shattered by a non-differentiable step or vanishing in a saturated softmax): "
            "gradient attacks take no step from these inputs, so white-box robust accuracy is an upper bound "
            f"only; {_TRUST_OTHERS}"))

    kind = output_kind(model, x, batch_size=batch_size)
    if kind == "probabilities":
        flags.append(Flag(
            "probability-outputs",
            f"every one of the {n} output rows is non-negative and sums to 1: the model returns probabilities, "
            "not logits",
            "attacks treat outputs as logits and the cross-entropy of probabilities is nearly flat, so gradients "
            "are masked: the white-box numbers are unreliable; attack the pre-softmax logits (remove the softmax) "
            "or use the margin loss, and trust black-box / transfer numbers over white-box ones"))
    elif kind == "log-probabilities":
        flags.append(Flag(
            "log-probability-outputs",
            f"every one of the {n} output rows is <= 0 with logsumexp 0: the model returns log-probabilities, "
            "not logits",
            "the cross-entropy of a log-softmax saturates (exactly zero gradient) once the softmax is confident, "
            "masking gradients, the more so behind a temperature: attack the pre-softmax logits or use the margin "
            "loss; until then the white-box numbers are unreliable and black-box / transfer numbers are the ones "
            "to trust"))

    if is_randomized(model, x, repeats, batch_size=batch_size):
        flags.append(Flag(
            "randomized",
            f"{repeats} forward passes in eval mode on the same {n} inputs gave different outputs",
            "the model is randomized (stochastic gradients): single-sample gradients are noisy and the robust "
            "accuracy is itself random; attack with Expectation over Transformation (average gradients over many "
            "draws) and report the accuracy over several draws"))
    return flags


# ---------------------------------------------------------------------------------------------- number checks
def _check_acc(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AdvlabError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if not math.isnan(v) and not (0.0 <= v <= 1.0):
        raise AdvlabError(f"{what} must be a robust accuracy in [0, 1] (a fraction, not a percentage), got {value!r}")
    return v


def _names(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        names = tuple(value)
    except TypeError:
        raise AdvlabError(f"{what} must be a sequence of attack names, got {value!r}") from None
    for name in names:
        if not isinstance(name, str):
            raise AdvlabError(f"{what} must hold attack names (str), got {name!r}")
    return names


def _fmt(items: Iterable[tuple[str, float]]) -> str:
    return ", ".join(f"{k} {_pct(v)}" for k, v in items)


def attack_checks(robust: Mapping[str, float], *, single_step: Sequence[str] = ("FGSM",),
                  iterative: Sequence[str] = ("PGD", "APGD-CE"), black_box: Sequence[str] = ("Square",),
                  transfer: Sequence[str] = (), tol: float = 0.0) -> list[Flag]:
    """Flags from the robust accuracies of several attacks on the same images (``{name: acc}``,
    accuracies as fractions in [0, 1]; names are matched case-insensitively; NaN entries, from
    empty runs, and names not in ``robust`` are ignored).

    - ``"single-step-beats-iterative"``: a single-step attack leaves a *lower* robust accuracy
      than an iterative one, by more than ``tol``. An iterative attack with the same budget
      contains the single step; losing to it means the iterative attack is led astray by a
      misleading local gradient (Athalye et al. 2018, section 3.1, "one-step attacks perform
      better than iterative attacks"; the PCL paper, section 5.5, "iterative attacks perform
      better than one-step attacks").
    - ``"black-box-beats-white-box"``: a black-box or transfer attack leaves a lower robust
      accuracy than *every* white-box attack (every name not listed in ``black_box`` or
      ``transfer``), by more than ``tol``. With the gradients the white-box attacker should do at
      least as well (Athalye et al. 2018, section 3.1, "black-box attacks are better than
      white-box attacks"; AutoAttack's ``check_square_sr``; the PCL paper, section 5.5,
      "robustness against black-box settings is higher than white-box settings").
    """
    if not isinstance(robust, Mapping):
        raise AdvlabError(f"robust must be a dict of attack name -> robust accuracy, got {type(robust).__name__}")
    tol = check_nonneg(tol, "tol")
    groups = {"single_step": _names(single_step, "single_step"), "iterative": _names(iterative, "iterative"),
              "black_box": _names(black_box, "black_box"), "transfer": _names(transfer, "transfer")}
    seen: dict[str, str] = {}
    for group, names in groups.items():
        for name in names:
            other = seen.setdefault(name.lower(), group)
            if other != group:
                raise AdvlabError(f"attack {name!r} is listed both in {other} and in {group}")
    acc: dict[str, tuple[str, float]] = {}
    for name, value in robust.items():
        if not isinstance(name, str):
            raise AdvlabError(f"robust must be keyed by attack name (str), got key {name!r}")
        if name.lower() in acc:
            raise AdvlabError(f"robust holds attack {name!r} twice (names are case-insensitive)")
        v = _check_acc(value, f"robust[{name!r}]")
        if not math.isnan(v):
            acc[name.lower()] = (name, v)

    def present(names: Iterable[str]) -> list[tuple[str, float]]:
        return [acc[n.lower()] for n in names if n.lower() in acc]

    flags: list[Flag] = []
    single, iters = present(groups["single_step"]), present(groups["iterative"])
    pairs = [(s, i) for s in single for i in iters if s[1] < i[1] - tol]
    if pairs:
        worst = max(pairs, key=lambda p: p[1][1] - p[0][1])
        flags.append(Flag(
            "single-step-beats-iterative",
            "single-step attacks leave lower robust accuracy than iterative ones: "
            + "; ".join(f"{s[0]} {_pct(s[1])} < {i[0]} {_pct(i[1])}" for s, i in pairs)
            + f" (largest gap {_pct(worst[1][1] - worst[0][1])}, tolerance {_pct(tol)})",
            "the iterative attack is misled by the local gradient (gradients are masked or the attack is badly "
            "tuned), so its number is not an upper bound on true robustness: use the lowest robust accuracy over "
            f"all attacks, rerun the iterative attack with restarts, more steps or the margin loss; {_TRUST_OTHERS}"))

    outside = {n.lower() for n in groups["black_box"] + groups["transfer"]}
    white = [v for k, v in acc.items() if k not in outside]
    others = present(groups["black_box"]) + present(groups["transfer"])
    if white and others:
        best_white = min(white, key=lambda kv: kv[1])
        beating = [o for o in others if o[1] < best_white[1] - tol]
        if beating:
            flags.append(Flag(
                "black-box-beats-white-box",
                f"{_fmt(beating)} beat{'s' if len(beating) == 1 else ''} every white-box attack (best white-box: "
                f"{best_white[0]} {_pct(best_white[1])}; tolerance {_pct(tol)})",
                "an attacker without gradients does better than one with them: gradients are masked and white-box "
                f"attacks are unreliable; {_TRUST_OTHERS}"))
    return flags


def eps_sweep_check(eps: Sequence[float], robust_acc: Sequence[float], floor: float = 0.05, *,
                    tol: float = 0.01) -> list[Flag]:
    """Flags from a robust-accuracy-versus-budget curve of one attack (points in any order).

    Robust accuracy must fall as the budget grows (the larger ball contains the smaller one) and
    reach about 0 when the budget is large: at L-inf eps = 1 any image is reachable, so the check
    is only as strong as the largest eps in the sweep. Athalye et al. 2018, section 3.1
    ("increasing distortion bound does not increase success", "unbounded attacks do not reach
    100% success"), and the PCL paper, section 5.5 ("increasing the distortion bound decreases
    the robustness of defense"; "for an unbounded distortion, the classifier should exhibit 0%
    robustness").

    - ``"no-convergence-at-large-eps"``: the accuracy at the largest eps is above ``floor``;
    - ``"accuracy-rises-with-eps"``: the accuracy at some eps exceeds that at a smaller eps by more
      than ``tol`` (the curve is not roughly non-increasing).
    """
    try:
        e = [float(v) for v in eps]
        a = [float(v) for v in robust_acc]
    except (TypeError, ValueError):
        raise AdvlabError("eps and robust_acc must be sequences of numbers") from None
    if len(e) != len(a):
        raise AdvlabError(f"eps and robust_acc must have the same length, got {len(e)} and {len(a)}")
    if not e:
        raise AdvlabError("eps_sweep_check needs at least one (eps, robust_acc) point")
    for v in e:
        if not (math.isfinite(v) and v >= 0.0):
            raise AdvlabError(f"eps values must be finite and >= 0, got {v}")
    if len(set(e)) != len(e):
        raise AdvlabError(f"eps values must be distinct, got {list(eps)}")
    for i, v in enumerate(a):
        if math.isnan(_check_acc(v, f"robust_acc[{i}]")):
            raise AdvlabError(f"robust_acc[{i}] is NaN (an empty run?)")
    floor = _check_acc(floor, "floor")
    if math.isnan(floor):
        raise AdvlabError("floor must be a number in [0, 1], got nan")
    tol = check_nonneg(tol, "tol")
    pts = sorted(zip(e, a))
    flags: list[Flag] = []

    rises = []
    best: tuple[float, float] | None = None
    for pe, pa in pts:
        if best is not None and pa > best[1] + tol:
            rises.append((best, (pe, pa)))
        if best is None or pa < best[1]:
            best = (pe, pa)
    if rises:
        flags.append(Flag(
            "accuracy-rises-with-eps",
            "robust accuracy rises with the budget: "
            + "; ".join(f"{_pct(lo[1])} at eps={lo[0]:g} but {_pct(hi[1])} at eps={hi[0]:g}" for lo, hi in rises)
            + f" (tolerance {_pct(tol)})",
            "a larger budget contains every smaller-budget adversarial, so the attack is failing where it "
            "succeeded before (masked gradients or a badly tuned attack): the curve is not a robustness "
            f"measurement; take the running minimum over eps as the best estimate; {_TRUST_OTHERS}"))

    last_e, last_a = pts[-1]
    if last_a > floor:
        flags.append(Flag(
            "no-convergence-at-large-eps",
            f"robust accuracy is still {_pct(last_a)} at the largest eps={last_e:g} (floor {_pct(floor)}; "
            f"curve: {', '.join(f'{_pct(pa)} at {pe:g}' for pe, pa in pts)})",
            "a large enough budget breaks any classifier, so an attack that does not reach about 0% is failing "
            "(masked gradients, too few steps, or the budget is still small): the robust accuracies of this "
            f"attack are not trustworthy; {_TRUST_OTHERS}"))
    return flags
