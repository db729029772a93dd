"""I-defender (Zheng & Hong 2018): per-class Gaussian mixtures of a classifier's hidden states on
natural training data (eq. 4); an input predicted as class c is rejected when its hidden state's
likelihood under class c's mixture falls below a per-class threshold TH_c (eq. 5).

>>> defense = IDefender.fit(model, train_set, keeps=(0.95, 0.99))   # ID-95 active, ID-99 stored
>>> defense.predict(x)          # class indices, or advlab.REJECT (-1)
>>> defense.detect(x)           # -log p(H(x) | predicted class): larger = more adversarial
>>> defense(x)                  # (N, C + 1): logits plus the differentiable "adversarial" column
>>> defense.set_keep(0.99)      # ID-99
>>> defense.class_loglik(x)     # (N, C) log p(H(x) | c) for every class (differentiable)

Readings settled here (DESIGN.md):

- Hidden state H(x): the concatenation of the named layers' outputs, flattened, read by forward
  hooks (:func:`advlab.nn.taps`); by default ``model.hidden_layers`` (the zoo's post-activation
  fully connected hidden layers). Model F of Table 1 has none: the zoo lists its flattened last
  convolution (1152 values on 28x28 inputs), the input of its linear head; its logits
  (``layers=["head"]``) are the other reading.
- Features are standardised with the mean and standard deviation of the whole training set
  (a standard deviation below ``std_floor`` times the mean one is raised to it: units dead on
  the training data would otherwise divide by zero), then optionally projected on the first
  ``pca`` principal components of the standardised training features.
- One mixture per class, fitted with scikit-learn's ``GaussianMixture`` (EM, k-means start,
  ``random_state=seed``, ``reg_covar`` added to the diagonal) on the training samples of that
  class (by label, as eq. 4). The number of components K is chosen per class by BIC among
  ``components`` (or given as an int); the covariance type, one for all classes, by the summed
  BIC among ``covariance`` ("full" and "diag" by default; "full" is skipped above
  ``max_full_dim`` dimensions, where it has more parameters than a class has samples many times
  over).
- The fitted parameters are copied into buffers and the log-likelihood is computed in torch
  (:class:`MixtureLogLik`), equal to ``GaussianMixture.score_samples`` and differentiable, so an
  attacker can go through it.
- Thresholds (eq. 5) come from the training data, as in the paper: TH_c is set between the
  ``r``-th and ``(r+1)``-th smallest log-likelihood of class c's training samples under its own
  mixture, ``r = floor((1 - keep) * n_c)``, so that exactly ``n_c - r`` of them are accepted
  (95% / 99% of each class: ID-95 / ID-99). Several ``keeps`` are stored; :meth:`set_keep`
  switches.
- Decision: ``rule="predicted"`` (default; the paper's motivation and Fig. 1b) rejects when the
  predicted class's mixture rejects; ``rule="any"`` (the rule eq. 6 implies) accepts when some
  class's mixture accepts. The class answered is always the classifier's argmax.

``forward(x)`` returns the logits z plus a last column a = max_k z_k + s(g) + delta * sign(g),
where g = TH_c - log p(H(x)|c) is how far (in nats) the decision class falls below its threshold
(for ``rule="any"``: the smallest such gap over the classes), s(g) = sign(g) log(1 + |g|) is a
smooth, monotone, sign-preserving compression (the log-likelihood of an off-manifold point can be
-1e6: unbounded, the column would saturate a softmax and its gradients), and delta = 1e-3 a
gradient-free offset making the argmax exact at the boundary: argmax(forward) is REJECT exactly
when ``predict`` rejects (g > 0). A reject-aware attack (``merge_reject``) thus sees the
gradient of the log-likelihood it must raise.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .. import REJECT
from .._util import AdvlabError, check_images, check_positive_int, model_device, restore_train_modes, train_modes
from ..data import dataset_tensors
from ..nn import taps
from .base import Defense, register_defense

__all__ = ["IDefender", "MixtureLogLik", "threshold_for_keep"]

COVARIANCES = ("full", "diag")
RULES = ("predicted", "any")


class MixtureLogLik(nn.Module):
    """Log-likelihoods of C Gaussian mixtures (one per class, K components at most, one covariance
    type) in torch, from scikit-learn's fitted parameters; differentiable in the input.

    Buffers: ``log_weights`` (C, K; -inf for the padding of a class with fewer components),
    ``means`` (C, K, D), ``prec_chol`` (C, K, D, D) for "full" or (C, K, D) for "diag" (sklearn's
    ``precisions_cholesky_``), ``log_det`` (C, K) = sum log diag(prec_chol). The computation is
    sklearn's: log N(z | mu, P P^T) = -D/2 log(2 pi) + log_det - |(z - mu) P|^2 / 2, then the
    log-sum-exp over components with the log weights. It runs in the buffers' dtype
    (``.double()`` for exact comparisons)."""

    def __init__(self, num_classes: int, components: int, dim: int, covariance: str = "full"):
        super().__init__()
        if covariance not in COVARIANCES:
            raise AdvlabError(f"covariance must be one of {', '.join(COVARIANCES)}, got {covariance!r}")
        self.covariance, self.dim = covariance, int(dim)
        c, k, d = int(num_classes), int(components), int(dim)
        self.register_buffer("log_weights", torch.full((c, k), float("-inf")))
        self.register_buffer("means", torch.zeros(c, k, d))
        shape = (c, k, d, d) if covariance == "full" else (c, k, d)
        pc = torch.eye(d).expand(c, k, d, d).clone() if covariance == "full" else torch.ones(shape)
        self.register_buffer("prec_chol", pc)
        self.register_buffer("log_det", torch.zeros(c, k))

    @property
    def num_classes(self) -> int:
        return int(self.log_weights.shape[0])

    @property
    def components(self) -> int:
        return int(self.log_weights.shape[1])

    @classmethod
    def from_sklearn(cls, mixtures: Sequence, dtype=torch.float32) -> "MixtureLogLik":
        """Build from fitted ``sklearn.mixture.GaussianMixture`` objects (one per class, same
        covariance type and dimension; numbers of components may differ)."""
        if not mixtures:
            raise AdvlabError("mixtures is empty")
        cov = mixtures[0].covariance_type
        if any(m.covariance_type != cov for m in mixtures) or cov not in COVARIANCES:
            raise AdvlabError(f"all mixtures must share one covariance type among {COVARIANCES}")
        d = int(mixtures[0].means_.shape[1])
        kmax = max(int(m.n_components) for m in mixtures)
        mod = cls(len(mixtures), kmax, d, cov).to(torch.float64)
        for c, m in enumerate(mixtures):
            k = int(m.n_components)
            pc = torch.as_tensor(np.asarray(m.precisions_cholesky_), dtype=torch.float64)
            mod.log_weights[c, :k] = torch.as_tensor(np.log(m.weights_), dtype=torch.float64)
            mod.means[c, :k] = torch.as_tensor(m.means_, dtype=torch.float64)
            mod.prec_chol[c, :k] = pc
            diag = torch.diagonal(pc, dim1=-2, dim2=-1) if cov == "full" else pc
            mod.log_det[c, :k] = diag.log().sum(-1)
        return mod.to(dtype)

    def component_loglik(self, z: torch.Tensor) -> torch.Tensor:
        """log w_ck + log N(z | mu_ck, Sigma_ck), shape (N, C, K)."""
        z = z.to(self.means.dtype)
        c, k, d = self.means.shape
        if z.dim() != 2 or z.shape[1] != d:
            raise AdvlabError(f"features must have shape (N, {d}), got {tuple(z.shape)}")
        if self.covariance == "full":
            # y = z P - mu P for every (class, component), as one matmul (N, D) x (D, C*K*D)
            pm = self.prec_chol.permute(2, 0, 1, 3).reshape(d, c * k * d)
            mu_p = torch.einsum("ckd,ckde->cke", self.means, self.prec_chol)
            y = (z @ pm).view(-1, c, k, d) - mu_p
            maha = y.pow(2).sum(-1)
        else:
            prec = self.prec_chol.pow(2)                                       # (C, K, D)
            maha = (z.pow(2) @ prec.reshape(c * k, d).T - 2 * z @ (self.means * prec).reshape(c * k, d).T
                    + (self.means.pow(2) * prec).sum(-1).reshape(1, c * k)).view(-1, c, k)
        return self.log_weights - 0.5 * (d * math.log(2 * math.pi) + maha) + self.log_det

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z | c) for every class c, shape (N, C)."""
        return torch.logsumexp(self.component_loglik(z), dim=-1)


