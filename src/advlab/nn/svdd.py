"""The SVDD layer of M-SVDD-D (K-A3 paper, section 4.1, eq. 10-12): one kernel SVDD per class,
solved in the primal with trainable projection vectors, all classes evaluated at once.

For class c, with RBF kernel k(a, b) = exp(-gamma ||a - b||^2), projections O_c (M x D),
reconstruction weights u_c (M) and radius R_c, a feature vector f gets

    d_c^2(f)   = k(f, f) - 2 k~_c^T u_c + u_c^T K~_c u_c     (squared distance to the centre a_c = Phi~_c u_c)
    SVDD_c(f)  = beta_c R_c^2 - d_c^2(f)                     (eq. 10)
    r_c(f)     = SVDD_c(f) / R_c^2                           (section 4.2, normalised response)
    L_p        = max(0, d_c^2(f) - R_c^2)    for f of class c          (eq. 11)
    L_n        = max(0, R_c^2 - d_c^2(f))    for f of another class    (eq. 12)

where k~_c = [k(f, o_cm)]_m and K~_c = [k(o_cm, o_cm')]_mm'. The losses use beta = 1, as the paper
trains with beta = 1 and adjusts beta afterwards.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .._util import AdvlabError, check_positive_int


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between rows of ``a`` (N, D) and each class's rows of
    ``b`` (C, M, D): shape (N, C, M). One matrix product over all classes at once."""
    c, m, d = b.shape
    bf = b.reshape(c * m, d)
    d2 = torch.addmm((bf * bf).sum(-1)[None], a, bf.T, alpha=-2.0)
    return d2.add_((a * a).sum(-1, keepdim=True)).clamp_min_(0.0).view(a.shape[0], c, m)


def median_gamma(features: torch.Tensor, labels: Optional[torch.Tensor] = None, max_points: int = 2000,
                 generator: Optional[torch.Generator] = None) -> float:
    """The median heuristic for the RBF width: 1 / median squared distance between pairs of (at
    most ``max_points``) feature vectors; with ``labels``, only pairs of the same class count (each
    SVDD describes one class, so its kernel width follows the spread inside a class)."""
    f = features.detach().float().flatten(1)
    y = None if labels is None else labels.detach().flatten()
    if f.shape[0] > max_points:
        idx = torch.randperm(f.shape[0], generator=generator)[:max_points]
        f = f[idx]
        y = None if y is None else y[idx]
    d2 = torch.cdist(f, f).pow(2)
    iu = torch.triu_indices(f.shape[0], f.shape[0], 1)
    vals = d2[iu[0], iu[1]]
    if y is not None:
        same = y[iu[0]] == y[iu[1]]
        if bool(same.any()):
            vals = vals[same]
    med = float(vals.median()) if vals.numel() else 1.0
    return 1.0 / max(med, 1e-12)


