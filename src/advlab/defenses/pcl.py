"""PCL: the prototype conformity loss with deep supervision (Mustafa et al., ICCV 2019).

Per supervised layer l, trainable class prototypes w^c_j (one row per class); eq. 5, per sample,

    ||f_i - w_{y_i}||  -  1/(k-1) sum_{j != y_i} ( ||f_i - w_j||  +  ||w_{y_i} - w_j|| )
      "pull"               "push"                    "separation"

with separate weights on the three terms, averaged over the batch (so that the 1:1 ratio with the
batch-mean cross-entropy of eq. 7 holds). Two readings of the training loss (``reading=``):

- ``"algorithm1"`` (the default; Algorithm 1 line 5 and the authors' released code): one
  cross-entropy on the final logits plus L_PC on every supervised layer's features themselves
  (G_phi of eq. 9 the identity);
- ``"eq8"`` (eq. 7-9 with Fig. 2's auxiliary branches): every supervised layer but the last gets
  an auxiliary branch G_phi, a small linear map to ``branch_dim`` (default 64) features on which
  L_PC acts, and a linear head on them whose cross-entropy is added (eq. 8: L^n = L_CE(f^l) +
  L_PC(f^l)); the last supervised layer (the features the final classifier reads) keeps eq. 7,
  L_CE on the final logits + L_PC on its own features. The branches are training-time
  regularisers: ``forward`` is the network's logits in both readings.

>>> defense = PCLDefense.fit(model, train_set, warmup_epochs=2, pc_epochs=3)   # Algorithm 1
>>> branched = PCLDefense.fit(model, train_set, pc_epochs=3, reading="eq8")     # eq. 8's auxiliary branches
>>> defense(x)                   # logits (what every reported number attacks and uses)
>>> defense.predict(x)           # argmax of the logits
>>> defense.predict(x, rule="prototype")   # eq. 6: nearest prototype of the last supervised layer
>>> defense.save("pcl.pt"); PCLDefense.load("pcl.pt")

Readings of the paper settled here:

- Branches: the features f^l are read by forward hooks (:func:`advlab.nn.taps`) on named layers,
  so any ``nn.Module`` works. On the zoo's ``cnn6`` they are ``model.feature_layers``: the GAP
  (128), FC 512 and FC 64 activations of Table 1. A tapped feature map with spatial dimensions is
  globally average-pooled (the GAP branch of Table 1); the auxiliary map G_phi of eq. 9 is the
  identity in the ``"algorithm1"`` reading, a linear map in ``"eq8"``. Other models: ``feature_layers``,
  else ``hidden_layers``, else the input of the last linear layer.
- Prototypes: one set per layer (two with the "official-code" preset), initialised by
  ``prototype_init``: for the "paper" preset (the default) at the class means of the warmed-up
  features on up to 2,000 training images (the paper leaves the initialisation open), for
  "official-code" N(0, 1) as the released code; stepped once per batch by their own plain SGD
  (lr 0.5) with their gradient rescaled by 1/weight of the term that owns them (the center-loss
  convention: the step does not depend on the weight). The step uses the gradient of the batch the
  model just stepped on, at the prototypes that batch saw: the released code's order (model step,
  then prototype step, per batch); it is taken when the next batch starts, or at the epoch's end.
- Model optimiser: ``optimizer="sgd"`` (the default: SGD, Nesterov momentum 0.9, lr 0.01, weight
  decay 1e-4) or ``"adam"`` (what ``advlab reproduce pcl`` uses, see ``specs/pcl.yaml``); the same
  optimiser for the CE warm-up. Its learning rate goes x0.1 at 2/3 and 5/6 of the PC phase (the
  paper's T = 200, 250 of 300); the warm-up has no decay. The prototypes keep their learning rate
  (center-loss convention).
- CE warm-up: ``warmup_epochs`` of plain cross-entropy first (T' of Algorithm 1); 0 when the model
  handed in is already trained.
- Adversarial training (Algorithm 1, lines 10-13): see :mod:`advlab.defenses.advtrain`; the
  adversarial examples are crafted on the joint loss CE + sum_l L_PC (``adv_objective="joint"``)
  or on CE only (``"ce"``), clean and adversarial 1:1 per batch.

The ``"official-code"`` preset reproduces the authors' released code instead of eq. 5: two
prototype sets per layer (``Proximity`` pulls, ``Con_Proximity`` pushes), squared distances, no
separation term, weights 1 and 1e-4, prototype learning rates 0.5 and 1e-4. The released code
never decays its learning rates (it writes ``param_group['lr_model']`` instead of ``'lr'``); we
decay the model's learning rate as the paper says.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._util import (AdvlabError, check_images, check_nonneg, check_positive_int, model_device, restore_train_modes,
                     train_modes)
from ..data import dataset_tensors
from ..nn import find_module, last_linear_name, taps
from .base import Defense, register_defense

__all__ = ["PRESETS", "pc_terms", "pc_loss", "PrototypeSet", "PCLDefense", "PrototypeScores", "JointLossScores",
           "joint_objective", "resolve_layers", "softmax_twin", "READINGS"]

#: loss presets: the paper's eq. 5 and the authors' released code
PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {"squared": False, "two_sets": False, "pull": 1.0, "push": 1.0, "separation": 1.0,
              "prototype_lr": 0.5, "push_prototype_lr": None},
    "official-code": {"squared": True, "two_sets": True, "pull": 1.0, "push": 1e-4, "separation": 0.0,
                      "prototype_lr": 0.5, "push_prototype_lr": 1e-4},
}


#: readings of the training loss: Algorithm 1 (one CE, G_phi the identity) and eq. 8 (auxiliary branches)
READINGS = ("algorithm1", "eq8")


# ---------------------------------------------------------------------------------------------- the loss
def _distances(f: torch.Tensor, w: torch.Tensor, squared: bool) -> torch.Tensor:
    """(N, k) distances from features (N, d) to prototypes (k, d): L2, or squared L2 (clamped to
    [1e-12, 1e12] as the released code). Computed from differences, not the expanded quadratic
    form, which loses all precision once PC has inflated the feature norms."""
    sq = (f[:, None, :] - w[None, :, :]).pow(2).sum(-1)
    if squared:
        return sq.clamp(1e-12, 1e12)
    return sq.clamp_min(1e-12).sqrt()


def pc_terms(f: torch.Tensor, y: torch.Tensor, prototypes: torch.Tensor,
             push_prototypes: Optional[torch.Tensor] = None, squared: bool = False
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample terms of eq. 5: ``pull`` = d(f_i, w_{y_i}), ``push`` = mean over j != y_i of
    d(f_i, w'_j) and ``separation`` = mean over j != y_i of d(w_{y_i}, w_j), each (N,). ``w'`` is
    ``push_prototypes`` when given (the released code's second set), else ``prototypes``; d is L2
    or, with ``squared``, squared L2."""
    if f.dim() != 2 or prototypes.dim() != 2 or f.shape[1] != prototypes.shape[1]:
        raise AdvlabError(f"features (N, d) and prototypes (k, d) must agree, got {tuple(f.shape)} and "
                          f"{tuple(prototypes.shape)}")
    k = prototypes.shape[0]
    if k < 2:
        raise AdvlabError("PC needs at least 2 classes")
    y = y.to(torch.long)
    if y.shape != (f.shape[0],) or (y.numel() and (int(y.min()) < 0 or int(y.max()) >= k)):
        raise AdvlabError(f"labels must have shape ({f.shape[0]},) and lie in [0, {k - 1}]")
    wp = prototypes if push_prototypes is None else push_prototypes
    own = F.one_hot(y, k).to(torch.bool)
    d_pull = _distances(f, prototypes, squared)
    pull = d_pull.gather(1, y[:, None]).squeeze(1)
    d_push = d_pull if push_prototypes is None else _distances(f, wp, squared)
    push = d_push.masked_fill(own, 0.0).sum(1) / (k - 1)
    d_ww = _distances(prototypes, prototypes, squared)                      # (k, k)
    sep_c = (d_ww.sum(1) - d_ww.diagonal()) / (k - 1)                        # per class
    return pull, push, sep_c[y]


