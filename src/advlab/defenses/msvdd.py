"""M-SVDD-D, the multiple-SVDD defense of the K-A3 paper (section 4.2).

The linear head of a trained classifier W is replaced by an :class:`advlab.nn.SVDDLayer` (one
kernel SVDD per class); the backbone is fine-tuned with that layer frozen (W~-SVDD); the
defended model answers a class only when that class's SVDD is the *unique* verifier of the
input, and the extra "adversarial" class (``advlab.REJECT``) otherwise.

>>> defense = MSVDDDefense.fit(model, train_set, projections=256, svdd_epochs=20, finetune_epochs=5)
>>> defense.tune_beta(val_set, goal="defense")      # beta = O_d; goal="classification" gives O_c
>>> defense.predict(x)                              # class indices or advlab.REJECT (-1)
>>> defense(x)                                      # (N, C+1) scores [r, v_a] for attackers (no clamp)
>>> defense.verified(x)                             # (N, C+1) r~ of eq. 13 (clamped: no gradient)
>>> defense.surrogate                               # W~-LC: fine-tuned backbone + original linear head

Readings of the paper settled here (see also DESIGN.md):

- Kernel: RBF, k(f, f) = 1; gamma by the median heuristic on the training features unless given.
- Head replacement: the named head submodule is swapped for a module computing the SVDD layer
  from the head's input (so the user's ``forward`` runs unchanged); features are the input of
  the head, as read by ``advlab.nn.taps(model, [head], inputs=True)``.
- Section 4.2 says "a ReLU r = max(0, SVDD(W(x))) right before the SVDD layer" and a clamp
  min(v_p, r) after it. The formula applies the ReLU to the SVDD responses, which is what we do:
  r~_c = min(v_p, max(0, r_c)) for c = 1..C, and r~_{C+1} = v_a (eq. 13). A ReLU on the features
  would change the function the backbone was fine-tuned for (and is the identity for the zoo
  models, whose head inputs already follow a ReLU/pooling).
- v_p is not given in the paper; we use 0.01 so that r~ is nearly quantised to {0, v_p}, as the
  paper describes. Decisions do not depend on v_p as long as v_p > v_a.
- Unique verifier: class c's SVDD verifies x when r~_c > v_a (it beats the adversarial class in
  eq. 13's argmax, i.e. r_c > v_a); x gets class c only when c is the only verifier, else REJECT.
- Training the SVDDs (eq. 11-12 as written, hinge losses without the R^2 term of eq. 8): the
  loss is the mean of L_p over (sample, own class) pairs plus the mean of L_n over (sample,
  other class) pairs; first L_p alone until its epoch mean changes by less than ``settle_tol``
  (relative) or ``positive_epochs`` pass, then both for ``svdd_epochs`` epochs.
- beta tuning is one scalar for all classes (the paper's tables report one beta per model),
  chosen on a validation set by grid search: O_c maximises the defended model's accuracy
  (rejections count as errors); O_d is the smallest beta whose accuracy is within
  ``max_accuracy_drop`` of O_c's.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .. import REJECT
from .._util import (AdvlabError, check_images, check_positive_int, make_generator, model_device, restore_train_modes,
                     train_modes)
from ..data import dataset_tensors
from ..nn import SVDDLayer, find_module, last_linear_name, taps
from .base import Defense, register_defense


#: the detection rate of transferred DeepFool (:meth:`MSVDDDefense.health_check`) below which
#: ``tune_beta`` warns that the fitted defense is in the fragile regime
HEALTHY_DETECTION = 0.6


def resolve_head(model: nn.Module, head: Optional[str] = None) -> str:
    """The head layer's name: ``head``, else ``model.head_name``, else the last ``nn.Linear``."""
    name = head or getattr(model, "head_name", None) or last_linear_name(model)
    mod = find_module(model, name)
    if not isinstance(mod, nn.Linear):
        raise AdvlabError(f"head layer {name!r} must be an nn.Linear (the final linear classifier), "
                          f"got {type(mod).__name__}")
    return name


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = find_module(model, parent_name) if parent_name else model
    setattr(parent, leaf, new)


