"""Adaptive-attack model wrappers of Athalye, Carlini & Wagner 2018, "Obfuscated Gradients Give a
False Sense of Security", section 4: BPDA for shattered gradients, EoT for stochastic ones.

- :class:`BPDA` (section 4.1, Backward Pass Differentiable Approximation): the named layers of a
  model (a quantiser, a thresholding step, a ``sign``, a JPEG-like preprocessing) run forward
  unchanged but are differentiated as a differentiable approximation ``g`` with ``g(x) ~ f(x)``,
  the identity by default (the straight-through estimator). Any gradient attack run on the
  wrapper is then an adaptive BPDA attack; its adversarials are judged by the real model (the
  wrapper's forward values are exactly the model's).
- :func:`find_gradient_killers` names the layers that turn a nonzero incoming gradient into an
  exactly-zero one, and :func:`auto_bpda` wraps them when the input gradient is masked.
- :class:`EoT` (section 4.2, Expectation over Transformation): the forward pass of a randomized
  model averaged over ``samples`` draws, so that a gradient attack on the wrapper follows the
  gradient of the expected loss instead of that of one random draw.

>>> wrapped = BPDA(model, layers=["quant"])           # identity in the backward pass
>>> x_adv = PGD(wrapped, eps=0.3, steps=40)(x, y)     # judge x_adv with ``model`` itself
>>> x_adv = PGD(EoT(noisy_model, samples=16), eps=0.1)(x, y)

The wrappers hold the model as their submodule ``model`` and never change it: the hooks they
need are registered for the duration of one call and removed after (also on error), and they
start in the model's training mode, so an attack's eval guard on the wrapper restores the model
as it found it. Everything runs on the model's device.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import REJECT
from .._util import AdvlabError, check_images, check_labels, check_positive_int, frozen_eval, model_device
from ..nn.taps import find_module

__all__ = ["StraightThrough", "straight_through", "BPDA", "find_gradient_killers", "auto_bpda", "EoT"]

Approx = Callable[[torch.Tensor], torch.Tensor]
LayerSpec = Union[str, nn.Module]


# ---------------------------------------------------------------------------------------------- straight-through
class StraightThrough(torch.autograd.Function):
    """``StraightThrough.apply(x, fn, approx=None)``: forward ``fn(x)`` exactly; backward the
    vector-Jacobian product of ``approx`` at ``x`` (the identity when ``approx`` is None, which
    needs ``fn(x)`` to have the shape of ``x``).

    ``fn`` runs without autograd (it need not be differentiable at all: ``torch.round``,
    ``torch.sign``, a numpy JPEG codec wrapped in a tensor function); ``approx`` is recomputed on
    the saved ``x`` in the backward pass and must return a tensor of ``fn(x)``'s shape. Gradients
    reach ``x`` only (not any parameters inside ``fn``). See :func:`straight_through` for the
    keyword form."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Approx, approx: Optional[Approx] = None) -> torch.Tensor:
        out = fn(x)
        if not isinstance(out, torch.Tensor):
            raise AdvlabError(f"the forward function must return a tensor, got {type(out).__name__}")
        if approx is None and out.shape != x.shape:
            raise AdvlabError(f"the identity approximation needs fn(x) to keep the shape of x: "
                              f"{tuple(x.shape)} -> {tuple(out.shape)}; pass approx= (a differentiable "
                              "function with fn's input and output shapes)")
        ctx.approx = approx
        ctx.out_shape = out.shape
        if approx is not None:
            ctx.save_for_backward(x)
        # returning an input as it is would make the result alias x; a copy keeps the graph simple
        return out.clone() if out is x else out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        if ctx.approx is None:
            return grad, None, None
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            a = ctx.approx(xd)
            if not isinstance(a, torch.Tensor) or a.shape != ctx.out_shape:
                got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                raise AdvlabError(f"approx must return a tensor of the forward output's shape "
                                  f"{tuple(ctx.out_shape)}, got {got}")
            if not a.requires_grad:
                return torch.zeros_like(x), None, None
            (gx,) = torch.autograd.grad(a, xd, grad.to(a.dtype), allow_unused=True)
        return (torch.zeros_like(x) if gx is None else gx), None, None