def pc_loss(f: torch.Tensor, y: torch.Tensor, prototypes: torch.Tensor,
            push_prototypes: Optional[torch.Tensor] = None, pull: float = 1.0, push: float = 1.0,
            separation: float = 1.0, squared: bool = False) -> torch.Tensor:
    """L_PC of eq. 5 as a batch mean: mean_i [pull * pull_i - push * push_i - separation * sep_i]
    (see :func:`pc_terms`). With the defaults and one prototype set this is eq. 5 divided by N."""
    a, b, c = pc_terms(f, y, prototypes, push_prototypes, squared)
    return (pull * a - push * b - separation * c).mean()


def pc_milestones(n: int, epochs: int, batch_size: int, decay_at: Sequence[float] = (2 / 3, 5 / 6)) -> List[int]:
    """The optimiser steps at which a PC phase of ``epochs`` on ``n`` images in batches of
    ``batch_size`` multiplies the learning rate by 0.1 (at the fractions ``decay_at`` of it)."""
    steps = epochs * max(1, math.ceil(n / batch_size))
    return sorted({max(1, int(round(f * steps))) for f in decay_at})


class PrototypeSet(nn.Module):
    """The trainable prototypes of one supervised layer: ``pull`` (k, d) and, for the released
    code's variant, a second set ``push`` (k, d)."""

    def __init__(self, num_classes: int, dim: int, two_sets: bool = False,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.pull = nn.Parameter(torch.randn(num_classes, dim, generator=generator))
        self.push = nn.Parameter(torch.randn(num_classes, dim, generator=generator)) if two_sets else None

    @property
    def push_set(self) -> torch.Tensor:
        return self.pull if self.push is None else self.push


def _linear(d_in: int, d_out: int, generator: torch.Generator) -> nn.Linear:
    """A linear layer with PyTorch's default initialisation drawn from ``generator`` (so a
    defense's auxiliary branches depend on its seed only)."""
    lin = nn.Linear(d_in, d_out)
    bound = 1.0 / math.sqrt(d_in)
    with torch.no_grad():
        lin.weight.uniform_(-bound, bound, generator=generator)
        lin.bias.uniform_(-bound, bound, generator=generator)
    return lin


def _feature(t: torch.Tensor) -> torch.Tensor:
    """A tapped activation as a (N, d) feature: spatial maps are globally average-pooled."""
    if t.dim() > 2:
        return t.flatten(2).mean(2)
    return t.reshape(t.shape[0], -1)


def resolve_layers(model: nn.Module, layers: Optional[Sequence[str]] = None) -> List[str]:
    """The supervised layers: ``layers``, else ``model.feature_layers``, else
    ``model.hidden_layers``, else the last ``nn.Linear`` (its *input* is then the feature: named
    ``"<name>:input"``)."""
    if layers is None:
        layers = list(getattr(model, "feature_layers", ()) or getattr(model, "hidden_layers", ()) or ())
        if not layers:
            layers = [last_linear_name(model) + ":input"]
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise AdvlabError("layers must name at least one layer to supervise with L_PC")
    if len(set(layers)) != len(layers):
        raise AdvlabError(f"layers must be distinct, got {layers}")
    for n in layers:
        find_module(model, n.split(":")[0])
    return layers


class _Taps:
    """Opens :func:`taps` on the output layers and the ``:input`` layers of a model at once."""

    def __init__(self, model: nn.Module, layers: Sequence[str], detach: bool = False):
        self.model, self.layers, self.detach = model, list(layers), detach

    def __enter__(self) -> Dict[str, torch.Tensor]:
        outs = [n for n in self.layers if not n.endswith(":input")]
        ins = [n.split(":")[0] for n in self.layers if n.endswith(":input")]
        self._a = taps(self.model, outs, detach=self.detach)
        self._b = taps(self.model, ins, inputs=True, detach=self.detach)
        self._sa, self._sb = self._a.__enter__(), self._b.__enter__()
        self.store: Dict[str, torch.Tensor] = _Merged(self._sa, self._sb)
        return self.store

    def __exit__(self, *exc):
        self._b.__exit__(*exc)
        self._a.__exit__(*exc)
        return False


class _Merged(dict):
    def __init__(self, outs, ins):
        super().__init__()
        self._outs, self._ins = outs, ins

    def __getitem__(self, key):
        if key.endswith(":input"):
            return self._ins[key.split(":")[0]]
        return self._outs[key]


# ---------------------------------------------------------------------------------------------- the defense
@register_defense("pcl", "PCL: prototype conformity loss with deep supervision (Mustafa et al. 2019)")
class PCLDefense(Defense):
    """A classifier trained with CE + sum_l L_PC (eq. 7-9) and its prototypes. Build it with
    :meth:`fit` (Algorithm 1) or :meth:`load`.

    ``forward(x)`` is the model's logits (what the paper and every attack use); :meth:`predict`
    is their argmax (``rule="prototype"``: eq. 6, the nearest pull prototype of
    ``prototype_layer``, the last supervised layer by default); :meth:`features` the supervised
    features; :meth:`pc_loss` L_PC summed over the layers; ``.history`` the training record.
    """

    format = "advlab-pcl-1"
    title = "PCL"

    def __init__(self, model: nn.Module, layers: Optional[Sequence[str]] = None, preset: str = "paper",
                 in_shape: Optional[Sequence[int]] = None, dims: Optional[Sequence[int]] = None,
                 num_classes: Optional[int] = None, inference: str = "logits",
                 prototype_layer: Optional[str] = None, seed: int = 0, reading: str = "algorithm1",
                 branch_dim: int = 64, **loss_options):
        super().__init__()
        if reading not in READINGS:
            raise AdvlabError(f"reading must be one of {', '.join(READINGS)}, got {reading!r}")
        self.reading = reading
        self.branch_dim = check_positive_int(branch_dim, "branch_dim")
        if not isinstance(model, nn.Module):
            raise AdvlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if preset not in PRESETS:
            raise AdvlabError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        unknown = set(loss_options) - set(PRESETS[preset])
        if unknown:
            raise AdvlabError(f"unknown PCL option(s) {sorted(unknown)}; valid: {', '.join(PRESETS[preset])}")
        opts = dict(PRESETS[preset], **loss_options)
        for k in ("pull", "push", "separation", "prototype_lr"):
            opts[k] = check_nonneg(float(opts[k]), k)
        if opts["push_prototype_lr"] is not None:
            opts["push_prototype_lr"] = check_nonneg(float(opts["push_prototype_lr"]), "push_prototype_lr")
        self.preset, self.options = preset, opts
        if inference not in ("logits", "prototype"):
            raise AdvlabError(f"inference must be 'logits' or 'prototype', got {inference!r}")
        self.inference = inference
        self.model = model
        self.layers = resolve_layers(model, layers)
        if reading == "eq8" and len(self.layers) < 2:
            raise AdvlabError(f"reading='eq8' puts auxiliary branches on every supervised layer but the last, so it "
                              f"needs at least two layers, got {self.layers} (with one layer it is Algorithm 1)")
        self.model_spec = copy.deepcopy(getattr(model, "advlab_spec", None))
        if dims is None or num_classes is None:
            num_classes, dims = self._probe(in_shape)
        if len(dims) != len(self.layers):
            raise AdvlabError(f"dims must give one size per layer ({len(self.layers)}), got {list(dims)}")
        self.num_classes, self.dims = int(num_classes), [int(d) for d in dims]
        if prototype_layer is not None and prototype_layer not in self.layers:
            raise AdvlabError(f"prototype_layer must be one of the supervised layers {self.layers}, "
                              f"got {prototype_layer!r}")
        self.prototype_layer = prototype_layer or self.layers[-1]
        g = torch.Generator().manual_seed(int(seed))
        self.seed = int(seed)
        p = next(iter(model.parameters()), None)
        # eq. 8: an auxiliary branch G_phi (linear, to branch_dim) and a CE head on every supervised
        # layer but the last; Algorithm 1: none (G_phi the identity)
        branched = [self.reading == "eq8" and i < len(self.dims) - 1 for i in range(len(self.dims))]
        self.branches = nn.ModuleList([_linear(d, self.branch_dim, g) if b else nn.Identity()
                                       for d, b in zip(self.dims, branched)])
        self.heads = nn.ModuleList([_linear(self.branch_dim, self.num_classes, g) if b else nn.Identity()
                                    for b in branched])
        self.branched = branched
        self.prototype_dims = [self.branch_dim if b else d for d, b in zip(self.dims, branched)]
        self.prototypes = nn.ModuleList([PrototypeSet(self.num_classes, d, bool(opts["two_sets"]), g)
                                         for d in self.prototype_dims])
        if p is not None:
            for part in (self.prototypes, self.branches, self.heads):
                part.to(device=p.device, dtype=p.dtype)
        self.history: Dict[str, Any] = {}

    def _probe(self, in_shape) -> Tuple[int, List[int]]:
        shape = in_shape or (self.model_spec or {}).get("in_shape")
        if shape is None:
            raise AdvlabError("cannot size the prototypes: pass in_shape=(C, H, W) (or dims= and num_classes=)")
        dev = model_device(self.model)
        was = train_modes(self.model)
        self.model.eval()
        try:
            with torch.no_grad(), _Taps(self.model, self.layers, detach=True) as feats:
                out = self.model(torch.zeros(1, *[int(s) for s in shape], device=dev))
                dims = [_feature(feats[n]).shape[1] for n in self.layers]
        finally:
            restore_train_modes(was)
        if out.dim() != 2:
            raise AdvlabError(f"the model must map images to logits (N, classes), got shape {tuple(out.shape)}")
        return int(out.shape[1]), dims

    # ------------------------------------------------------------------ inference
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits (differentiable; what the paper's attacks and ours use)."""
        return self.model(x)

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(logits, [f^l = G_phi^l(F^l(x)) for each supervised layer], eq. 9) in one pass;
        gradients flow through both. G_phi is the identity unless ``reading="eq8"``."""
        with _Taps(self.model, self.layers) as feats:
            logits = self.model(x)
            fs = [g(_feature(feats[n])) for n, g in zip(self.layers, self.branches)]
        return logits, fs

    def branch_logits(self, fs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The auxiliary heads' logits (N, classes) on the branched features of eq. 8, one per
        branched layer (empty in the ``"algorithm1"`` reading)."""
        return [h(f) for f, h, b in zip(fs, self.heads, self.branched) if b]

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 512) -> Dict[str, torch.Tensor]:
        """The supervised features {layer: (N, d)} of ``x`` (batched, eval mode, on the CPU)."""
        check_images(x, "x")
        out: Dict[str, List[torch.Tensor]] = {n: [] for n in self.layers}
        out["logits"] = []
        dev = model_device(self)
        was = train_modes(self)
        self.eval()
        try:
            for i in range(0, x.shape[0], batch_size):
                logits, fs = self.forward_features(x[i: i + batch_size].to(dev))
                out["logits"].append(logits.cpu())
                for n, f in zip(self.layers, fs):
                    out[n].append(f.cpu())
        finally:
            restore_train_modes(was)
        return {k: torch.cat(v) for k, v in out.items()}

    def prototype_scores(self, x: torch.Tensor, layer: Optional[str] = None) -> torch.Tensor:
        """Minus the distances (N, k) of the ``layer`` feature to its pull prototypes (eq. 6's
        rule is the argmax); differentiable."""
        layer = layer or self.prototype_layer
        if layer not in self.layers:
            raise AdvlabError(f"layer must be one of the supervised layers {self.layers}, got {layer!r}")
        i = self.layers.index(layer)
        _, fs = self.forward_features(x)
        return -_distances(fs[i], self.prototypes[i].pull, squared=False)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024, rule: Optional[str] = None) -> torch.Tensor:
        """Class indices: the argmax of the logits (``rule="logits"``, the default unless the
        defense was built with ``inference="prototype"``) or eq. 6, the nearest prototype
        (``rule="prototype"``)."""
        rule = rule or self.inference
        if rule == "logits":
            return self._batched(lambda xb: self.model(xb).argmax(1), x, batch_size)
        if rule == "prototype":
            return self._batched(lambda xb: self.prototype_scores(xb).argmax(1), x, batch_size)
        raise AdvlabError(f"rule must be 'logits' or 'prototype', got {rule!r}")

    # ------------------------------------------------------------------ the loss
    def layer_losses(self, fs: Sequence[torch.Tensor], y: torch.Tensor) -> List[torch.Tensor]:
        """L_PC (batch mean) of each supervised layer for features ``fs``."""
        o = self.options
        return [pc_loss(f, y, p.pull, p.push, o["pull"], o["push"], o["separation"], o["squared"])
                for f, p in zip(fs, self.prototypes)]

    def pc_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """sum_l L_PC^l for images ``x`` (differentiable in the model, the prototypes and x)."""
        _, fs = self.forward_features(x)
        return torch.stack(self.layer_losses(fs, y)).sum()

    def branch_losses(self, fs: Sequence[torch.Tensor], y: torch.Tensor) -> List[torch.Tensor]:
        """The auxiliary cross-entropies of eq. 8 (batch means), one per branched layer."""
        return [F.cross_entropy(z, y) for z in self.branch_logits(fs)]

    def joint_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss: CE (batch mean) + sum_l L_PC^l, plus (``reading="eq8"``) the
        auxiliary branches' cross-entropies of eq. 8."""
        logits, fs = self.forward_features(x)
        return F.cross_entropy(logits, y) + torch.stack(self.layer_losses(fs, y) + self.branch_losses(fs, y)).sum()

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(cls, model: nn.Module, dataset, layers: Optional[Sequence[str]] = None, preset: str = "paper",
            warmup_epochs: int = 2, pc_epochs: int = 3, lr: float = 0.01, warmup_lr: Optional[float] = None,
            batch_size: int = 128, weight_decay: float = 1e-4, optimizer: str = "sgd",
            adversarial: Optional[str] = None, adv_eps=(0.1, 0.5), adv_objective: str = "joint",
            adv_steps: int = 10, seed: int = 0, device=None, progress: Optional[bool] = None,
            eval_dataset=None, inference: str = "logits", prototype_init: Optional[str] = None,
            reading: str = "algorithm1", branch_dim: int = 64, **loss_options) -> "PCLDefense":
        """Algorithm 1 on a copy of ``model`` (left unchanged): ``warmup_epochs`` of cross-entropy
        (T'; 0 if ``model`` is already trained), then ``pc_epochs`` of CE + sum_l L_PC with the
        prototypes stepped per batch by their own SGD, the model's learning rate x0.1 at 2/3 and
        5/6 of the PC phase. ``adversarial``: None, "fgsm" or "pgd" (clean and adversarial 1:1
        per batch, eps ~ U[adv_eps] per batch, crafted on the joint loss or CE:
        ``adv_objective``). ``loss_options`` override the ``preset``'s (pull, push, separation,
        squared, two_sets, prototype_lr, push_prototype_lr). ``reading``: "algorithm1" (one CE on
        the final logits, G_phi the identity) or "eq8" (auxiliary branches G_phi to ``branch_dim``
        features with their own CE heads, trained with the model). ``prototype_init``: "class-means" (the
        class means of the warmed-up features, on up to 2,000 training images; the default of the
        "paper" preset, whose text leaves the initialisation open) or "randn" (N(0, 1), the
        released code; the default of "official-code")."""
        from ..train import fit as train_fit

        warmup_epochs = check_positive_int(warmup_epochs, "warmup_epochs", 0)
        pc_epochs = check_positive_int(pc_epochs, "pc_epochs", 0)
        batch_size = check_positive_int(batch_size, "batch_size")
        x, y = dataset_tensors(dataset)
        check_images(x, "dataset images")
        net = copy.deepcopy(model)
        if device is not None:
            net.to(device)
        t0 = time.perf_counter()
        hist: Dict[str, Any] = {"warmup": [], "pc": []}
        if warmup_epochs:
            h = train_fit(net, dataset, epochs=warmup_epochs, lr=warmup_lr or lr, batch_size=batch_size,
                          optimizer=optimizer, weight_decay=weight_decay, seed=seed, progress=progress,
                          eval_dataset=eval_dataset, desc="pcl warm-up (CE)")
            hist["warmup"] = h.epochs
        hist["warmup_seconds"] = time.perf_counter() - t0
        defense = cls(net, layers=layers, preset=preset, in_shape=tuple(x.shape[1:]), inference=inference,
                      seed=seed, reading=reading, branch_dim=branch_dim, **loss_options)
        y = y.to(torch.long)
        if int(y.min()) < 0 or int(y.max()) >= defense.num_classes:
            raise AdvlabError(f"dataset labels must lie in [0, {defense.num_classes - 1}]")
        init = prototype_init or ("randn" if preset == "official-code" else "class-means")
        if init not in ("randn", "class-means"):
            raise AdvlabError(f"prototype_init must be 'randn' or 'class-means', got {init!r}")
        if init == "class-means":
            defense.init_class_means(x[:2000], y[:2000])
        hist["prototype_init"] = init
        defense.history = hist
        defense.train_pc(dataset, pc_epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                         optimizer=optimizer, adversarial=adversarial, adv_eps=adv_eps, adv_objective=adv_objective,
                         adv_steps=adv_steps, seed=seed, progress=progress, eval_dataset=eval_dataset)
        return defense.eval()

    def train_pc(self, dataset, epochs: int, lr: float = 0.01, batch_size: int = 128, weight_decay: float = 1e-4,
                 optimizer: str = "sgd", adversarial: Optional[str] = None, adv_eps=(0.1, 0.5),
                 adv_objective: str = "joint", adv_steps: int = 10, seed: int = 0, progress: Optional[bool] = None,
                 eval_dataset=None, decay_at: Sequence[float] = (2 / 3, 5 / 6), phase: str = "pc") -> Dict[str, Any]:
        """The PC phase of Algorithm 1 on this defense's model and prototypes (also to continue
        training, e.g. adversarially from a trained PCL model). Returns its record, also appended
        to ``self.history[phase]``."""
        from ..train import fit as train_fit
        from .advtrain import AdversarialBatches

        epochs = check_positive_int(epochs, "epochs", 0)
        if adversarial not in (None, "fgsm", "pgd"):
            raise AdvlabError(f"adversarial must be None, 'fgsm' or 'pgd', got {adversarial!r}")
        if adv_objective not in ("joint", "ce"):
            raise AdvlabError(f"adv_objective must be 'joint' or 'ce', got {adv_objective!r}")
        dev = model_device(self.model)
        self.prototypes.to(dev)
        o = self.options
        groups = [{"params": [p.pull for p in self.prototypes], "lr": o["prototype_lr"]}]
        scale = {id(p.pull): o["pull"] for p in self.prototypes}
        if o["two_sets"]:
            plr = o["prototype_lr"] if o["push_prototype_lr"] is None else o["push_prototype_lr"]
            groups.append({"params": [p.push for p in self.prototypes], "lr": plr})
            scale.update({id(p.push): o["push"] for p in self.prototypes})
        for p in self.prototypes.parameters():
            p.requires_grad_(True)
        proto_opt = torch.optim.SGD(groups, lr=o["prototype_lr"])
        record: Dict[str, Any] = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "adversarial": adversarial,
                                  "adv_eps": adv_eps if adversarial else None,
                                  "adv_objective": adv_objective if adversarial else None, "per_epoch": []}
        milestones = pc_milestones(len(dataset_tensors(dataset)[1]), epochs, batch_size, decay_at)
        record["lr_decay_steps"] = milestones
        n_aux = sum(self.branched)
        running = {"ce": 0.0, "pc": [0.0] * len(self.layers), "aux": [0.0] * n_aux, "n": 0}
        branch_params = [p for part in (self.branches, self.heads) for p in part.parameters()]
        for p in branch_params:
            p.requires_grad_(True)

        def step_prototypes() -> None:
            grads = [p for p in self.prototypes.parameters() if p.grad is not None]
            if not grads:
                return
            for p in grads:
                w = scale.get(id(p), 1.0)
                if w > 0:
                    p.grad.div_(w)
            proto_opt.step()
            proto_opt.zero_grad(set_to_none=True)

        def loss_fn(model, xb, yb):
            step_prototypes()
            logits, fs = self.forward_features(xb)
            ce = F.cross_entropy(logits, yb)
            pcs = self.layer_losses(fs, yb)
            aux = self.branch_losses(fs, yb)
            m = yb.shape[0]
            running["ce"] += float(ce.detach()) * m
            for i, v in enumerate(pcs):
                running["pc"][i] += float(v.detach()) * m
            for i, v in enumerate(aux):
                running["aux"][i] += float(v.detach()) * m
            running["n"] += m
            return ce + torch.stack(pcs + aux).sum(), logits

        transform = None
        if adversarial:
            source = JointLossScores(self) if adv_objective == "joint" else self.model
            objective = joint_objective(self) if adv_objective == "joint" else "ce"
            adv = AdversarialBatches(source, attack=adversarial, eps=adv_eps, steps=adv_steps, objective=objective,
                                     seed=seed)

            def transform(xb, yb):
                step_prototypes()
                return adv(xb, yb)

        def on_epoch(epoch, metrics, model):
            step_prototypes()
            nn_ = max(running["n"], 1)
            metrics["ce"] = running["ce"] / nn_
            for name, v in zip(self.layers, running["pc"]):
                metrics[f"pc[{name}]"] = v / nn_
            for name, v in zip([n for n, b in zip(self.layers, self.branched) if b], running["aux"]):
                metrics[f"branch_ce[{name}]"] = v / nn_
            metrics["prototype_min_distance"] = self.prototype_separation()
            running.update({"ce": 0.0, "pc": [0.0] * len(self.layers), "aux": [0.0] * n_aux, "n": 0})
            record["per_epoch"].append(dict(metrics))
            return False

        t0 = time.perf_counter()
        if epochs:
            train_fit(self.model, dataset, epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                      weight_decay=weight_decay, seed=seed, progress=progress, eval_dataset=eval_dataset,
                      loss=loss_fn, batch_transform=transform, callbacks=[on_epoch], desc=f"pcl {phase}",
                      params=[*self.model.parameters(), *branch_params] if branch_params else None,
                      schedule=lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1))
        for p in self.prototypes.parameters():
            p.grad = None
        record["seconds"] = time.perf_counter() - t0
        self.history.setdefault(phase, [])
        if isinstance(self.history[phase], list):
            self.history[phase].append(record)
        self.eval()
        return record

    @torch.no_grad()
    def init_class_means(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Set every prototype (both sets) to the mean feature of its class on ``(x, y)``; a class
        absent from ``y`` keeps its prototype."""
        feats = self.features(x)
        y = y.to(torch.long).cpu()
        for n, p in zip(self.layers, self.prototypes):
            f = feats[n]
            sums = torch.zeros(self.num_classes, f.shape[1]).index_add_(0, y, f)
            counts = torch.bincount(y, minlength=self.num_classes)
            have = counts > 0
            means = (sums[have] / counts[have, None]).to(p.pull)
            p.pull[have] = means
            if p.push is not None:
                p.push[have] = means

    @torch.no_grad()
    def prototype_separation(self) -> float:
        """Smallest distance between two (pull) prototypes of the same layer, over the layers."""
        out = float("inf")
        for p in self.prototypes:
            d = _distances(p.pull, p.pull, squared=False)
            d = d.masked_fill(torch.eye(d.shape[0], dtype=torch.bool, device=d.device), float("inf"))
            out = min(out, float(d.min()))
        return out

    # ------------------------------------------------------------------ persistence
    def config(self) -> Dict[str, Any]:
        extra = {"reading": self.reading, "branch_dim": self.branch_dim} if self.reading != "algorithm1" else {}
        return {"layers": list(self.layers), "preset": self.preset, "dims": list(self.dims),
                "num_classes": self.num_classes, "inference": self.inference,
                "prototype_layer": self.prototype_layer, "seed": self.seed, **extra,
                **{k: v for k, v in self.options.items() if v != PRESETS[self.preset][k]}}

    @classmethod
    def from_config(cls, model: nn.Module, config: Dict[str, Any]) -> "PCLDefense":
        """Rebuild from :meth:`config` around ``model`` (the prototypes come with the saved weights)."""
        return cls(model, **config)


# ---------------------------------------------------------------------------------------------- eq. 6 and the twin
class PrototypeScores(nn.Module):
    """Eq. 6 as a classifier: scores = minus the distances of the ``prototype_layer`` feature to
    its pull prototypes (:meth:`PCLDefense.prototype_scores`). Their argmax is eq. 6's decision, so
    the registry's attacks and the :func:`advlab.eval.evaluate` battery attack that rule directly."""

    def __init__(self, defense: PCLDefense):
        super().__init__()
        self.defense = defense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.defense.prototype_scores(x)


def softmax_twin(warm: nn.Module, train, epochs: int, lr: float, batch_size: int, optimizer: str = "sgd",
                 weight_decay: float = 1e-4, seed: int = 0) -> nn.Module:
    """PCL's equal-budget softmax twin: a copy of the CE warm-up ``warm`` (left unchanged) trained
    for the PC phase's ``epochs`` on the same data with the same seed (so the same batch order),
    optimiser and learning-rate decay (x0.1 at 2/3 and 5/6), on cross-entropy only. PCL continued
    from ``warm`` with the same arguments differs from it only in the loss."""
    from ..train import fit as train_fit

    twin = copy.deepcopy(warm)
    ms = pc_milestones(len(train), epochs, batch_size)
    if epochs:
        train_fit(twin, train, epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                  weight_decay=weight_decay, seed=seed, progress=False, desc="softmax twin",
                  schedule=lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, ms, 0.1))
    return twin.eval()


