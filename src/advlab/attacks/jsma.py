"""Jacobian-based saliency map attack (Papernot et al. 2016), pairs of features, batched over
samples, with the pairwise search chunked to a memory budget."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .._util import AdvlabError, check_positive, check_positive_int
from .base import Attack
from .logits import keep_if_adversarial, runner_up
from .loop import logit_grads


def _front(order: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row, the ``valid`` points that no earlier point of ``order`` (sorted by x, descending)
    weakly dominates in y: a superset of the Pareto front for maximising (x, y)."""
    vs = valid.gather(1, order)
    ys = y.gather(1, order).masked_fill(~vs, float("-inf"))
    before = torch.cat([ys.new_full((ys.shape[0], 1), float("-inf")), ys.cummax(1).values[:, :-1]], 1)
    return torch.zeros_like(valid).scatter_(1, order, vs & (ys > before))


def _pairs_chunked(a: torch.Tensor, nb: torch.Tensor, max_bytes: int):
    """Best pair p < q of ``relu(a_p + a_q) * relu(nb_p + nb_q)`` per row, scoring the (N, rows, P)
    pair tensor one block of rows at a time (two float temporaries of at most ``max_bytes``)."""
    n, p = a.shape
    rows = max(1, min(p, int(max_bytes // max(1, 2 * n * p * a.element_size()))))
    best = a.new_zeros(n)
    best_p = torch.zeros(n, dtype=torch.long, device=a.device)
    best_q = torch.zeros_like(best_p)
    for r0 in range(0, p - 1, rows):
        r1 = min(p - 1, r0 + rows)
        ncols = p - r0 - 1
        score = (a[:, r0:r1, None] + a[:, None, r0 + 1:]).clamp_min_(0)      # relu(A): 0 unless A > 0
        score.mul_((nb[:, r0:r1, None] + nb[:, None, r0 + 1:]).clamp_min_(0))  # * relu(-B)
        # q <= p (the block's lower-left triangle) is not a pair
        score[:, :, : r1 - r0].masked_fill_(
            torch.ones(r1 - r0, r1 - r0, dtype=torch.bool, device=a.device).tril_(-1), 0)
        v, i = score.view(n, -1).max(1)
        take = v > best
        best = torch.where(take, v, best)
        best_p = torch.where(take, r0 + torch.div(i, ncols, rounding_mode="floor"), best_p)
        best_q = torch.where(take, r0 + 1 + i % ncols, best_q)
    return best_p, best_q, best


def best_pairs(alpha: torch.Tensor, beta: torch.Tensor, domain: torch.Tensor, max_bytes: int = 64 * 2 ** 20,
               prune: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Papernot et al.'s pair selection for increasing features, for each row of ``alpha``/``beta``
    (N, P): over pairs p != q of the ``domain`` (N, P, bool), maximise ``(a_p + a_q) * |b_p + b_q|``
    subject to ``a_p + a_q > 0`` and ``b_p + b_q < 0``. Returns (p, q, found); ``found`` is False
    where no pair meets the conditions. For decreasing features pass ``-alpha``, ``-beta``.

    The score ``relu(a_p + a_q) * relu(-b_p - b_q)`` never decreases when q is replaced by a
    point with larger ``a`` and larger ``-b``; so an optimal pair lies in the first two Pareto
    layers of the points ``(a_p, -b_p)`` (``prune``, exact up to ties), usually a few dozen
    features instead of P. The pairs of the remaining features are scored in row blocks so that
    the temporaries stay within ``max_bytes``."""
    a = alpha.masked_fill(~domain, float("-inf"))   # out of the domain: A = -inf, never > 0
    nb = -beta
    if prune:
        order = a.argsort(dim=1, descending=True)
        first = _front(order, nb, domain)
        cand = first | _front(order, nb, domain & ~first)
        count = cand.sum(1)
        m = max(2, int(count.max()))
        if m < a.shape[1]:
            # the candidates' indices packed to the left of an (N, m) table, padding marked invalid
            pos = torch.where(cand, cand.cumsum(1) - 1, torch.full_like(count[:, None], m))
            sel = torch.zeros(a.shape[0], m + 1, dtype=torch.long, device=a.device)
            sel.scatter_(1, pos, torch.arange(a.shape[1], device=a.device).expand_as(pos))
            sel = sel[:, :m]
            keep = torch.arange(m, device=a.device)[None] < count[:, None]
            p, q, best = _pairs_chunked(a.gather(1, sel).masked_fill(~keep, float("-inf")),
                                        nb.gather(1, sel), max_bytes)
            return sel.gather(1, p[:, None]).squeeze(1), sel.gather(1, q[:, None]).squeeze(1), best > 0
    p, q, best = _pairs_chunked(a, nb, max_bytes)
    return p, q, best > 0


class JSMA(Attack):
    """Targeted JSMA with pairs of features (Papernot et al., 2016).

    Per iteration and sample: one forward and the input gradients of the target output (alpha)
    and of the sum of the other outputs (beta), then the pair (p, q) of the search domain with
    the largest ``(a_p + a_q) * |b_p + b_q|`` among pairs with ``a_p + a_q > 0`` and
    ``b_p + b_q < 0`` (signs flipped for ``theta < 0``); both features get
    ``+theta`` (clamped to [0, 1]) and leave the domain. The domain starts as the features that
    can still move in theta's direction. A sample stops when it is classified as the target,
    when ``gamma`` of its features (values over all channels) would be exceeded, or when no pair
    meets the conditions; it is then returned unchanged unless it reached the target.
    Without ``target=`` the target is the highest-scoring clean class other than ``y`` (the
    second-ranked class of a correctly classified image). ``max_memory`` (bytes) bounds the
    pairwise search's temporaries.

    The outputs are the softmax probabilities, as in the paper (JSMA-F): there the others sum to
    ``1 - p_t``, so beta = -alpha, one backward per iteration suffices and the rule picks the two
    domain features with the largest ``d p_t / dx``. ``use_logits=True`` gives the logit variant
    (JSMA-Z, two gradients per iteration), which on LeNet-5/MNIST needs about twice as many
    features and fails more often at the same ``gamma``.
    """

    norm = None
    supports_targeted = True

    def __init__(self, model, theta: float = 1.0, gamma: float = 0.1, use_logits: bool = False,
                 max_memory: int = 64 * 2 ** 20):
        super().__init__(model)
        self.use_logits = bool(use_logits)
        if isinstance(theta, bool) or not math.isfinite(float(theta)) or float(theta) == 0.0:
            raise AdvlabError(f"theta must be a finite non-zero number, got {theta}")
        self.theta = float(theta)
        self.gamma = check_positive(gamma, "gamma")
        if self.gamma > 1:
            raise AdvlabError(f"gamma must be in (0, 1], got {gamma}")
        self.max_memory = check_positive_int(max_memory, "max_memory", minimum=1024)

    def _perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        dim = x[0].numel()
        max_iters = int(self.gamma * dim) // 2
        out = x.clone()
        increase = self.theta > 0
        sign = 1.0 if increase else -1.0
        # the search domain: features that can still move in theta's direction
        domain = (x.flatten(1) < 1) if increase else (x.flatten(1) > 0)
        idx = torch.arange(n, device=x.device)
        xa, tgt = x.clone(), target

        def weights(logits):
            # without target= the target is the best clean class other than y (set at iteration 0)
            nonlocal tgt
            if tgt is None:
                tgt = runner_up(logits, y)
            onehot = torch.zeros_like(logits).scatter_(1, tgt[:, None], 1.0)
            if self.use_logits:
                # alpha = d Z_t / dx, beta = d sum_{j != t} Z_j / dx
                return torch.stack([onehot, 1.0 - onehot])
            # probabilities: beta = d(1 - p_t)/dx = -alpha, so one gradient suffices; alpha is
            # taken as d log p_t / dx = (d p_t / dx) / p_t, the same direction without underflow
            return (onehot - logits.softmax(1))[None]

        for it in range(max_iters + 1):
            if it == max_iters:  # only the check of the last iterate remains
                with torch.no_grad():
                    logits = self.model(xa)
                if tgt is None:
                    target = tgt = weights(logits)[0].argmax(1)
                reached = logits.argmax(1) == tgt
                out[idx[reached]] = xa[reached]
                break
            logits, grads = logit_grads(self.model, xa, weights)
            if target is None and it == 0:
                target = tgt
            reached = logits.argmax(1) == tgt
            alpha = grads[0].flatten(1)
            beta = grads[1].flatten(1) if self.use_logits else -alpha
            p, q, found = best_pairs(sign * alpha, sign * beta, domain, self.max_memory)
            stop = reached | ~found
            if bool(stop.any()):
                out[idx[reached]] = xa[reached]
                k = (~stop).nonzero().squeeze(1)
                if k.numel() == 0:
                    break
                idx, xa, tgt, domain, p, q = idx[k], xa[k], tgt[k], domain[k], p[k], q[k]
            flat = xa.flatten(1)
            rows = torch.arange(flat.shape[0], device=x.device)
            for j in (p, q):
                flat[rows, j] = (flat[rows, j] + self.theta).clamp(0.0, 1.0)
                domain[rows, j] = False
        return keep_if_adversarial(self.model, out, x, y, target)