def threshold_for_keep(loglik: torch.Tensor, keep: float) -> float:
    """A threshold TH such that exactly ``n - floor((1 - keep) * n)`` of the ``n`` values
    ``loglik`` satisfy ``loglik >= TH`` (the midpoint between the two order statistics, so a
    re-evaluation that differs in the last bits does not move a sample across it; ties at that
    point are all kept)."""
    if not (0.0 < float(keep) <= 1.0):
        raise AdvlabError(f"keep must be in (0, 1], got {keep}")
    v = loglik.detach().double().flatten().sort().values
    n = v.numel()
    if n == 0:
        raise AdvlabError("a class has no training samples: cannot set its threshold")
    r = int(math.floor((1.0 - float(keep)) * n + 1e-9))
    if r == 0:
        lo = float(v[0])
        return lo - max(1.0, abs(lo)) if math.isfinite(lo) else float("-inf")
    return 0.5 * (float(v[r - 1]) + float(v[r]))


def _fit_one(z: np.ndarray, k: int, cov: str, seed: int, reg_covar: float, max_iter: int, n_init: int):
    from sklearn.mixture import GaussianMixture

    k = max(1, min(int(k), z.shape[0]))
    gm = GaussianMixture(n_components=k, covariance_type=cov, reg_covar=reg_covar, max_iter=max_iter,
                         n_init=n_init, random_state=seed, init_params="kmeans")
    gm.fit(z)
    return gm