# ---------------------------------------------------------------------------------------------- attacks on the joint loss
class JointLossScores(nn.Module):
    """Scores that let the registry's attacks ascend the joint loss CE + sum_l L_PC (the paper's
    Table 3 "adaptive white-box" setting and Algorithm 1's adversarial examples): the output is
    ``[logits | for each layer: d(f, w_pull) | d(f, w_push) | for each eq. 8 branch: its head's
    logits]``, (N, C + 2 k L + k B), and :func:`joint_objective` turns it back into the per-sample
    joint loss (the training loss of the defense's reading). Only for attacks that
    use no argmax of their model's output (FGSM, BIM, MIM, PGD with one restart); judge their
    adversarials with the defense's own ``predict``. It lives here, not in :mod:`advlab.adaptive`,
    because :meth:`PCLDefense.train_pc` crafts Algorithm 1's adversarial examples with it;
    :func:`advlab.adaptive.pcl.joint_loss_attack` builds the attacks on it."""

    def __init__(self, defense: PCLDefense):
        super().__init__()
        self.defense = defense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.defense
        logits, fs = d.forward_features(x)
        parts = [logits]
        for f, p in zip(fs, d.prototypes):
            parts.append(_distances(f, p.pull, d.options["squared"]))
            parts.append(_distances(f, p.push_set, d.options["squared"]))
        parts.extend(d.branch_logits(fs))
        return torch.cat(parts, 1)