def straight_through(x: torch.Tensor, fn: Approx, approx: Optional[Approx] = None) -> torch.Tensor:
    """``fn(x)`` in the forward pass, differentiated as ``approx`` (default: the identity).

    >>> y = straight_through(x, lambda t: torch.round(t * 4) / 4)   # quantise, gradient 1"""
    if not callable(fn):
        raise AdvlabError(f"fn must be callable, got {type(fn).__name__}")
    if approx is not None and not callable(approx):
        raise AdvlabError(f"approx must be a callable (x -> tensor) or None, got {type(approx).__name__}")
    return StraightThrough.apply(x, fn, approx)


# ---------------------------------------------------------------------------------------------- helpers
def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise AdvlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _first_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else None
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    return None


def _delegates(model: nn.Module, method: str) -> bool:
    """Whether ``model`` has a callable ``method`` of its own that a wrapper should delegate to
    (a Defense's ``detect`` counts only when it has a detector)."""
    if not callable(getattr(model, method, None)):
        return False
    if method == "detect" and getattr(model, "has_detector", True) is False:
        return False
    return True


# ---------------------------------------------------------------------------------------------- BPDA
class _Wrapper(nn.Module):
    """What BPDA and EoT both pass through from the wrapped ``self.model``."""

    @property
    def randomized(self) -> bool:
        return bool(getattr(self.model, "randomized", False))

    @property
    def has_detector(self) -> bool:
        return _delegates(self.model, "detect")