@register_defense("idefender", "I-defender: per-class GMMs of hidden states, reject below a per-class "
                               "likelihood threshold (Zheng & Hong 2018)")
class IDefender(Defense):
    """A classifier guarded by I-defender. Build it with :meth:`fit` (or :meth:`load`); see the
    module docstring for the readings and the ``forward`` construction."""

    format = "advlab-idefender-1"
    title = "I-defender"
    reject_column = True
    claimed_threat = "black-box"
    #: gradient-free offset of the adversarial column (exact argmax at the threshold)
    delta = 1e-3

    def __init__(self, model: nn.Module, layers: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                 feature_dim: Optional[int] = None, dim: Optional[int] = None, components: int = 1,
                 covariance: str = "diag", keeps: Sequence[float] = (0.95, 0.99), keep: Optional[float] = None,
                 rule: str = "predicted", in_shape: Optional[Sequence[int]] = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise AdvlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        layers = list(layers) if layers is not None else list(getattr(model, "hidden_layers", ()) or ())
        if not layers:
            raise AdvlabError("layers: the model lists no hidden_layers; name the layers whose outputs form the "
                              "hidden state (e.g. layers=['relu3', 'relu4'])")
        if rule not in RULES:
            raise AdvlabError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        keeps = [float(q) for q in keeps]
        if not keeps or any(not (0.0 < q <= 1.0) for q in keeps):
            raise AdvlabError(f"keeps must be fractions in (0, 1], got {keeps}")
        self.model = model
        self.layers = layers
        self.model_spec = copy.deepcopy(getattr(model, "advlab_spec", None))
        dev = model_device(model)
        if num_classes is None or feature_dim is None:
            nc, fd = self._probe(model, layers, in_shape)
            num_classes = nc if num_classes is None else num_classes
            feature_dim = fd if feature_dim is None else feature_dim
        self.num_classes, self.feature_dim = int(num_classes), int(feature_dim)
        self.dim = int(dim) if dim is not None else self.feature_dim
        self.rule = rule
        self.register_buffer("feat_mean", torch.zeros(self.feature_dim, device=dev))
        self.register_buffer("feat_std", torch.ones(self.feature_dim, device=dev))
        proj = torch.zeros(self.dim, self.feature_dim, device=dev) if self.dim != self.feature_dim else \
            torch.zeros(0, device=dev)
        self.register_buffer("projection", proj)
        self.gmm = MixtureLogLik(self.num_classes, components, self.dim, covariance).to(dev)
        self.register_buffer("keeps", torch.tensor(keeps, dtype=torch.float64, device=dev))
        self.register_buffer("thresholds_all", torch.zeros(len(keeps), self.num_classes, device=dev))
        self.register_buffer("thresholds", torch.zeros(self.num_classes, device=dev))
        self._keep = keeps[0] if keep is None else float(keep)
        if all(abs(self._keep - q) > 1e-12 for q in keeps):
            raise AdvlabError(f"keep={keep} is not one of keeps={keeps}")
        self.history: Dict[str, Any] = {}

    @staticmethod
    def _probe(model: nn.Module, layers: Sequence[str], in_shape=None):
        shape = in_shape or (getattr(model, "advlab_spec", None) or {}).get("in_shape")
        if shape is None:
            raise AdvlabError("num_classes and feature_dim (or in_shape) are needed for a model that is not "
                              "from the zoo")
        dev = model_device(model)
        was = train_modes(model)
        model.eval()
        try:
            with torch.no_grad(), taps(model, layers) as f:
                z = model(torch.zeros(1, *shape, device=dev))
        finally:
            restore_train_modes(was)
        return int(z.shape[1]), int(sum(f[n].flatten(1).shape[1] for n in layers))

    # ------------------------------------------------------------------ structure
    @property
    def surrogate(self) -> nn.Module:
        """The undefended classifier (the semi-white-box attacker's model)."""
        return self.model

    @property
    def keep(self) -> float:
        """The share of each class's training data the active thresholds keep (0.95: ID-95, 0.99: ID-99)."""
        return self._keep

    def set_keep(self, keep: float) -> "IDefender":
        """Switch to the stored thresholds that keep ``keep`` of each class's training data
        (0.95: ID-95, 0.99: ID-99)."""
        d = (self.keeps - float(keep)).abs()
        i = int(d.argmin())
        if float(d[i]) > 1e-9:
            raise AdvlabError(f"keep={keep} has no stored thresholds; stored: {self.keeps.tolist()}")
        self.thresholds.copy_(self.thresholds_all[i])
        self._keep = float(self.keeps[i])
        return self

    def set_rule(self, rule: str) -> "IDefender":
        """Set the rejection rule and return the defense: ``"predicted"`` rejects when the predicted
        class's mixture gives the hidden state a likelihood below its threshold, ``"any"`` only when every
        class's does. Raises ``AdvlabError`` on another value."""
        if rule not in RULES:
            raise AdvlabError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        self.rule = rule
        return self

    # ------------------------------------------------------------------ features
    def _logits_and_hidden(self, x: torch.Tensor):
        with taps(self.model, self.layers) as f:
            z = self.model(x)
        h = torch.cat([f[n].flatten(1) for n in self.layers], 1)
        return z, h

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        """Raw hidden states (N, feature_dim) -> the mixtures' space (standardised, projected)."""
        u = (h.to(self.feat_mean.dtype) - self.feat_mean) / self.feat_std
        return u @ self.projection.T if self.projection.numel() else u

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden state H(x) (N, feature_dim), differentiable."""
        return self._logits_and_hidden(x)[1]

    def scores(self, x: torch.Tensor):
        """``(logits (N, C), embedded features (N, D), log p(H(x) | c) (N, C))``, differentiable."""
        z, h = self._logits_and_hidden(x)
        u = self.embed(h)
        return z, u, self.gmm(u)

    def class_loglik(self, x: torch.Tensor) -> torch.Tensor:
        """log p(H(x) | c) for every class (N, C)."""
        return self.scores(x)[2]

    def gap(self, logits: torch.Tensor, ll: torch.Tensor) -> torch.Tensor:
        """TH - log-likelihood (nats) for the decision rule: > 0 means rejected."""
        th = self.thresholds.to(ll.dtype)
        if self.rule == "predicted":
            c = logits.argmax(1, keepdim=True)
            return (th[c.squeeze(1)] - ll.gather(1, c).squeeze(1))
        return (th[None] - ll).amin(1)

    def decide(self, logits: torch.Tensor, ll: torch.Tensor) -> torch.Tensor:
        """Class indices (argmax of the logits) or ``advlab.REJECT`` where the rule rejects."""
        pred = logits.argmax(1)
        return torch.where(self.gap(logits, ll) > 0, torch.full_like(pred, REJECT), pred)

    def column(self, logits: torch.Tensor, ll: torch.Tensor) -> torch.Tensor:
        """(N, C + 1): logits and the adversarial column (module docstring)."""
        g = self.gap(logits, ll).to(logits.dtype)
        s = torch.sign(g) * torch.log1p(g.abs())
        off = torch.where(g > 0, self.delta, -self.delta).to(logits.dtype)
        a = logits.amax(1) + s + off
        return torch.cat([logits, a[:, None]], 1)

    # ------------------------------------------------------------------ Defense contract
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, _, ll = self.scores(x)
        return self.column(z, ll)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Class indices, or ``advlab.REJECT`` (-1) where the likelihood is below the threshold."""
        check_images(x, "x")

        def fn(xb):
            z, _, ll = self.scores(xb)
            return self.decide(z, ll)
        return self._batched(fn, x, batch_size)

    @torch.no_grad()
    def detect(self, x: torch.Tensor, batch_size: int = 1024, score: str = "likelihood") -> torch.Tensor:
        """Per-sample detection score (larger = more adversarial), float64 on ``x``'s device.

        ``score="likelihood"``: the negative log-likelihood of the hidden state under the
        predicted class's mixture, -log p(H(x) | c), pooled across classes whose likelihood scales
        differ. ``score="threshold"``: the same minus that class's threshold, TH_c - log p(H(x) | c)
        (eq. 5 read per class: > 0 is exactly a rejection under the "predicted" rule), which ranks
        images of different predicted classes on one scale. Raises on another ``score``."""
        check_images(x, "x")
        if score not in ("likelihood", "threshold"):
            raise AdvlabError(f"score must be 'likelihood' or 'threshold', got {score!r}")

        def fn(xb):
            z, _, ll = self.scores(xb)
            c = z.argmax(1, keepdim=True)
            out = -ll.gather(1, c).squeeze(1).double()
            if score == "threshold":
                out = out + self.thresholds.to(out.dtype)[c.squeeze(1)]
            return out
        if x.shape[0] == 0:
            return torch.empty(0, dtype=torch.float64, device=x.device)
        return self._batched(fn, x, batch_size)

    @torch.no_grad()
    def loglik_and_logits(self, x: torch.Tensor, batch_size: int = 1024):
        """(logits, log p(H|c) for all classes) for ``x``, batched, on the CPU."""
        zs, lls = [], []
        was = train_modes(self)
        self.eval()
        dev = model_device(self)
        try:
            for i in range(0, x.shape[0], batch_size):
                z, _, ll = self.scores(x[i: i + batch_size].to(dev))
                zs.append(z.cpu())
                lls.append(ll.cpu())
        finally:
            restore_train_modes(was)
        return torch.cat(zs), torch.cat(lls)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, model: nn.Module, dataset, layers: Optional[Sequence[str]] = None,
            components: Union[int, Sequence[int]] = (1, 2, 3, 4),
            covariance: Union[str, Sequence[str]] = COVARIANCES, keeps: Sequence[float] = (0.95, 0.99),
            keep: Optional[float] = None, rule: str = "predicted", pca: Optional[int] = None,
            reg_covar: float = 1e-3, std_floor: float = 1e-3, max_full_dim: int = 256, max_iter: int = 100,
            n_init: int = 1, seed: int = 0, batch_size: int = 512, device=None,
            progress: Optional[bool] = None) -> "IDefender":
        """Fit I-defender on a trained ``model`` (not modified) and its natural training set.

        ``components``: an int (K for every class) or candidates chosen per class by BIC;
        ``covariance``: "full", "diag" or candidates (one type for all classes, by summed BIC);
        ``pca``: project the standardised features on that many principal components (None: no
        projection); ``reg_covar``: added to the covariances' diagonals (standardised units);
        ``keeps``: the kept fractions whose thresholds are stored, ``keep`` the active one (the
        first by default); ``rule``: "predicted" or "any". ``fit`` records the BIC table, the
        choices and the kept fractions of the training data in ``history``."""
        from threadpoolctl import threadpool_limits

        # scikit-learn's BLAS gets as many threads as torch (oversubscribing a shared machine
        # makes EM many times slower)
        with threadpool_limits(limits=max(1, torch.get_num_threads())):
            return cls._fit(model, dataset, layers, components, covariance, keeps, keep, rule, pca, reg_covar,
                            std_floor, max_full_dim, max_iter, n_init, seed, batch_size, device)

    @classmethod
    def _fit(cls, model, dataset, layers, components, covariance, keeps, keep, rule, pca, reg_covar, std_floor,
             max_full_dim, max_iter, n_init, seed, batch_size, device) -> "IDefender":
        from sklearn.decomposition import PCA

        t0 = time.perf_counter()
        if not isinstance(model, nn.Module):
            raise AdvlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        ks = [components] if isinstance(components, int) else list(components)
        ks = [check_positive_int(k, "components") for k in ks]
        if not ks:
            raise AdvlabError("components must be an int >= 1 or a non-empty list of them")
        covs = [covariance] if isinstance(covariance, str) else list(covariance)
        bad = [c for c in covs if c not in COVARIANCES]
        if bad or not covs:
            raise AdvlabError(f"covariance must be among {', '.join(COVARIANCES)}, got {covariance!r}")
        if not (float(reg_covar) > 0):
            raise AdvlabError(f"reg_covar must be > 0, got {reg_covar}")
        x, y = dataset_tensors(dataset)
        check_images(x, "dataset images")
        model = model if device is None else copy.deepcopy(model).to(device)
        model.eval()
        defense = cls(model, layers=layers, keeps=keeps, keep=keep, rule=rule, in_shape=tuple(x.shape[1:]))
        y = y.to(torch.long).cpu()
        nc = defense.num_classes
        if x.shape[0] == 0:
            raise AdvlabError("dataset is empty")
        if int(y.min()) < 0 or int(y.max()) >= nc:
            raise AdvlabError(f"dataset labels must lie in [0, {nc - 1}]")
        missing = [c for c in range(nc) if not bool((y == c).any())]
        if missing:
            raise AdvlabError(f"dataset has no sample of class(es) {missing}: every class needs its own mixture")
        dev = model_device(model)
        hs = []
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                hs.append(defense._logits_and_hidden(x[i: i + batch_size].to(dev))[1].double().cpu())
        h = torch.cat(hs)
        mean, std = h.mean(0), h.std(0)
        std = std.clamp_min(float(std_floor) * float(std.mean().clamp_min(1e-12)))
        u = ((h - mean) / std).numpy()
        proj = None
        if pca is not None:
            pca = check_positive_int(pca, "pca")
            if pca < u.shape[1]:
                p = PCA(n_components=pca, random_state=seed).fit(u)
                proj = torch.as_tensor(p.components_, dtype=torch.float64)
                # PCA centres the (already centred) data; its mean is ~0 and folded in below
                u = (u - p.mean_) @ p.components_.T
                mean = mean + std * torch.as_tensor(p.mean_, dtype=torch.float64)
        d = u.shape[1]
        skipped = [c for c in covs if c == "full" and d > max_full_dim and len(covs) > 1]
        covs = [c for c in covs if c not in skipped]
        bic: List[Dict[str, Any]] = []
        best: Dict[str, List] = {}
        for cov in covs:
            chosen = []
            for c in range(nc):
                zc = u[(y == c).numpy()]
                cands = []
                for k in ks:
                    gm = _fit_one(zc, k, cov, seed, float(reg_covar), max_iter, n_init)
                    b = float(gm.bic(zc)) if len(ks) > 1 or len(covs) > 1 else float("nan")
                    bic.append({"covariance": cov, "class": c, "K": int(gm.n_components), "bic": b,
                                "converged": bool(gm.converged_)})
                    cands.append((b, gm))
                chosen.append(min(cands, key=lambda t: (t[0] if not math.isnan(t[0]) else 0.0)))
            best[cov] = chosen
        total = {cov: sum(b for b, _ in ch) for cov, ch in best.items()}
        cov = min(total, key=lambda c: total[c] if not math.isnan(total[c]) else 0.0)
        mixtures = [gm for _, gm in best[cov]]
        dtype = torch.float32
        gmm = MixtureLogLik.from_sklearn(mixtures, dtype=dtype).to(dev)
        out = cls(model, layers=defense.layers, num_classes=nc, feature_dim=defense.feature_dim, dim=d,
                  components=gmm.components, covariance=cov, keeps=keeps, keep=keep, rule=rule)
        out.gmm.load_state_dict(gmm.state_dict())
        out.feat_mean.copy_(mean.to(dtype))
        out.feat_std.copy_(std.to(dtype))
        if proj is not None:
            out.projection.copy_(proj.to(dtype))
        # thresholds from the torch log-likelihoods (the quantity every decision uses)
        with torch.no_grad():
            ll_own = torch.cat([out.gmm(out.embed(h[i: i + batch_size].to(dev, dtype))).cpu()
                                for i in range(0, h.shape[0], batch_size)]).gather(1, y[:, None]).squeeze(1)
        for qi, q in enumerate(out.keeps.tolist()):
            for c in range(nc):
                out.thresholds_all[qi, c] = threshold_for_keep(ll_own[y == c], q)
        out.set_keep(out.keeps[0].item() if keep is None else keep)
        kept = {f"{q:g}": [float((ll_own[y == c] >= out.thresholds_all[qi, c].cpu()).double().mean())
                           for c in range(nc)] for qi, q in enumerate(out.keeps.tolist())}
        out.history = {"covariance": cov, "components": [int(m.n_components) for m in mixtures],
                       "bic_total": total, "bic": bic, "skipped_covariance": skipped, "dim": d,
                       "feature_dim": out.feature_dim, "layers": list(out.layers), "kept_train_fraction": kept,
                       "class_counts": [int((y == c).sum()) for c in range(nc)],
                       "seconds": time.perf_counter() - t0}
        return out.eval()

    # ------------------------------------------------------------------ persistence
    def config(self) -> Dict[str, Any]:
        return {"layers": list(self.layers), "num_classes": self.num_classes, "feature_dim": self.feature_dim,
                "dim": self.dim, "components": self.gmm.components, "covariance": self.gmm.covariance,
                "keeps": [float(q) for q in self.keeps.tolist()], "keep": self.keep, "rule": self.rule}

    @classmethod
    def from_config(cls, model: nn.Module, config: Dict[str, Any]) -> "IDefender":
        """Rebuild from :meth:`config` around ``model`` (the mixtures and thresholds come with the saved weights)."""
        return cls(model, layers=config["layers"], num_classes=int(config["num_classes"]),
                   feature_dim=int(config["feature_dim"]), dim=int(config["dim"]),
                   components=int(config["components"]), covariance=str(config["covariance"]),
                   keeps=config["keeps"], keep=config.get("keep"), rule=config.get("rule", "predicted"))