def joint_objective(defense: PCLDefense):
    """``loss(out, y, target) -> (N,)`` for :class:`JointLossScores` outputs: per-sample
    CE + sum_l (pull * pull_i - push * push_i - separation * sep_i) (+ each eq. 8 branch's CE), as
    the training loss (the separation term does not depend on the input; it is kept so the value
    equals the loss)."""
    k, o, nl, nb = defense.num_classes, defense.options, len(defense.layers), sum(defense.branched)

    def loss(out: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        if target is not None:
            raise AdvlabError("the joint PC+CE objective is untargeted")
        logits = out[:, :k]
        total = F.cross_entropy(logits, y, reduction="none")
        own = F.one_hot(y, k).to(torch.bool)
        for i in range(nl):
            d_pull = out[:, k * (1 + 2 * i): k * (2 + 2 * i)]
            d_push = out[:, k * (2 + 2 * i): k * (3 + 2 * i)]
            pull = d_pull.gather(1, y[:, None]).squeeze(1)
            push = d_push.masked_fill(own, 0.0).sum(1) / (k - 1)
            total = total + o["pull"] * pull - o["push"] * push
            if o["separation"]:
                w = defense.prototypes[i].pull
                dww = _distances(w, w, squared=o["squared"])
                sep = ((dww.sum(1) - dww.diagonal()) / (k - 1))[y]
                total = total - o["separation"] * sep
        base = k * (1 + 2 * nl)
        for j in range(nb):
            total = total + F.cross_entropy(out[:, base + k * j: base + k * (j + 1)], y, reduction="none")
        return total

    return loss
