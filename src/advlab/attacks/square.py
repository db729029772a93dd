"""Square attack (Andriushchenko et al. 2020): a score-based black-box attack by random search,
L-inf and L2.

The attack only reads the model's logits (every call runs under ``torch.no_grad()``, it never
calls backward). Starting from a random point of the ball, each iteration changes one random
square window of the current perturbation and keeps the candidate only if the loss decreases:

- L-inf: the start is vertical stripes of +-eps (one sign per column and channel); a candidate
  sets a random ``s x s`` window to one random colour of +-eps per channel (a different one where
  the window already holds the drawn colour), so the perturbation stays on the vertices of the ball;
- L2: the start is a grid of stacked-square "pseudo-Gaussian" bumps with random signs, scaled to
  norm eps; a candidate adds a new bump in a window ``W1``, zeroes a second window ``W2``, moves
  the freed mass into ``W1``, and rescales the perturbation to norm eps.

The side of the window is ``s = round(sqrt(p * n_features / C))`` where ``p`` follows the
piecewise-constant schedule of the paper: ``p_init`` halved at iterations 10, 50, 200, 500, 1000,
2000, 4000, 6000 and 8000 of a 10,000-query budget, rescaled to ``queries`` as in the reference
code. Window positions are uniform over every position, including the last row and column, which
the reference code's ``randint(0, h - s)`` leaves out. L-inf draws one position per iteration for
the whole batch, as AutoAttack's implementation does (each sample's search has the same
distribution as with a window of its own; the colours stay per sample): the candidates are then
the current images with one window overwritten in place, and a rejected candidate gets its old
window back, so an iteration touches ``s x s`` pixels of each image besides the forward pass. L2
draws two positions per sample (its candidate rescales the whole perturbation anyway).

Losses (the quantity minimised; a candidate is accepted when it strictly decreases):

- ``"margin"``: ``z_y - max_{k != y} z_k`` (targeted: ``max_{k != t} z_k - z_t``), on the logits;
- ``"ce"``: ``log softmax(z)_y`` (targeted: the cross-entropy of the target), the paper's choice
  for targeted attacks;
- a callable ``loss(logits, y, target) -> (N,)``, the objective to *ascend* as in
  :func:`~advlab.attacks.gradient.attack_objective` (the search minimises its negative).

Batching and queries: all samples advance together, one forward pass of the samples still
active per iteration. A sample is done as soon as its current point succeeds
(:func:`~advlab.metrics.robustness.is_success` on the argmax of the logits): from then on its
point is frozen, and it leaves the batch at the next check, every ``check_every`` iterations
(the search's only host synchronisations; the result does not depend on them). One query is one
forward pass of one sample that is not done: the clean image costs the first one (a sample the
model already gets wrong is returned unchanged), so every sample uses at most ``restarts *
queries`` queries; the per-sample count of the last call is kept in ``last_queries`` (CPU int64
tensor). A done sample may still ride along for up to ``check_every - 1`` forward passes that
are not counted (they cannot change its point).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .._util import AdvlabError, check_positive_int
from ..metrics.robustness import is_success
from .base import Attack
from .geometry import check_norm, linf_box
from .gradient import DEFAULT_EPS, Loss, _check_loss, attack_objective
from .loop import check_interval

__all__ = ["Square", "p_schedule"]

#: iterations (of a 10,000-query budget) after which the reference code halves ``p``
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of the pixels changed at iteration ``it`` (0-based) of an ``n_iters`` budget:
    ``p_init`` halved at each of the paper's milestones, rescaled from 10,000 queries to
    ``n_iters`` (``p_selection`` of the reference code)."""
    it = int(it / n_iters * 10000)
    return p_init / 2 ** sum(it > m for m in _HALVINGS)


def _pseudo_gaussian_rect(rows: int, cols: int) -> torch.Tensor:
    """Unit-norm bump on a ``rows x cols`` rectangle: concentric rectangles of weight
    ``1 / (k + 1)^2`` summed (the reference code's ``pseudo_gaussian_pert_rectangles``)."""
    delta = torch.zeros(rows, cols, dtype=torch.float64)
    r0, c0 = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        delta[max(r0, 0): min(r0 + 2 * k + 1, rows), max(c0, 0): min(c0 + 2 * k + 1, cols)] += 1.0 / (k + 1) ** 2
        r0 -= 1
        c0 -= 1
    return delta / delta.norm().clamp_min(1e-12)