class BPDA(_Wrapper):
    """Wrap ``model`` so that the named layers run forward unchanged but are differentiated as
    ``approx`` (Athalye et al. 2018, section 4.1).

    ``layers``: layer names as :func:`advlab.nn.taps.find_module` takes them (``"quant"``,
    ``"features.3"``), module objects inside ``model``, or a mix; a single name is accepted.
    Each listed layer must take its input as its first argument and return one tensor; its
    output value is kept bit for bit, and in the backward pass the gradient reaching its output
    goes to its input through ``approx`` instead of through the layer. The layer's own
    parameters get no gradient through it.

    ``approx``: None for the identity (straight-through; the layer must keep the shape of its
    input), a differentiable callable ``g(x)`` returning the layer's output shape (e.g. a smooth
    sigmoid for a threshold), or a mapping ``{layer name: callable or None}`` for one per layer
    (layers not in the mapping use the identity).

    ``input_transform``: a non-differentiable preprocessing function applied to the input before
    the model (a quantiser, JPEG, bit-depth reduction), differentiated as the identity; it must
    keep the input's shape. It is part of the wrapped classifier: :meth:`forward`,
    :meth:`predict` and :meth:`detect` all see ``model(input_transform(x))``.

    :meth:`predict` delegates to ``model.predict`` when the model has one (a defense may return
    ``advlab.REJECT``), else takes the argmax of :meth:`forward`; :meth:`detect` delegates to
    ``model.detect`` (differentiated with the same approximations, for attacks on detectors).
    ``randomized`` mirrors the model's flag.

    The hooks are registered on the listed layers for the duration of each call and removed
    afterwards, so the model itself is never changed: attack the wrapper, judge the adversarials
    with the model. Layers that modify their input in place (``nn.ReLU(inplace=True)``) cannot
    be approximated (their input is gone) and raise :class:`AdvlabError`.
    """

    def __init__(self, model: nn.Module, layers: Union[LayerSpec, Sequence[LayerSpec]] = (),
                 approx: Union[None, Approx, Mapping[str, Optional[Approx]]] = None,
                 input_transform: Optional[Approx] = None):
        super().__init__()
        _check_model(model)
        self.model = model
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        try:
            layers = list(layers)
        except TypeError:
            raise AdvlabError(f"layers must be a list of layer names or modules, got {type(layers).__name__}") from None
        names: list[str] = []
        for layer in layers:
            name = self._resolve(model, layer)
            if name not in names:
                names.append(name)
        self.layer_names: tuple[str, ...] = tuple(names)
        if input_transform is not None and not callable(input_transform):
            raise AdvlabError(f"input_transform must be a callable (x -> x') or None, got "
                              f"{type(input_transform).__name__}")
        self.input_transform = input_transform
        if isinstance(approx, Mapping):
            unknown = [k for k in approx if k not in self.layer_names]
            if unknown:
                raise AdvlabError(f"approx names layers not in layers: {', '.join(map(str, unknown))}; "
                                  f"layers: {', '.join(self.layer_names) or '(none)'}")
            bad = [k for k, v in approx.items() if v is not None and not callable(v)]
            if bad:
                raise AdvlabError(f"approx for layer {bad[0]!r} must be a callable or None, got "
                                  f"{type(approx[bad[0]]).__name__}")
            self._approx = {n: approx.get(n) for n in self.layer_names}
        elif approx is None or callable(approx):
            self._approx = {n: approx for n in self.layer_names}
        else:
            raise AdvlabError(f"approx must be None (identity), a callable or a mapping layer name -> callable, "
                              f"got {type(approx).__name__}")
        if not self.layer_names and input_transform is None:
            valid = ", ".join(n for n, _ in model.named_modules() if n)
            raise AdvlabError("BPDA needs layers to approximate or an input_transform; with neither it would be "
                              f"the model itself (layers of the model: {valid})")
        # start in the model's mode (without touching its submodules): an attack's eval guard on
        # the wrapper then puts the model back in the mode it found it in
        self.training = model.training

    @staticmethod
    def _resolve(model: nn.Module, layer: LayerSpec) -> str:
        if isinstance(layer, str):
            if not layer:
                raise AdvlabError("a layer name must not be empty (the empty name is the model itself); "
                                  f"layers: {', '.join(n for n, _ in model.named_modules() if n)}")
            find_module(model, layer)  # raises with the valid names
            return layer
        if isinstance(layer, nn.Module):
            for n, m in model.named_modules():
                if m is layer and n:
                    return n
            raise AdvlabError(f"layer {type(layer).__name__} is not a submodule of the model; layers: "
                              f"{', '.join(n for n, _ in model.named_modules() if n)}")
        raise AdvlabError(f"layers must hold layer names (str) or nn.Module objects, got {type(layer).__name__}")

    @contextlib.contextmanager
    def _approximated(self) -> Iterator[None]:
        """Register the straight-through hooks on the listed layers; remove them on exit."""
        handles = []

        def make_hook(name: str, approx: Optional[Approx]):
            def hook(module, args, kwargs, output):
                inp = _first_tensor(args, kwargs)
                if inp is None:
                    raise AdvlabError(f"BPDA layer {name!r} must take a tensor as its first argument")
                if not isinstance(output, torch.Tensor):
                    raise AdvlabError(f"BPDA layer {name!r} must return one tensor, got {type(output).__name__}")
                if output is inp:
                    raise AdvlabError(f"BPDA layer {name!r} returns its input modified in place, so its input "
                                      "cannot be differentiated: build it with inplace=False")
                if approx is None and output.shape != inp.shape:
                    raise AdvlabError(f"BPDA layer {name!r} changes the shape {tuple(inp.shape)} -> "
                                      f"{tuple(output.shape)}, so the identity cannot stand for it: pass "
                                      "approx= (a differentiable function with the layer's input and output shapes)")
                if not (torch.is_grad_enabled() and inp.requires_grad):
                    return None  # nothing to differentiate: keep the output as it is
                value = output.detach()
                return StraightThrough.apply(inp, lambda _: value, approx)
            return hook

        try:
            for name in self.layer_names:
                module = find_module(self.model, name)
                handles.append(module.register_forward_hook(make_hook(name, self._approx[name]), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is None:
            return x
        if torch.is_grad_enabled() and x.requires_grad:
            return StraightThrough.apply(x, self.input_transform, None)
        out = self.input_transform(x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise AdvlabError(f"input_transform must return a tensor of the input's shape {tuple(x.shape)}, got {got}")
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``model(input_transform(x))``, values unchanged, differentiated through the approximations."""
        with self._approximated():
            return self.model(self._transform(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class indices: ``model.predict`` when the model has one (``advlab.REJECT`` allowed),
        else the argmax of :meth:`forward`; on the input transformed by ``input_transform``."""
        xt = self._transform(x)
        if _delegates(self.model, "predict"):
            return self.model.predict(xt)
        return self.model(xt).argmax(1)

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """``model.detect(input_transform(x))``, differentiated through the approximations."""
        if not _delegates(self.model, "detect"):
            raise AdvlabError(f"{type(self.model).__name__} has no detector (detect)")
        with self._approximated():
            return self.model.detect(self._transform(x))

    def extra_repr(self) -> str:
        parts = [f"layers={list(self.layer_names)}"]
        if any(v is not None for v in self._approx.values()):
            parts.append("approx=custom")
        if self.input_transform is not None:
            parts.append(f"input_transform={getattr(self.input_transform, '__name__', type(self.input_transform).__name__)}")
        return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- finding killers
def _probe_loss(out: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of the outputs: every output gets a nonzero weight, and it does
    not saturate (unlike a cross-entropy, whose float32 gradient is exactly zero on confident
    samples) nor cancel (unlike the sum of probabilities)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(0)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    return (out * w).sum()


def find_gradient_killers(model: nn.Module, x: torch.Tensor, names: Optional[Sequence[str]] = None, *,
                          min_fraction: float = 0.5) -> list[str]:
    """Names of the layers that kill the gradient on this batch: candidates for :class:`BPDA`.

    A layer kills the gradient of a sample when a nonzero gradient reaches its output but the
    gradient it passes back to its input is exactly zero (or absent: an output that does not
    depend on the input through autograd, e.g. ``detach`` or an integer result cast back); the
    layer is reported when that holds on at least ``min_fraction`` of the samples that send a
    nonzero gradient to its output. Quantisers (``round``, ``floor``), ``sign``, thresholds
    (``(x > t).float()``) and saturated clamps are the usual ones; a ReLU or a max-pool, which
    pass a gradient to part of their input, are not.

    The gradient is that of a fixed random projection of the model's outputs (seeded, so repeated
    calls agree), taken in one forward pass under eval mode with the parameters frozen; forward
    hooks retain each layer's input and output and are removed afterwards.

    ``names``: the layers to examine (default: every submodule). Among the layers found, a
    container is reported only when none of its submodules is (the killing then happens in its
    own forward code, e.g. a functional ``torch.sign``), so the names are the innermost culprits;
    the model itself is never reported. Pass a few dozen images: the graph of the whole batch is
    kept while the layers are examined.
    """
    _check_model(model)
    check_images(x, "x")
    if x.shape[0] == 0:
        raise AdvlabError("x is an empty batch: find_gradient_killers needs at least one image")
    if isinstance(min_fraction, bool) or not (0.0 < float(min_fraction) <= 1.0):
        raise AdvlabError(f"min_fraction must be in (0, 1], got {min_fraction}")
    min_fraction = float(min_fraction)
    modules = dict(model.named_modules())
    if names is None:
        candidates = [n for n in modules if n]
    else:
        if isinstance(names, str):
            names = [names]
        candidates = []
        for n in names:
            if not isinstance(n, str) or not n:
                raise AdvlabError(f"names must hold non-empty layer names, got {n!r}; layers: "
                                  f"{', '.join(k for k in modules if k)}")
            find_module(model, n)
            if n not in candidates:
                candidates.append(n)
    if not candidates:
        return []
    dev = model_device(model)
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in candidates}
    handles = []

    def make_hook(name: str):
        def hook(module, args, kwargs, output):
            inp = _first_tensor(args, kwargs)
            if inp is None or not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return None
            if not inp.requires_grad or output.shape[:1] != inp.shape[:1]:
                return None
            if not output.requires_grad:
                # the layer cut the graph: make its output a leaf to measure the gradient reaching it;
                # nothing upstream loses a gradient it had
                output = output.detach().requires_grad_(True)
                records[name].append((inp, output))
                return output
            records[name].append((inp, output))
            return None
        return hook

    with frozen_eval(model), torch.enable_grad():
        try:
            for n in candidates:
                handles.append(modules[n].register_forward_hook(make_hook(n), with_kwargs=True))
            xd = x.detach().to(dev).requires_grad_(True)
            out = model(xd)
        finally:
            for h in handles:
                h.remove()
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise AdvlabError("the model must return a floating-point tensor of scores")
        if not out.requires_grad:
            # the graph is cut after the last layer that recorded anything: no layer gets a gradient
            return []
        flat = [(n, i, o) for n, recs in records.items() for i, o in recs]
        outs = [o for _, _, o in flat]
        if not outs:
            return []
        ups = torch.autograd.grad(_probe_loss(out), outs, allow_unused=True, retain_graph=True)
        killed: dict[str, list[int]] = {}
        for (n, inp, o), g in zip(flat, ups):
            if g is None:
                continue
            reached = g.detach().reshape(g.shape[0], -1).ne(0).any(dim=1)
            if not bool(reached.any()):
                continue
            if o.grad_fn is None:
                gin = None  # a leaf made above: the layer's output does not depend on its input
            else:
                (gin,) = torch.autograd.grad(o, inp, g, allow_unused=True, retain_graph=True)
            if gin is None:
                dead = reached
            else:
                dead = reached & gin.detach().reshape(gin.shape[0], -1).eq(0).all(dim=1)
            k = killed.setdefault(n, [0, 0])
            k[0] += int(dead.sum())
            k[1] += int(reached.sum())
    found = [n for n in candidates if n in killed and killed[n][0] >= min_fraction * killed[n][1]]
    return [n for n in found if not any(m != n and m.startswith(n + ".") for m in found)]


# ---------------------------------------------------------------------------------------------- auto BPDA
def _zero_ce_gradient_fraction(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of the samples whose cross-entropy input gradient is exactly zero (as
    :func:`advlab.eval.checks.zero_gradient_fraction` with the CE loss; kept here so that
    ``adaptive`` does not import ``eval``)."""
    dev = model_device(model)
    with frozen_eval(model), torch.enable_grad():
        xd = x.detach().to(dev).requires_grad_(True)
        out = model(xd)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise AdvlabError(f"the model must return scores of shape ({x.shape[0]}, K), got {got}")
        yd = check_labels(y.to(dev), x.shape[0], out.shape[1], "y")
        if not out.requires_grad:
            return 1.0
        (g,) = torch.autograd.grad(F.cross_entropy(out, yd, reduction="sum"), xd, allow_unused=True)
    if g is None:
        return 1.0
    return float(g.flatten(1).eq(0).all(dim=1).float().mean())


def _same_shape(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> list[str]:
    """The layers among ``names`` whose output has the shape of their first input (on ``x``)."""
    if not names:
        return []
    shapes: dict[str, bool] = {}

    def make_hook(name: str):
        def hook(module, args, kwargs, output):
            inp = _first_tensor(args, kwargs)
            ok = inp is not None and isinstance(output, torch.Tensor) and output.shape == inp.shape
            shapes[name] = shapes.get(name, True) and ok
        return hook

    _forward_with_hooks(model, x, names, make_hook)
    return [n for n in names if shapes.get(n, False)]


def _forward_with_hooks(model: nn.Module, x: torch.Tensor, names: Sequence[str], make_hook) -> None:
    """One forward of ``x`` through ``model`` (eval mode, no gradient) with ``make_hook(name)``
    registered as a forward hook (``with_kwargs``) on each named layer, removed afterwards."""
    handles = []
    with frozen_eval(model), torch.no_grad():
        try:
            for n in names:
                handles.append(find_module(model, n).register_forward_hook(make_hook(n), with_kwargs=True))
            model(x.detach().to(model_device(model)))
        finally:
            for h in handles:
                h.remove()


def _lookups(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> dict[str, Optional[Approx]]:
    """For each layer in ``names``: its smoothed value table on its input over ``x``
    (:func:`~advlab.adaptive.decision.lookup_approx`), or None when it is not element-wise."""
    from .decision import lookup_approx

    if not names:
        return {}
    inputs: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module, args, kwargs, output):
            inp = _first_tensor(args, kwargs)
            if inp is not None and name not in inputs:
                inputs[name] = inp.detach()
        return hook

    _forward_with_hooks(model, x, names, make_hook)
    with frozen_eval(model), torch.no_grad():
        return {n: (lookup_approx(find_module(model, n), inputs[n]) if n in inputs else None) for n in names}


def auto_bpda(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, threshold: float = 0.5,
              max_rounds: int = 3) -> tuple[nn.Module, list[str]]:
    """The automatic BPDA path: when the cross-entropy input gradient is exactly zero on more than
    ``threshold`` of ``x`` (masked gradients), find the layers that kill it
    (:func:`find_gradient_killers`) and wrap them with :class:`BPDA` (identity approximation).

    Returns ``(BPDA wrapper, layer names)``, or ``(model, [])`` when the gradients are fine. When
    the gradient is still masked after wrapping (a killer hidden behind another), the killers of
    the wrapped model are added, up to ``max_rounds`` rounds. A layer that kills the gradient but
    changes the shape of its input (a thermometer encoding: the identity cannot stand for it) is
    approximated by its smoothed value table (:func:`advlab.adaptive.decision.lookup_approx`) when
    it acts on each input value alone, and left out with a ``RuntimeWarning`` otherwise (wrap it
    yourself with an ``approx``). When the gradient is masked but no
    layer kills it (a saturated softmax: vanishing rather than shattered gradients), a
    ``RuntimeWarning`` says so and ``(model, [])`` is returned: use the margin loss there.
    ``x`` should be a few dozen clean images with their labels ``y``.
    """
    _check_model(model)
    check_images(x, "x")
    if x.shape[0] == 0:
        raise AdvlabError("x is an empty batch: auto_bpda needs at least one image")
    check_labels(y, x.shape[0], None, "y")
    if isinstance(threshold, bool) or not (0.0 <= float(threshold) < 1.0):
        raise AdvlabError(f"threshold must be in [0, 1), got {threshold}")
    threshold = float(threshold)
    max_rounds = check_positive_int(max_rounds, "max_rounds")
    frac = _zero_ce_gradient_fraction(model, x, y)
    if frac <= threshold:
        return model, []
    names: list[str] = []
    reshaping: list[str] = []
    approx: dict[str, Optional[Approx]] = {}
    current: nn.Module = model
    prefix = "model."
    for _ in range(max_rounds):
        found = find_gradient_killers(current, x)
        if current is not model:
            found = [n[len(prefix):] for n in found if n.startswith(prefix)]
        found = [n for n in found if n not in names and n not in reshaping]
        keep = _same_shape(model, x, found)
        new = [n for n in found if n in keep]
        for n, g in _lookups(model, x, [n for n in found if n not in keep]).items():
            if g is None:
                reshaping.append(n)
            else:
                approx[n] = g
                new.append(n)
        if not new:
            break
        names.extend(new)
        current = BPDA(model, layers=names, approx={n: approx.get(n) for n in names})
        frac = _zero_ce_gradient_fraction(current, x, y)
        if frac <= threshold:
            break
    if reshaping:
        warnings.warn(f"layers {', '.join(reshaping)} kill the gradient but change the shape of their input, so the "
                      "identity cannot stand for them: wrap them with BPDA(model, layers, approx=...) yourself",
                      RuntimeWarning, stacklevel=2)
    if not names:
        if reshaping:
            return model, []
        warnings.warn(f"the input gradient is exactly zero on {100 * frac:.1f}% of the inputs but no layer turns a "
                      "nonzero gradient into a zero one (vanishing gradients, e.g. a saturated softmax): BPDA does "
                      "not apply; attack with the margin loss or the pre-softmax logits", RuntimeWarning, stacklevel=2)
        return model, []
    if frac > threshold:
        warnings.warn(f"after BPDA on {', '.join(names)} the input gradient is still exactly zero on "
                      f"{100 * frac:.1f}% of the inputs", RuntimeWarning, stacklevel=2)
    return current, names


# ---------------------------------------------------------------------------------------------- EoT
AVERAGES = ("logits", "probs")


class EoT(_Wrapper):
    """Expectation over Transformation (Athalye et al. 2018, section 4.2): the scores of a
    randomized model averaged over ``samples`` forward passes, so that gradients are the average
    over draws (a Monte-Carlo estimate of the gradient of the expected loss).

    ``average="logits"``: the mean of the model's outputs; ``"probs"``: the log of the mean of
    their softmax, i.e. ``log E[softmax]`` (log-probabilities, which attacks can treat as logits).
    With ``batched=True`` (default) the batch is replicated ``samples`` times and run in one
    forward pass; this assumes the model draws its randomness independently for every row of
    the batch (noise of the batch's shape, per-image transformations). A model that draws one
    random transformation per call for the whole batch needs ``batched=False`` (a Python loop of
    ``samples`` calls), or every replica would see the same draw.

    :meth:`predict`: when the model has its own ``predict`` (a defense, possibly returning
    ``advlab.REJECT``), the majority vote of ``samples`` draws of it, with ``REJECT`` counted as
    one more outcome and ties going to the smaller value (``REJECT`` first); otherwise the argmax
    of the averaged scores. :meth:`detect` averages ``model.detect`` over the draws.
    ``samples=1`` with ``average="logits"`` is the model itself.
    """

    def __init__(self, model: nn.Module, samples: int = 10, average: str = "logits", batched: bool = True):
        super().__init__()
        _check_model(model)
        self.model = model
        self.samples = check_positive_int(samples, "samples")
        if average not in AVERAGES:
            raise AdvlabError(f"average must be one of {', '.join(AVERAGES)}, got {average!r}")
        self.average = average
        if not isinstance(batched, bool):
            raise AdvlabError(f"batched must be True or False, got {batched!r}")
        self.batched = batched
        self.training = model.training

    def _draws(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``fn`` on ``samples`` copies of ``x``, stacked as (samples, N, ...)."""
        s, n = self.samples, x.shape[0]
        if self.batched and s > 1:
            out = fn(x.repeat(s, *([1] * (x.dim() - 1))))
            if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != s * n:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise AdvlabError(f"the model must return one row per input ({s * n} for {s} replicas of {n} "
                                  f"images), got {got}")
            return out.reshape(s, n, *out.shape[1:])
        outs = []
        for _ in range(s):
            out = fn(x)
            if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise AdvlabError(f"the model must return one row per input ({n}), got {got}")
            outs.append(out)
        return torch.stack(outs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The averaged scores (see the class docstring), shape of one model output."""
        out = self._draws(self.model, x)
        if self.average == "logits":
            return out.mean(dim=0)
        return torch.logsumexp(F.log_softmax(out, dim=-1), dim=0) - math.log(self.samples)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Majority vote of the model's ``predict`` over the draws when it has one, else the argmax
        of the averaged scores."""
        if x.shape[0] == 0:
            return torch.empty(0, dtype=torch.long, device=x.device)
        if not _delegates(self.model, "predict"):
            return self(x).argmax(1)
        votes = self._draws(self.model.predict, x).long()  # (samples, N)
        if self.samples == 1:
            return votes[0]
        lo = min(int(votes.min()), REJECT)
        shifted = votes - lo
        counts = torch.zeros(x.shape[0], int(shifted.max()) + 1, dtype=torch.long, device=votes.device)
        counts.scatter_add_(1, shifted.t(), torch.ones_like(shifted.t()))
        return counts.argmax(1) + lo  # argmax takes the first maximum: ties go to the smaller value

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """``model.detect`` averaged over the draws."""
        if not _delegates(self.model, "detect"):
            raise AdvlabError(f"{type(self.model).__name__} has no detector (detect)")
        return self._draws(self.model.detect, x).mean(dim=0)

    def extra_repr(self) -> str:
        return f"samples={self.samples}, average={self.average!r}, batched={self.batched}"
