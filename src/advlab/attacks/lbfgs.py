"""Box-constrained L-BFGS attack (Szegedy et al. 2014), batched: one projected L-BFGS per
sample (own history, own step length, own ``c``), all samples advanced together."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._util import check_positive, check_positive_int
from .base import Attack
from .logits import keep_if_adversarial, runner_up


class LBFGS(Attack):
    """Szegedy et al.'s attack: minimise ``c * ||x' - x||_2^2 + CE(f(x'), target)`` over the box
    ``x' in [0, 1]``, with a per-sample search over ``c`` for the smallest perturbation that
    reaches the target.

    The inner problem is solved by a projected L-BFGS (two-loop recursion on the free variables,
    variables at a bound whose gradient points outward are held fixed, projected backtracking
    line search with the Armijo rule); every iterate is inside the box exactly. Each iteration
    costs one forward and one backward of the active samples: a sample whose trial point is
    rejected halves its step and retries at the next iteration, while the others move on.

    ``c`` is where the search starts (None: 1.0). After each of the ``binary_search_steps``
    rounds of ``steps`` iterations, a sample that reached its target tries a larger ``c``
    (x10 until a round fails, then the geometric mean of the bracket), one that did not tries a
    smaller one. The smallest successful perturbation over all rounds is returned, the clean
    image where the target was never reached. Without ``target=`` the target is the
    highest-scoring class of the clean image other than ``y`` (its second-ranked class when it
    is classified correctly). Success means reaching the target.
    """

    norm = None
    supports_targeted = True

    def __init__(self, model, c: Optional[float] = None, steps: int = 50, binary_search_steps: int = 5,
                 history: int = 10):
        super().__init__(model)
        self.c = None if c is None else check_positive(c, "c")
        self.steps = check_positive_int(steps, "steps")
        self.binary_search_steps = check_positive_int(binary_search_steps, "binary_search_steps")
        self.history = check_positive_int(history, "history")

    def _perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        if target is None:
            with torch.no_grad():
                target = runner_up(self.model(x), y)
        c = torch.full((n,), 1.0 if self.c is None else self.c, device=x.device, dtype=x.dtype)
        lo = torch.zeros_like(c)
        hi = torch.full_like(c, float("inf"))
        best_l2 = torch.full_like(c, float("inf"))
        best_adv = x.flatten(1).clone()
        for _ in range(self.binary_search_steps):
            succ = self._minimise(x.flatten(1), x.shape[1:], target, c, best_l2, best_adv)
            lo = torch.where(succ, torch.maximum(lo, c), lo)
            hi = torch.where(succ, hi, torch.minimum(hi, c))
            grow = torch.where(torch.isinf(hi), c * 10, (lo * hi).sqrt())
            shrink = torch.where(lo > 0, (lo * hi).sqrt(), c / 10)
            c = torch.where(succ, grow, shrink)
        return keep_if_adversarial(self.model, best_adv.view_as(x), x, y, target)

    def _minimise(self, x0, shape, target, c, best_l2, best_adv) -> torch.Tensor:
        """Projected L-BFGS on all samples at their fixed ``c``; updates ``best_l2``/``best_adv``
        (flat) in place; returns which samples reached the target in this round."""
        n, dim = x0.shape
        h = self.history
        dev, dt = x0.device, x0.dtype
        succ = torch.zeros(n, dtype=torch.bool, device=dev)

        def evaluate(z, x0_, tgt, c_):
            zg = z.detach().view(-1, *shape).requires_grad_(True)
            logits = self.model(zg)
            l2sq = (zg.flatten(1) - x0_).pow(2).sum(1)
            obj = c_ * l2sq + F.cross_entropy(logits, tgt, reduction="none")
            (g,) = torch.autograd.grad(obj.sum(), zg)
            return obj.detach(), g.flatten(1), logits.detach().argmax(1) == tgt, l2sq.detach().sqrt()

        def free_mask(z, g):
            return ~(((z <= 0) & (g > 0)) | ((z >= 1) & (g < 0)))

        def direction(gf, S, Y, rho):
            q = gf
            alphas = []
            for j in range(h - 1, -1, -1):
                a = rho[:, j] * (S[:, j] * q).sum(1)
                q = q - a[:, None] * Y[:, j]
                alphas.append(a)
            has = rho[:, -1] > 0
            yy = Y[:, -1].pow(2).sum(1)
            gamma = torch.where(has, 1.0 / (rho[:, -1] * yy).clamp_min(1e-30), torch.zeros_like(yy))
            r = gamma[:, None] * q
            for j in range(h):
                b = rho[:, j] * (Y[:, j] * r).sum(1)
                r = r + S[:, j] * (alphas[h - 1 - j] - b)[:, None]
            steep = -gf * (0.1 / gf.norm(dim=1, keepdim=True).clamp_min(1e-12))
            d = torch.where(has[:, None], -r, steep)
            # not a descent direction (curvature pairs gone stale at the bounds): steepest descent
            bad = (d * gf).sum(1) >= 0
            return torch.where(bad[:, None], steep, d)

        idx = torch.arange(n, device=dev)
        xa, tgt, ca = x0, target, c
        l2_a, adv_a, succ_a = best_l2.clone(), best_adv.clone(), succ.clone()
        z = x0.clone()
        f, g, _, _ = evaluate(z, xa, tgt, ca)
        S = torch.zeros(n, h, dim, device=dev, dtype=dt)
        Y = torch.zeros_like(S)
        rho = torch.zeros(n, h, device=dev, dtype=dt)
        fr = free_mask(z, g)
        d = direction(g * fr, S, Y, rho)
        t = torch.ones(n, device=dev, dtype=dt)
        done = torch.zeros(n, dtype=torch.bool, device=dev)

        def write_back():
            best_l2[idx] = l2_a
            best_adv[idx] = adv_a
            succ[idx] = succ_a

        for it in range(self.steps):
            z_try = (z + t[:, None] * d).clamp_(0.0, 1.0)
            f_t, g_t, ok, l2 = evaluate(z_try, xa, tgt, ca)
            with torch.no_grad():
                better = ok & (l2 < l2_a)
                l2_a = torch.where(better, l2, l2_a)
                adv_a = torch.where(better[:, None], z_try, adv_a)
                succ_a = succ_a | ok
                s = z_try - z
                acc = f_t <= f + 1e-4 * (g * s).sum(1)
                yv = g_t - g
                sy = (s * yv).sum(1)
                upd = acc & (sy > 1e-10)
                S = torch.where(upd[:, None, None], torch.cat([S[:, 1:], s[:, None]], 1), S)
                Y = torch.where(upd[:, None, None], torch.cat([Y[:, 1:], yv[:, None]], 1), Y)
                rho = torch.where(upd[:, None], torch.cat([rho[:, 1:], 1.0 / sy.clamp_min(1e-10)[:, None]], 1), rho)
                # converged: an accepted step that no longer decreases the objective
                done = done | (acc & (f - f_t <= 1e-9 * f.abs().clamp_min(1.0)))
                z = torch.where(acc[:, None], z_try, z)
                f = torch.where(acc, f_t, f)
                g = torch.where(acc[:, None], g_t, g)
                t = torch.where(acc, torch.ones_like(t), t * 0.5)
                # a search that shrank too far restarts from steepest descent; twice means stuck
                stall = ~acc & (t < 1e-4)
                has_hist = rho[:, -1] > 0
                done = done | (stall & ~has_hist)
                rho = torch.where(stall[:, None], torch.zeros_like(rho), rho)
                t = torch.where(stall, torch.ones_like(t), t)
                new = acc | stall
                d_new = direction(g * free_mask(z, g), S, Y, rho)
                d = torch.where(new[:, None], d_new, d)
                if (it + 1) % 10 == 0 and it + 1 < self.steps and bool(done.any()):
                    write_back()
                    k = (~done).nonzero().squeeze(1)
                    if k.numel() == 0:
                        return succ
                    idx, xa, tgt, ca = idx[k], xa[k], tgt[k], ca[k]
                    z, f, g, d, t, done = z[k], f[k], g[k], d[k], t[k], done[k]
                    S, Y, rho = S[k], Y[k], rho[k]
                    l2_a, adv_a, succ_a = l2_a[k], adv_a[k], succ_a[k]
        write_back()
        return succ