def _square_pattern(s: int) -> torch.Tensor:
    """The ``s x s`` L2 update of the paper: a positive bump on the top half and a negative one on
    the bottom half, unit L2 norm (``meta_pseudo_gaussian_pert`` without its random transpose)."""
    delta = torch.zeros(s, s, dtype=torch.float64)
    delta[: s // 2] = _pseudo_gaussian_rect(s // 2, s)
    delta[s // 2:] = -_pseudo_gaussian_rect(s - s // 2, s)
    return delta / delta.norm()


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


class Square(Attack):
    """Square attack (Andriushchenko et al. 2020), score-based random search in the L-inf or L2
    ball of radius ``eps`` (default 8/255 for L-inf, 0.5 for L2).

    ``queries`` is the per-sample budget of forward passes of one restart (the reference code's
    ``n_iters``; the clean check takes one query of the first restart), ``p_init`` the initial
    fraction of the pixels a window covers (0.8 as in AutoAttack's Square; the paper uses 0.05
    to 0.1 on ImageNet-sized images), ``loss`` ``"margin"`` (default), ``"ce"`` or a callable
    (see the module docstring). With ``restarts > 1`` the samples not yet fooled are attacked again from a new
    random start; a fooled sample keeps its first success, a failed one the point of lowest loss.
    Random numbers come only from the attack's generator, seeded by ``seed``. ``check_every``:
    the fooled samples leave the batch every that many iterations (see the module docstring;
    None: every iteration on the CPU, every :data:`~advlab.attacks.loop.ACCELERATOR_CHECK_EVERY`
    on a GPU).
    """

    supports_targeted = True

    def __init__(self, model: nn.Module, eps: float | None = None, norm: str = "inf", queries: int = 1000,
                 p_init: float = 0.8, restarts: int = 1, loss: Loss = "margin", seed: int | None = 0,
                 scores: Callable | None = None, check_every: int | None = None):
        self.norm = check_norm(norm)
        super().__init__(model, eps=DEFAULT_EPS[self.norm] if eps is None else eps, seed=seed)
        self.queries = check_positive_int(queries, "queries")
        try:
            valid = not isinstance(p_init, bool) and 0.0 < float(p_init) <= 1.0
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise AdvlabError(f"p_init must be a number in (0, 1], got {p_init!r}")
        self.p_init = float(p_init)
        self.restarts = check_positive_int(restarts, "restarts")
        self.loss = _check_loss(loss)
        self.scores = scores
        self.check_every = None if check_every is None else check_positive_int(check_every, "check_every")
        self._patterns: dict = {}
        self._last_queries: torch.Tensor | None = None

    @property
    def last_queries(self) -> torch.Tensor | None:
        """Queries (forward passes) spent on each sample by the last call: an int64 CPU tensor,
        1 for a sample misclassified from the start, at most ``restarts * queries``."""
        return self._last_queries

    # ------------------------------------------------------------------ driver
    def _perturb(self, x, y, target):
        with torch.no_grad():
            return self._attack(x, y, target)

    def _attack(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        logits = self._decision(self.model(x), y)
        queries = torch.ones(x.shape[0], dtype=torch.long, device=x.device)
        fooled = is_success(logits.argmax(dim=1), y, target)
        best = x.clone()
        best_loss = torch.full((x.shape[0],), float("inf"), device=x.device)
        if self.eps > 0:
            for r in range(self.restarts):
                todo = torch.nonzero(~fooled).squeeze(1)
                budget = self.queries - 1 if r == 0 else self.queries
                if todo.numel() == 0 or budget == 0:
                    continue
                ts = None if target is None else target[todo]
                cand, loss, ok, used = self._search(x[todo], y[todo], ts, budget)
                queries[todo] += used
                better = ok | (loss < best_loss[todo])
                best[todo] = torch.where(_per_sample(better), cand, best[todo])
                best_loss[todo] = torch.where(better, loss.to(best_loss.dtype), best_loss[todo])
                fooled[todo] = torch.where(better, ok, fooled[todo])
        self._last_queries = queries.cpu()
        return best

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """Per-sample loss to minimise, in float32 or wider."""
        loss = -attack_objective(logits, y, target, self.loss)
        return loss if loss.dtype == torch.float64 else loss.float()

    def _search(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One random search of at most ``budget`` forward passes per sample (the start included).
        Returns the final points, their losses, success flags and per-sample query counts."""
        n = x.shape[0]
        linf = self.norm == "inf"
        if linf:
            lo, hi = linf_box(x, self.eps)
            bounds: tuple[torch.Tensor, ...] = (lo, hi)
            state = self._linf_start(x, lo, hi)
            # the windows' positions of the whole search, in one transfer: uniform [0, 1) pairs
            corners = self._rand((max(budget - 1, 1), 2), x.device).cpu().double().tolist()
        else:
            bounds = ()
            state = self._l2_start(x)
        logits = self._decision(self.model(state), y)
        loss = self._loss(logits, y, target)
        ok = is_success(logits.argmax(dim=1), y, target)
        used = torch.ones(n, dtype=torch.long, device=x.device)

        # the active samples, compacted at a check every ``check_every`` iterations: a sample that
        # succeeded before (``a_done``) rides along frozen until then (its candidates are rejected,
        # its queries no longer counted), so the loop synchronises with the device only there
        idx = torch.nonzero(~ok).squeeze(1)
        a_state, a_x, a_y, a_loss = state[idx], x[idx], y[idx], loss[idx]
        a_t = None if target is None else target[idx]
        a_bounds = tuple(b[idx] for b in bounds)
        a_done = torch.zeros(idx.shape[0], dtype=torch.bool, device=x.device)
        check_every = check_interval(self.check_every, x.device)
        for it in range(budget - 1):
            if idx.numel() == 0:
                break
            p = p_schedule(self.p_init, it, self.queries)
            if linf:
                window, old = self._linf_patch(a_state, *a_bounds, p, corners[it])
                cand = a_state
            else:
                cand = self._l2_step(a_state, a_x, p)
            logits = self._decision(self.model(cand), a_y)
            used[idx] += (~a_done).long()
            new_loss = self._loss(logits, a_y, a_t)
            improved = (new_loss < a_loss) & ~a_done
            if linf:  # a rejected candidate gets its old window back
                window.copy_(torch.where(_per_sample(improved), window, old))
            else:
                a_state = torch.where(_per_sample(improved), cand, a_state)
            a_loss = torch.where(improved, new_loss, a_loss)
            a_done = a_done | (improved & is_success(logits.argmax(dim=1), a_y, a_t))
            if (it + 1) % check_every == 0 and bool(a_done.any()):
                # the done rows written back (all rows: no data-dependent shape), the rest kept by
                # one index (the check's second and last synchronisation)
                state[idx] = a_state
                loss[idx] = a_loss
                ok[idx] = a_done
                keep = (~a_done).nonzero().squeeze(1)
                idx, a_state, a_x, a_y, a_loss = idx[keep], a_state[keep], a_x[keep], a_y[keep], a_loss[keep]
                a_t = None if a_t is None else a_t[keep]
                a_bounds = tuple(b[keep] for b in a_bounds)
                a_done = a_done[keep]
        state[idx] = a_state
        loss[idx] = a_loss
        ok[idx] = a_done
        return state, loss, ok, used

    # ------------------------------------------------------------------ random pieces
    def _signs(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Uniform +-1 of ``like``'s dtype and device."""
        bits = torch.randint(0, 2, shape, generator=self._generator, device=like.device)
        return bits.to(like.dtype).mul_(2).sub_(1)

    def _windows(self, n: int, s: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-left corners ``(top, left)`` of ``n`` random ``s x s`` windows, uniform per sample."""
        top = torch.randint(0, h - s + 1, (n,), generator=self._generator, device=device)
        left = torch.randint(0, w - s + 1, (n,), generator=self._generator, device=device)
        return top, left

    @staticmethod
    def _mask(top: torch.Tensor, left: torch.Tensor, s: int, h: int, w: int) -> torch.Tensor:
        """Boolean (N, 1, H, W) mask of the windows."""
        rows = torch.arange(h, device=top.device)
        cols = torch.arange(w, device=top.device)
        in_rows = (rows >= top[:, None]) & (rows < top[:, None] + s)
        in_cols = (cols >= left[:, None]) & (cols < left[:, None] + s)
        return in_rows[:, None, :, None] & in_cols[:, None, None, :]

    @staticmethod
    def _window_index(top: torch.Tensor, left: torch.Tensor, s: int) -> tuple[torch.Tensor, ...]:
        """Advanced indices selecting the windows as ``t[index]`` of shape (N, s, s, C)."""
        offs = torch.arange(s, device=top.device)
        rows = (top[:, None] + offs)[:, :, None]
        cols = (left[:, None] + offs)[:, None, :]
        batch = torch.arange(top.shape[0], device=top.device)[:, None, None]
        return batch, slice(None), rows, cols

    # ------------------------------------------------------------------ L-inf
    def _linf_start(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Vertical stripes: one random sign per sample, channel and column (+1 -> the ball's upper
        bound, -1 -> its lower one, both clipped to [0, 1])."""
        n, c, h, w = x.shape
        return torch.where(self._signs((n, c, 1, w), x) > 0, hi, lo)

    def _linf_patch(self, img: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, p: float,
                    corner: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Overwrite, in place, one ``s x s`` window of every image (at ``corner``, a uniform pair in
        [0, 1)) with a random colour per sample (one vertex of the ball per channel); where the
        window already holds that colour, a uniformly random other one. Returns the window (a view
        of ``img``) and its old content, to restore the samples whose candidate is rejected."""
        n, c, h, w = img.shape
        s = round(math.sqrt(p * h * w))
        s = min(max(s, 1), max(min(h, w) - 1, 1))
        top = min(int(corner[0] * (h - s + 1)), h - s)
        left = min(int(corner[1] * (w - s + 1)), w - s)
        rows, cols = slice(top, top + s), slice(left, left + s)
        window, lo_w, hi_w = img[:, :, rows, cols], lo[:, :, rows, cols], hi[:, :, rows, cols]
        old = window.clone()
        up = self._signs((n, c, 1, 1), img) > 0
        # the reference code redraws until the window changes (a host sync per draw); a uniform draw
        # among the 2^C - 1 other colours is one flip of a uniformly random non-empty subset of the
        # channels, in one draw and without a sync
        same = (torch.where(up, hi_w, lo_w) == old).flatten(1).all(dim=1)
        if c == 1:
            flip = torch.ones_like(up)
        else:
            subset = torch.randint(1, 2 ** c, (n, 1), generator=self._generator, device=img.device)
            flip = ((subset >> torch.arange(c, device=img.device)) & 1).bool().view(n, c, 1, 1)
        window.copy_(torch.where(up ^ (_per_sample(same) & flip), hi_w, lo_w))
        return window, old

    # ------------------------------------------------------------------ L2
    def _oriented_pattern(self, s: int, n: int, like: torch.Tensor) -> torch.Tensor:
        """(n, 1, s, s) copies of the unit-norm square pattern, each transposed with probability 1/2."""
        key = (s, like.device, like.dtype)
        pattern = self._patterns.get(key)
        if pattern is None:  # made on the host once per size: a copy per iteration would synchronise
            pattern = self._patterns[key] = _square_pattern(s).to(device=like.device, dtype=like.dtype)
        flip = self._rand((n,), like.device) > 0.5
        return torch.where(flip[:, None, None], pattern.T, pattern)[:, None]

    def _l2_start(self, x: torch.Tensor) -> torch.Tensor:
        """A grid of bumps of side ``min(H, W) // 5`` with a random sign per sample and channel,
        scaled to L2 norm eps and clipped to [0, 1]."""
        n, c, h, w = x.shape
        s = max(min(h, w) // 5, 1)
        delta = torch.zeros_like(x)
        start_h, start_w = max((h - 5 * s) // 2, 0), max((w - 5 * s) // 2, 0)
        for top in range(start_h, h - s + 1, s):
            for left in range(start_w, w - s + 1, s):
                bump = self._oriented_pattern(s, n, x) * self._signs((n, c, 1, 1), x)
                delta[:, :, top: top + s, left: left + s] += bump
        norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        return (x + delta * _per_sample(self.eps / norm)).clamp_(0.0, 1.0)

    def _l2_step(self, x_best: torch.Tensor, x: torch.Tensor, p: float) -> torch.Tensor:
        """Candidate images: a new bump in window 1 (plus the old content of window 1, both
        normalised), window 2 zeroed, window 1 scaled to take the mass of both windows and any
        unused budget, the whole perturbation rescaled to norm eps and clipped to [0, 1]."""
        n, c, h, w = x.shape
        delta = x_best - x
        s = max(round(math.sqrt(p * c * h * w / c)), 3)
        s = min(s + 1 if s % 2 == 0 else s, min(h, w))
        top1, left1 = self._windows(n, s, h, w, x.device)
        top2, left2 = self._windows(n, s, h, w, x.device)
        mask1 = self._mask(top1, left1, s, h, w)
        both = mask1 | self._mask(top2, left2, s, h, w)
        win = self._window_index(top1, left1, s)

        old = delta[win].permute(0, 3, 1, 2)  # (n, c, s, s)
        norm_old = old.square().sum(dim=(2, 3), keepdim=True).sqrt()
        norm_image = delta.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()
        norm_both = (delta * both).square().sum(dim=(2, 3), keepdim=True).sqrt()

        new = self._oriented_pattern(s, n, x) * self._signs((n, c, 1, 1), x) + old / (norm_old + 1e-10)
        budget = ((self.eps ** 2 - norm_image.square()).clamp_min(0.0) / c + norm_both.square()).sqrt()
        new = new * (budget / new.square().sum(dim=(2, 3), keepdim=True).sqrt().clamp_min(1e-12))

        delta = delta.masked_fill(both & ~mask1, 0.0)
        delta[win] = new.permute(0, 2, 3, 1)
        norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        return (x + delta * _per_sample(self.eps / norm)).clamp_(0.0, 1.0)