class SVDDHead(nn.Module):
    """Stands in for the linear head: maps the head's input features to the normalised SVDD
    responses r (N, C)."""

    def __init__(self, svdd: SVDDLayer):
        super().__init__()
        self.svdd = svdd

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.svdd(f)


@torch.no_grad()
def extract_features(model: nn.Module, head: str, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Inputs of the ``head`` layer for ``images`` (batched, eval mode), on the model's device."""
    dev = model_device(model)
    was = train_modes(model)
    model.eval()
    out = []
    try:
        with taps(model, [head], inputs=True, detach=True) as feats:
            for i in range(0, images.shape[0], batch_size):
                model(images[i: i + batch_size].to(dev))
                out.append(feats[head].flatten(1))
    finally:
        restore_train_modes(was)
    return torch.cat(out) if out else torch.empty(0, device=dev)


@register_defense("msvdd", "M-SVDD-D: one SVDD per class plus an adversarial class (K-A3 paper, section 4.2)")
class MSVDDDefense(Defense):
    """A classifier defended by M-SVDD-D. Build it with :meth:`fit` (or :meth:`load`).

    ``forward(x)`` gives the scores an attacker should use by default: the raw normalised SVDD
    responses r (N, C) with the adversarial class's constant v_a as column C, i.e. eq. 13
    *without* the ReLU and the min(v_p, .) clamp, whose gradient is exactly zero wherever a
    response is clamped (85% of the digits test images: a white-box attack on r~ would report a
    robustness that is only masked gradients). :meth:`verified` gives r~ of eq. 13 itself;
    :meth:`predict` gives class indices or ``advlab.REJECT`` (the unique-verifier rule);
    :meth:`responses` the raw responses r (N, C); ``.surrogate`` is W~-LC; ``.net`` is W~-SVDD
    (images -> r).
    """

    format = "advlab-msvdd-1"
    title = "M-SVDD-D"
    reject_column = True
    claimed_threat = "transfer"

    def __init__(self, model: nn.Module, head: Optional[str] = None, projections: int = 128,
                 gamma: Optional[float] = None, v_a: float = 1e-3, v_p: float = 1e-2, beta: float = 1.0):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise AdvlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (0.0 < float(v_a) < float(v_p)):
            raise AdvlabError(f"need 0 < v_a < v_p, got v_a={v_a}, v_p={v_p}")
        self.head_name = resolve_head(model, head)
        lin = find_module(model, self.head_name)
        self.num_classes = int(lin.out_features)
        self.feature_dim = int(lin.in_features)
        self.v_a, self.v_p = float(v_a), float(v_p)
        self.model_spec = copy.deepcopy(getattr(model, "advlab_spec", None))
        # placeholder projections (init_from_features or a checkpoint replace them), drawn from
        # their own generator so that building a defense leaves the global RNG alone
        layer = SVDDLayer(self.num_classes, self.feature_dim, projections, gamma=gamma, beta=beta,
                          generator=torch.Generator().manual_seed(0))
        layer.to(device=lin.weight.device, dtype=lin.weight.dtype)
        for p in layer.parameters():
            p.requires_grad_(False)
        self.net = copy.deepcopy(model)
        _set_submodule(self.net, self.head_name, SVDDHead(layer))
        #: W~-LC: the (fine-tuned) backbone with the original linear head re-attached
        self.surrogate = copy.deepcopy(model)
        self.history: Dict[str, Any] = {}
        self.tuning: Dict[str, Any] = {}

    # ------------------------------------------------------------------ structure
    @property
    def svdd(self) -> SVDDLayer:
        """The SVDD layer inside ``.net``."""
        return find_module(self.net, self.head_name).svdd

    @property
    def beta(self) -> torch.Tensor:
        """The SVDD radii' trimming parameter beta (eq. 10), one value per class (a detached copy); set it
        with :meth:`set_beta` or :meth:`tune_beta`."""
        return self.svdd.beta.detach().clone()

    def set_beta(self, beta) -> "MSVDDDefense":
        """Set beta (eq. 10): a scalar for every class or one value per class."""
        self.svdd.set_beta(beta)
        return self

    # ------------------------------------------------------------------ inference
    def responses(self, x: torch.Tensor) -> torch.Tensor:
        """Raw normalised SVDD responses r (N, C) of W~-SVDD, before ReLU and clamp."""
        return self.net(x)

    def verify(self, r: torch.Tensor) -> torch.Tensor:
        """r~ (N, C+1) of eq. 13 from raw responses r: [min(v_p, max(0, r)), v_a]."""
        rt = r.clamp(min=0.0, max=self.v_p)
        return torch.cat([rt, rt.new_full((rt.shape[0], 1), self.v_a)], 1)

    def decide(self, r: torch.Tensor) -> torch.Tensor:
        """Unique-verifier rule on raw responses r: class c when only r~_c > v_a, else REJECT."""
        accepted = self.verify(r)[:, : self.num_classes] > self.v_a
        unique = accepted.sum(1) == 1
        return torch.where(unique, accepted.to(torch.uint8).argmax(1), torch.full_like(unique, REJECT, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable scores (N, C+1): [r_1..r_C, v_a]; their argmax is the defended decision
        wherever at most one SVDD verifies the input."""
        r = self.net(x)
        return torch.cat([r, r.new_full((r.shape[0], 1), self.v_a)], 1)

    def verified(self, x: torch.Tensor) -> torch.Tensor:
        """The (C+1)-column response r~ of eq. 13 (column C is the adversarial class); clamped,
        so its input gradient vanishes wherever a response is clamped."""
        return self.verify(self.net(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Class indices, or ``advlab.REJECT`` (-1) where no single SVDD verifies the input."""
        return self._batched(lambda xb: self.decide(self.net(xb)), x, batch_size)

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(cls, model: nn.Module, dataset, projections: int = 128, svdd_epochs: int = 20, finetune_epochs: int = 5,
            head: Optional[str] = None, seed: int = 0, gamma: Optional[float] = None,
            positive_epochs: Optional[int] = None, settle_tol: float = 1e-3, batch_size: int = 128,
            svdd_batch_size: int = 512, svdd_lr: float = 3e-2, finetune_lr: float = 1e-3, v_a: float = 1e-3,
            v_p: float = 1e-2,
            device=None, progress: Optional[bool] = None) -> "MSVDDDefense":
        """Build the defense from a trained classifier ``model`` (left unchanged) and its training set.

        1. features = inputs of the head layer, backbone frozen; each class's SVDD is initialised
           from its own features, trained on positives (L_p) until settled, then on positives and
           negatives (L_p + L_n) for ``svdd_epochs``;
        2. the head is replaced by the frozen SVDD layer and the backbone fine-tuned for
           ``finetune_epochs`` with cross-entropy on r;
        3. ``.surrogate`` (W~-LC) = fine-tuned backbone + the original linear head.
        """
        from ..train import fit as train_fit

        svdd_epochs = check_positive_int(svdd_epochs, "svdd_epochs", 0)
        finetune_epochs = check_positive_int(finetune_epochs, "finetune_epochs", 0)
        positive_epochs = svdd_epochs if positive_epochs is None else check_positive_int(positive_epochs,
                                                                                           "positive_epochs", 0)
        batch_size = check_positive_int(batch_size, "batch_size")
        svdd_batch_size = check_positive_int(svdd_batch_size, "svdd_batch_size")
        x, y = dataset_tensors(dataset)
        check_images(x, "dataset images")
        model = model if device is None else copy.deepcopy(model).to(device)
        defense = cls(model, head=head, projections=projections, gamma=gamma, v_a=v_a, v_p=v_p)
        dev = model_device(defense)
        y = y.to(torch.long)
        if int(y.min()) < 0 or int(y.max()) >= defense.num_classes:
            raise AdvlabError(f"dataset labels must lie in [0, {defense.num_classes - 1}]")
        g = make_generator(seed)
        t0 = time.perf_counter()
        feats = extract_features(model, defense.head_name, x)
        yd = y.to(dev)
        layer = defense.svdd
        layer.init_from_features(feats.cpu(), y, generator=g)
        history = defense._train_svdd(feats, yd, positive_epochs, svdd_epochs, svdd_batch_size, svdd_lr, settle_tol, g)
        history["svdd_seconds"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        backbone = [p for n, p in defense.net.named_parameters() if not n.startswith(defense.head_name + ".")]
        for p in layer.parameters():
            p.requires_grad_(False)
        if finetune_epochs:
            ft = train_fit(defense.net, TensorDataset(x, y), epochs=finetune_epochs, lr=finetune_lr, batch_size=batch_size,
                           params=backbone, seed=seed, progress=progress, desc="msvdd finetune")
            history["finetune"] = ft.epochs
        history["finetune_seconds"] = time.perf_counter() - t1
        defense.net.eval()
        defense._attach_surrogate(find_module(model, defense.head_name))
        defense.history = history
        return defense.eval()

    def _train_svdd(self, feats, y, positive_epochs, svdd_epochs, batch_size, lr, settle_tol, g) -> Dict[str, Any]:
        layer = self.svdd
        params = list(layer.parameters())
        for p in params:
            p.requires_grad_(True)
        # one Adam step moves each parameter by about lr times its own scale: O in feature units,
        # u in units of 1/M, R in units of its initial value
        scale_o = float(feats.std().clamp_min(1e-6))
        opt = torch.optim.Adam([{"params": [layer.O], "lr": lr * scale_o},
                                {"params": [layer.u], "lr": lr / layer.projections},
                                {"params": [layer.R], "lr": lr * float(layer.R.detach().abs().mean().clamp_min(1e-6))}])
        n = feats.shape[0]
        hist: Dict[str, Any] = {"positive": [], "joint": []}

        def epoch(negatives: bool):
            perm = torch.randperm(n, generator=g).to(feats.device)
            tot_p = tot_n = 0.0
            for i in range(0, n, batch_size):
                idx = perm[i: i + batch_size]
                lp, ln = layer.losses(feats[idx], y[idx], negatives=negatives)
                loss = lp.mean()
                if negatives:
                    ln_mean = ln.sum() / max(1, ln.numel() - ln.shape[0])
                    loss = loss + ln_mean
                    tot_n += float(ln_mean.detach()) * idx.numel()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot_p += float(lp.detach().mean()) * idx.numel()
            return tot_p / n, tot_n / n

        prev = None
        for _ in range(positive_epochs):
            lp, _ = epoch(False)
            hist["positive"].append({"L_p": lp})
            if prev is not None and abs(prev - lp) <= settle_tol * max(prev, 1e-12):
                break
            if lp == 0.0:
                break
            prev = lp
        for _ in range(svdd_epochs):
            lp, ln = epoch(True)
            hist["joint"].append({"L_p": lp, "L_n": ln})
        for p in params:
            p.requires_grad_(False)
        return hist

    def _attach_surrogate(self, original_head: nn.Module) -> None:
        sur = copy.deepcopy(self.net)
        _set_submodule(sur, self.head_name, copy.deepcopy(original_head))
        for p in sur.parameters():
            p.requires_grad_(True)
        self.surrogate = sur.eval()

    # ------------------------------------------------------------------ beta
    @torch.no_grad()
    def scaled_distances(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """q = d_c^2 / R_c^2 (N, C) for images ``x``; r_c = beta_c - q_c for any beta."""
        dev = model_device(self)
        layer = self.svdd
        out = []
        was = train_modes(self)
        self.eval()
        try:
            with taps(self.net, [self.head_name], inputs=True, detach=True) as feats:
                for i in range(0, x.shape[0], batch_size):
                    self.net(x[i: i + batch_size].to(dev))
                    f = feats[self.head_name]
                    out.append((layer.sq_distance(f) / layer.R.pow(2)).cpu())
        finally:
            restore_train_modes(was)
        return torch.cat(out) if out else torch.empty(0, self.num_classes)

    def _accuracy_curve(self, q: torch.Tensor, y: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        acc = torch.empty(grid.numel())
        for i in range(0, grid.numel(), 16):
            b = grid[i: i + 16, None, None]
            accepted = (b - q[None]).clamp(0.0, self.v_p) > self.v_a            # (G, N, C)
            unique = accepted.sum(2) == 1
            correct = unique & accepted.gather(2, y[None, :, None].expand(b.shape[0], -1, 1)).squeeze(2)
            acc[i: i + 16] = correct.float().mean(1)
        return acc

    def tune_beta(self, val_dataset, goal: str = "classification", max_accuracy_drop: float = 0.03,
                  grid: Optional[Sequence[float]] = None, health: Optional[bool] = None,
                  health_images: int = 200) -> Dict[str, Any]:
        """Choose one beta for all classes on ``val_dataset`` and set it.

        ``goal="classification"`` (the paper's beta = O_c): the beta with the best accuracy of the
        defended model (a rejection counts as an error; ties go to the beta nearest 1).
        ``goal="defense"`` (beta = O_d): the smallest beta, i.e. the tightest hyperspheres, whose
        accuracy is at least O_c's accuracy minus ``max_accuracy_drop``.
        ``health`` (default: with ``goal="defense"``): run :meth:`health_check` on up to
        ``health_images`` of the validation images at the chosen beta, add it to the result as
        ``"health"`` and warn (:class:`advlab._util.DefenseHealthWarning`) when the detection rate
        is below :data:`HEALTHY_DETECTION`.
        Returns ``{"beta", "accuracy", "reference_accuracy", "goal", "grid", "curve"}`` (and ``"health"``).
        """
        if goal not in ("classification", "defense"):
            raise AdvlabError(f"goal must be 'classification' or 'defense', got {goal!r}")
        if not (0.0 <= float(max_accuracy_drop) <= 1.0):
            raise AdvlabError(f"max_accuracy_drop must be in [0, 1], got {max_accuracy_drop}")
        x, y = dataset_tensors(val_dataset)
        check_images(x, "val_dataset images")
        if x.shape[0] == 0:
            raise AdvlabError("val_dataset is empty")
        g = torch.arange(2, 201, dtype=torch.float64) / 100.0 if grid is None else torch.as_tensor(
            grid, dtype=torch.float64).flatten()
        if g.numel() == 0 or bool((g <= 0).any()):
            raise AdvlabError("grid must hold beta values > 0")
        g = g.sort().values
        q = self.scaled_distances(x)
        curve = self._accuracy_curve(q, y.to(torch.long).cpu(), g)
        best = float(curve.max())
        at_best = torch.nonzero(curve == best).flatten()
        i_c = int(at_best[(g[at_best] - 1.0).abs().argmin()])
        if goal == "classification":
            i = i_c
        else:
            ok = torch.nonzero(curve >= best - float(max_accuracy_drop) - 1e-9).flatten()
            i = int(ok.min())
        beta = float(g[i])
        self.set_beta(beta)
        self.tuning[goal] = {"beta": beta, "accuracy": float(curve[i]), "reference_accuracy": best}
        out = {"beta": beta, "accuracy": float(curve[i]), "reference_accuracy": best, "goal": goal,
               "grid": g.tolist(), "curve": curve.tolist()}
        if health if health is not None else goal == "defense":
            out["health"] = self.health_check(x, y, n=health_images)
            self.tuning[goal]["health"] = out["health"]
        return out

    def health_check(self, x: torch.Tensor, y: torch.Tensor, n: int = 200, warn: bool = True) -> Dict[str, Any]:
        """How the defense fares, at its current beta, against DeepFool crafted on the surrogate
        (W~-LC) and transferred, on up to ``n`` held-out images ``x`` (N, C, H, W in [0, 1]) with
        labels ``y``: the share of the adversarials that fool the surrogate which the defense
        rejects (``detection_rate``) or accepts as a wrong class (``transfer_success``). Below
        :data:`HEALTHY_DETECTION` the defense is in the fragile regime (the K-A3 paper's 4.4%
        DeepFool success assumes most transferred adversarials are rejected) and, with ``warn``, a
        :class:`~advlab._util.DefenseHealthWarning` says which knobs help. Returns ``{"detection_rate",
        "transfer_success", "fooled_surrogate", "images", "healthy", "threshold", "advice"}``."""
        import warnings

        from .._util import DefenseHealthWarning
        from ..attacks import DeepFool
        from ..train import predict

        n = check_positive_int(n, "n")
        check_images(x, "x")
        x, y = x[:n], torch.as_tensor(y)[:n].to(torch.long).cpu()
        sur = self.surrogate
        adv = DeepFool(sur).perturb(x.to(model_device(sur)), y.to(model_device(sur))).cpu()
        fooled = (predict(sur, x).cpu() == y) & (predict(sur, adv).cpu() != y)
        pred = self.predict(adv).cpu()
        k = int(fooled.sum())
        detection = float(((pred == REJECT) & fooled).sum()) / k if k else float("nan")
        success = float(((pred != REJECT) & (pred != y) & fooled).sum()) / k if k else float("nan")
        healthy = not (detection < HEALTHY_DETECTION)  # NaN (nothing fooled the surrogate) is no alarm
        b = torch.as_tensor(self.beta).flatten()
        beta_text = f"{float(b[0]):.2f}" if bool((b == b[0]).all()) else "per class"
        advice = ("" if healthy else
                  f"M-SVDD-D detects only {100 * detection:.0f}% of the DeepFool adversarials transferred from its "
                  f"surrogate at beta={beta_text} ({100 * success:.0f}% are accepted as a wrong class; "
                  f"healthy: >= {100 * HEALTHY_DETECTION:.0f}%). What helps: a tighter beta (tune_beta(goal='defense') "
                  "with a larger max_accuracy_drop), more SVDD training (fit(svdd_epochs=..., positive_epochs=...)), "
                  "a better-trained backbone before fit, or more projections (fit(projections=...)); the K-A3 "
                  "reproduction's setup (reports/msvdd) is in the healthy regime.")
        if advice and warn:
            warnings.warn(advice, DefenseHealthWarning, stacklevel=2)
        return {"detection_rate": detection, "transfer_success": success, "fooled_surrogate": k,
                "images": int(x.shape[0]), "healthy": healthy, "threshold": HEALTHY_DETECTION, "advice": advice}

    # ------------------------------------------------------------------ persistence
    def config(self) -> Dict[str, Any]:
        return {"head": self.head_name, "projections": self.svdd.projections, "v_a": self.v_a, "v_p": self.v_p}

    @classmethod
    def from_config(cls, model: nn.Module, config: Dict[str, Any]) -> "MSVDDDefense":
        # gamma and beta are buffers: the saved values replace these placeholders
        """Rebuild from :meth:`config` (gamma and beta are buffers: the saved weights replace the placeholders)."""
        return cls(model, head=config["head"], projections=int(config["projections"]), gamma=1.0,
                   v_a=float(config["v_a"]), v_p=float(config["v_p"]))