class SVDDLayer(nn.Module):
    """C kernel SVDDs with trainable projections (eq. 10), evaluated for all classes at once.

    ``forward(f)`` returns the normalised responses r (N, C) = SVDD_c(f) / R_c^2, which lie in
    (-inf, beta_c]; f is accepted by class c's SVDD when r_c >= 0 (g(x) >= 0 of eq. 9, scaled).

    Parameters: ``O`` (C, M, D) projection vectors, ``u`` (C, M) reconstruction weights, ``R``
    (C,) radii; buffers: ``gamma`` (RBF width) and ``beta`` (C,). Call :meth:`init_from_features`
    before training: it draws each class's projections from that class's feature vectors, sets
    u = 1/M (the centre is the mean of the projections in feature space), R_c^2 to the median d^2
    of the class, and, if ``gamma`` was not given, gamma = 1 / the median squared distance between
    features of the same class (:func:`median_gamma`).

    ``k(f, f) = 1`` for the RBF kernel, as in the paper.
    """

    def __init__(self, num_classes: int, feature_dim: int, projections: int = 128, gamma: Optional[float] = None,
                 beta: float | Sequence[float] = 1.0, generator: Optional[torch.Generator] = None):
        super().__init__()
        c = check_positive_int(num_classes, "num_classes", 1)
        d = check_positive_int(feature_dim, "feature_dim", 1)
        m = check_positive_int(projections, "projections", 1)
        if gamma is not None and not float(gamma) > 0:
            raise AdvlabError(f"gamma must be > 0 (RBF width), got {gamma}")
        self.num_classes, self.feature_dim, self.projections = c, d, m
        self.O = nn.Parameter(torch.randn(c, m, d, generator=generator) * 0.1)
        self.u = nn.Parameter(torch.full((c, m), 1.0 / m))
        self.R = nn.Parameter(torch.ones(c))
        self.register_buffer("gamma", torch.tensor(1.0 if gamma is None else float(gamma)))
        self.register_buffer("beta", torch.ones(c))
        self._gamma_given = gamma is not None
        self._cache_key = None
        self._cache_quad: Optional[torch.Tensor] = None
        self.set_beta(beta)

    # ------------------------------------------------------------------ beta
    def set_beta(self, beta: float | Sequence[float] | torch.Tensor) -> None:
        """Set beta (eq. 10) for every class (a scalar) or per class (a length-C sequence); beta > 0."""
        b = torch.as_tensor(beta, dtype=torch.float32).flatten()
        if b.numel() == 1:
            b = b.expand(self.num_classes)
        if b.numel() != self.num_classes:
            raise AdvlabError(f"beta must be a scalar or have {self.num_classes} values, got {b.numel()}")
        if not bool(torch.isfinite(b).all()) or bool((b <= 0).any()):
            raise AdvlabError(f"beta must be finite and > 0, got {b.tolist()}")
        self.beta.copy_(b.to(self.beta.device))

    # ------------------------------------------------------------------ kernel terms
    def _check(self, f: torch.Tensor) -> torch.Tensor:
        if f.dim() != 2 or f.shape[1] != self.feature_dim:
            raise AdvlabError(f"features must have shape (N, {self.feature_dim}), got {tuple(f.shape)}")
        return f

    def kernel_vectors(self, f: torch.Tensor) -> torch.Tensor:
        """k~ for every class: (N, C, M) with entries exp(-gamma ||f_n - O_cm||^2)."""
        return _sq_dists(self._check(f), self.O).mul_(-self.gamma).exp_()

    def kernel_matrices(self) -> torch.Tensor:
        """K~ for every class: (C, M, M)."""
        o2 = (self.O * self.O).sum(-1)
        d2 = (o2[:, :, None] + o2[:, None, :] - 2.0 * torch.einsum("cmd,ckd->cmk", self.O, self.O)).clamp_min(0.0)
        return torch.exp(-self.gamma * d2)

    def quadratic(self) -> torch.Tensor:
        """u_c^T K~_c u_c for every class: (C,). Cached while O, u and gamma are unchanged and no
        gradient is needed through them (inference, backbone fine-tuning, attacks)."""
        need_grad = torch.is_grad_enabled() and (self.O.requires_grad or self.u.requires_grad)
        if need_grad:
            self._cache_key = None
            return torch.einsum("cm,cmk,ck->c", self.u, self.kernel_matrices(), self.u)
        key = (self.O._version, self.u._version, self.gamma._version, self.O.data_ptr(), self.u.data_ptr(),
               self.gamma.data_ptr(), self.O.device, self.O.dtype)
        if self._cache_key != key or self._cache_quad is None:
            with torch.no_grad():
                self._cache_quad = torch.einsum("cm,cmk,ck->c", self.u, self.kernel_matrices(), self.u)
            self._cache_key = key
        return self._cache_quad

    def sq_distance(self, f: torch.Tensor) -> torch.Tensor:
        """d_c^2(f) = k(f,f) - 2 k~^T u_c + u_c^T K~ u_c for all classes: (N, C)."""
        kt = self.kernel_vectors(f)                                            # (N, C, M)
        ku = (kt * self.u).sum(-1)                                             # k~^T u_c: (N, C)
        return 1.0 - 2.0 * ku + self.quadratic()[None]

    def svdd(self, f: torch.Tensor) -> torch.Tensor:
        """SVDD_c(f) of eq. 10 for all classes: (N, C)."""
        return self.beta * self.R.pow(2) - self.sq_distance(f)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Normalised responses r_c = SVDD_c(f) / R_c^2: (N, C)."""
        r2 = self.R.pow(2)
        return self.beta - self.sq_distance(f) / r2

    # ------------------------------------------------------------------ losses
    def losses(self, f: torch.Tensor, y: torch.Tensor, negatives: bool = True):
        """Per-sample hinge losses with beta = 1: ``(L_p, L_n)``.

        ``L_p`` (N,) is eq. 11 for each sample's own class; ``L_n`` (N, C) is eq. 12 for every
        other class (zero in the column of the sample's own class), or None when
        ``negatives=False``."""
        if y.dim() != 1 or y.shape[0] != f.shape[0]:
            raise AdvlabError(f"y must have shape ({f.shape[0]},), got {tuple(y.shape)}")
        d2 = self.sq_distance(f)
        r2 = self.R.pow(2)
        own = d2.gather(1, y[:, None]).squeeze(1)
        lp = torch.relu(own - r2[y])
        if not negatives:
            return lp, None
        neg_mask = torch.ones_like(d2, dtype=torch.bool).scatter_(1, y[:, None], False)
        ln = torch.relu(r2[None] - d2) * neg_mask
        return lp, ln

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_from_features(self, features: torch.Tensor, labels: torch.Tensor,
                           generator: Optional[torch.Generator] = None) -> "SVDDLayer":
        """Initialise O_c from M feature vectors of class c (drawn without replacement when the
        class has at least M, otherwise all of them plus re-drawn ones with small noise), u = 1/M,
        R_c^2 = the median d_c^2 over class c, and gamma by the within-class median heuristic unless given."""
        f = self._check(features.detach().float())
        labels = labels.to(torch.long)
        dev = self.O.device
        if not self._gamma_given:
            self.gamma.fill_(median_gamma(f, labels, generator=generator))
        std = f.std(0, keepdim=True).clamp_min(1e-6)
        O = torch.empty(self.num_classes, self.projections, self.feature_dim)
        for c in range(self.num_classes):
            fc = f[labels == c]
            if fc.shape[0] == 0:
                raise AdvlabError(f"class {c} has no training samples to initialise its SVDD from")
            m = self.projections
            if fc.shape[0] >= m:
                O[c] = fc[torch.randperm(fc.shape[0], generator=generator)[:m]]
            else:
                extra = fc[torch.randint(fc.shape[0], (m - fc.shape[0],), generator=generator)]
                extra = extra + 0.05 * std * torch.randn(extra.shape, generator=generator)
                O[c] = torch.cat([fc, extra])
        self.O.copy_(O.to(dev))
        self.u.fill_(1.0 / self.projections)
        self.R.fill_(1.0)
        d2 = self.sq_distance(f.to(dev))
        for c in range(self.num_classes):
            self.R[c] = d2[labels.to(dev) == c, c].median().clamp_min(1e-6).sqrt()
        self._cache_key = None
        return self

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, projections={self.projections}, "
                f"gamma={float(self.gamma):.4g}")
