"""The visual imperceptible bound (VIB) of the VIB paper (eq. 2-3) and its attack-effectiveness score.

For every training image x_i, d_ij is the distance to its nearest training image x_j of another
class, and the bound is sigma_i = d_ij / 2k (k = 1, 2, 2.5, 3 in the paper's Table II):

>>> vb = visual_bound(train_set)                 # nearest other-class neighbour of every image
>>> vb.sigma(2.0)                                # (N,) per-image bound at k = 2
>>> vb.statistics()                              # Table II rows: min / mean / max sigma per k
>>> effectiveness_score(attack_result, x, vb.sigma_mean(2.0))   # Table III: 0 (ineffective) .. 100

Readings settled here (DESIGN.md):

- d_ij is the *mean absolute pixel difference* (the L1 distance divided by the number of values
  C*H*W, pixels in [0, 1]); the nearest neighbour is the nearest under that same distance.
- The effectiveness score (section III-B) of an attack on a set of images is the percentage of
  the attacked images (those the model classifies correctly when clean) for which the attack is
  effective: it succeeds (:func:`advlab.metrics.is_success`, never a rejection) *and* the
  perturbation's mean absolute pixel difference is at most the bound, sigma_mean (the mean of
  sigma_i over the training set, as the paper) or a per-image sigma when one is passed. The
  share of the successes that lie within the bound is reported beside it.

The all-pairs search never holds an N x N matrix: queries are taken in chunks of ``b`` rows so
that one (b, N) tile fits in ``max_tile_mb``. Two exact methods:

- ``"brute"``: ``torch.cdist(p=1)`` on each tile, a running minimum over the reference chunks;
- ``"pruned"`` (the default for images of 16 x 16 or more): a cascade of lower bounds. Summing
  the difference over s x s blocks can only lose mass (triangle inequality), so the L1 distance
  of block-sum-pooled images is a lower bound of the true one. The coarsest pooling is computed
  for the whole tile; the full distance of the ``probe`` best-ranked candidates gives an upper
  bound U per query; only the pairs whose lower bound is <= U (with a float slack) go on to the
  finer pooling and then to the full distance. Nothing that could be the nearest neighbour is
  ever pruned, so the answer is the brute-force one (ties go to the smallest index).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._util import AdvlabError, check_device, check_images, check_labels, progress_enabled
from .robustness import is_success

__all__ = ["PAPER_KS", "NearestOtherClass", "nearest_other_class", "brute_force_nearest_other_class",
           "sigma_bound", "bound_statistics", "VisualBound", "visual_bound", "perturbation_magnitude",
           "effectiveness_score"]

#: the paper's values of k (Table II, Tables IV-VI)
PAPER_KS: Tuple[float, ...] = (1.0, 2.0, 2.5, 3.0)

# relative and absolute slack when comparing a float lower bound with an upper bound: the pooled
# sums are rounded differently from the full sum, so a lower bound may exceed the true distance
# by a few ulps; the slack keeps every candidate that could tie or win
_RTOL, _ATOL = 1e-5, 1e-4


@dataclass
class NearestOtherClass:
    """Result of :func:`nearest_other_class`. ``distance`` is d_ij (mean absolute pixel difference,
    float32, on the CPU), ``index`` the position j of the neighbour in the reference set."""

    distance: torch.Tensor
    index: torch.Tensor
    seconds: float
    method: str
    #: pairs whose full distance was computed (N * N_ref for brute force)
    exact_pairs: int
    #: pairs whose pooled lower bound was computed, per pooling factor
    bound_pairs: Dict[int, int] = field(default_factory=dict)
    #: the largest tile the method allocates by design (bytes): the memory bound of the search
    tile_bytes: int = 0
    chunk_size: int = 0


def _check_set(x: torch.Tensor, y: torch.Tensor, xname: str, yname: str) -> None:
    check_images(x, xname)
    check_labels(y, x.shape[0], None, yname)


def _block_sum(x: torch.Tensor, s: int) -> torch.Tensor:
    """Sum-pool (N, C, H, W) over s x s blocks (zero-padded to a multiple of s), flattened."""
    if s == 1:
        return x.flatten(1)
    h, w = x.shape[-2:]
    ph, pw = (-h) % s, (-w) % s
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    n, c, h, w = x.shape
    return x.reshape(n, c, h // s, s, w // s, s).sum((3, 5)).flatten(1)


def _auto_pools(h: int, w: int) -> List[int]:
    side = min(h, w)
    if side < 16:
        return []
    coarse = max(2, round(side / 7))    # 28 -> 4 (7 x 7 blocks), 32 -> 5, 64 -> 9
    return [coarse, 2] if coarse > 2 else [2]


def _tile_rows(n_ref: int, max_tile_mb: float, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise AdvlabError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    if not (max_tile_mb > 0):
        raise AdvlabError(f"max_tile_mb must be > 0, got {max_tile_mb}")
    return max(1, min(4096, int(max_tile_mb * 2 ** 20 // (4 * max(n_ref, 1)))))


def _pair_rows(d: int, budget_bytes: int = 32 * 2 ** 20) -> int:
    return max(256, budget_bytes // (4 * max(d, 1)))


def _pair_l1(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, step: int) -> torch.Tensor:
    """sum |a[rows] - b[cols]| per pair, gathered in slices of ``step`` pairs."""
    out = torch.empty(rows.shape[0], dtype=a.dtype, device=a.device)
    for i in range(0, rows.shape[0], step):
        r, c = rows[i: i + step], cols[i: i + step]
        out[i: i + step] = (a[r] - b[c]).abs().sum(1)
    return out


def _row_argmin(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row the smallest value and, among equal values, the smallest column."""
    best = torch.full((b,), math.inf, dtype=vals.dtype, device=vals.device)
    best = best.scatter_reduce(0, rows, vals, reduce="amin")
    big = torch.iinfo(torch.long).max
    cand = torch.where(vals == best[rows], cols, torch.full_like(cols, big))
    idx = torch.full((b,), big, dtype=torch.long, device=vals.device).scatter_reduce(0, rows, cand, reduce="amin")
    return best, idx


def brute_force_nearest_other_class(x: torch.Tensor, y: torch.Tensor, ref_x: Optional[torch.Tensor] = None,
                                    ref_y: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference answer for tests and cross-checks: one full (N, N_ref) ``cdist`` in memory.
    Only for small sets. Returns (d_ij as mean absolute pixel difference, index)."""
    ref_x = x if ref_x is None else ref_x
    ref_y = y if ref_y is None else ref_y
    d = torch.cdist(x.flatten(1).float(), ref_x.flatten(1).float(), p=1)
    d = d.masked_fill(y.reshape(-1, 1) == ref_y.reshape(1, -1), math.inf)
    v, i = d.min(1)
    return v / x[0].numel(), i


def nearest_other_class(x: torch.Tensor, y: torch.Tensor, ref_x: Optional[torch.Tensor] = None,
                        ref_y: Optional[torch.Tensor] = None, method: str = "auto", max_tile_mb: float = 64.0,
                        chunk_size: Optional[int] = None, pools: Optional[Sequence[int]] = None, probe: int = 32,
                        device=None, progress: Optional[bool] = None) -> NearestOtherClass:
    """Nearest image of another class for every image of ``x`` (labels ``y``) among ``ref_x``
    (labels ``ref_y``; default: the same set, so an image is never its own neighbour).

    Exact under the mean absolute pixel difference; chunked so that no tile exceeds
    ``max_tile_mb`` (or ``chunk_size`` query rows); runs on ``device`` (default: ``x``'s);
    ``method`` is ``"brute"``, ``"pruned"`` or ``"auto"`` (pruned for images of 16 x 16 or more);
    ``pools`` the block sizes of the pruning cascade (default: about side/7, then 2); ``probe``
    the number of best-ranked candidates whose full distance sets the first upper bound.

    ``progress``: a tqdm bar over the chunks (default: on a terminal). Images in [0, 1], any
    (N, C, H, W) shape; raises ``AdvlabError`` on mismatched shapes or labels.
    """
    if ref_x is None and ref_y is not None or ref_x is not None and ref_y is None:
        raise AdvlabError("pass ref_x and ref_y together (or neither: the set is its own reference)")
    _check_set(x, y, "x", "y")
    if ref_x is not None:
        _check_set(ref_x, ref_y, "ref_x", "ref_y")
        if ref_x.shape[1:] != x.shape[1:]:
            raise AdvlabError(f"ref_x must hold images of shape {tuple(x.shape[1:])}, got {tuple(ref_x.shape[1:])}")
    else:
        ref_x, ref_y = x, y
    if method not in ("auto", "brute", "pruned"):
        raise AdvlabError(f"method must be 'auto', 'brute' or 'pruned', got {method!r}")
    if x.shape[0] == 0:
        raise AdvlabError("x is empty")
    missing = {int(c) for c in torch.unique(y).tolist() if bool((ref_y != c).sum() == 0)}
    if missing:
        raise AdvlabError(f"no reference image of another class for label(s) {sorted(missing)}")
    if isinstance(probe, (bool, str)) or not isinstance(probe, (int, float)) or probe != probe:
        raise AdvlabError(f"probe must be an integer >= 1, got {probe!r}")
    probe = max(1, int(probe))
    h, w = x.shape[-2:]
    pools = _auto_pools(h, w) if pools is None else [int(p) for p in pools]
    if any(p < 1 for p in pools):
        raise AdvlabError(f"pools must be block sizes >= 1, got {pools}")
    if method == "auto":
        method = "pruned" if pools else "brute"
    if method == "pruned" and not pools:
        pools = [2]
    dev = check_device(device) if device is not None else x.device
    n, n_ref, dim = x.shape[0], ref_x.shape[0], x[0].numel()
    rows = _tile_rows(n_ref, max_tile_mb, chunk_size)
    t0 = time.perf_counter()
    qy_all = y.to(dev)
    ry = ref_y.to(dev)
    rf = ref_x.to(dev, torch.float32)
    dist = torch.empty(n, dtype=torch.float32)
    index = torch.empty(n, dtype=torch.long)
    exact_pairs, bound_pairs = 0, {p: 0 for p in pools}
    step = _pair_rows(dim)
    from tqdm.auto import tqdm
    import sys

    bar = tqdm(total=n, desc=f"nearest other class ({method})", disable=not progress_enabled(progress),
               leave=False, file=sys.stderr)
    if method == "brute":
        ref_rows = rows  # reference chunks of the same size: tiles are (rows x rows)
        rflat = rf.flatten(1)
        for i in range(0, n, rows):
            q = x[i: i + rows].to(dev, torch.float32).flatten(1)
            qy = qy_all[i: i + rows]
            best = torch.full((q.shape[0],), math.inf, device=dev)
            arg = torch.zeros(q.shape[0], dtype=torch.long, device=dev)
            for j in range(0, n_ref, ref_rows):
                d = torch.cdist(q, rflat[j: j + ref_rows], p=1)
                d = d.masked_fill(qy[:, None] == ry[None, j: j + ref_rows], math.inf)
                v, a = d.min(1)
                better = v < best
                best = torch.where(better, v, best)
                arg = torch.where(better, a + j, arg)
            dist[i: i + rows], index[i: i + rows] = (best / dim).cpu(), arg.cpu()
            exact_pairs += q.shape[0] * n_ref
            bar.update(q.shape[0])
        bar.close()
        return NearestOtherClass(dist, index, time.perf_counter() - t0, "brute", exact_pairs, {},
                                 4 * rows * rows, rows)

    rflat = rf.flatten(1)
    rpool = [_block_sum(rf, p) for p in pools]
    probe = min(probe, n_ref)
    for i in range(0, n, rows):
        qx = x[i: i + rows].to(dev, torch.float32)
        qflat = qx.flatten(1)
        qpool = [_block_sum(qx, p) for p in pools]
        qy = qy_all[i: i + rows]
        b = qx.shape[0]
        # coarsest lower bound on the whole tile (b, N_ref); same class -> +inf
        lb = torch.cdist(qpool[0], rpool[0], p=1).masked_fill(qy[:, None] == ry[None], math.inf)
        bound_pairs[pools[0]] += b * n_ref
        # full distance of the probe best-ranked candidates: an upper bound per row
        top = lb.topk(probe, 1, largest=False).indices                      # (b, probe)
        r0 = torch.arange(b, device=dev).repeat_interleave(probe)
        c0 = top.reshape(-1)
        v0 = _pair_l1(qflat, rflat, r0, c0, step)
        v0 = torch.where(torch.isinf(lb.gather(1, top).reshape(-1)), torch.full_like(v0, math.inf), v0)
        exact_pairs += r0.numel()
        upper, _ = _row_argmin(r0, c0, v0, b)
        slack = upper * _RTOL + _ATOL
        lb.scatter_(1, top, math.inf)                                        # already exact
        keep = lb <= (upper + slack)[:, None]
        del lb
        pr, pc = keep.nonzero(as_tuple=True)
        del keep
        for lvl in range(1, len(pools)):
            if pr.numel() == 0:
                break
            lbv = _pair_l1(qpool[lvl], rpool[lvl], pr, pc, _pair_rows(qpool[lvl].shape[1]))
            bound_pairs[pools[lvl]] += pr.numel()
            ok = lbv <= (upper + slack)[pr]
            pr, pc = pr[ok], pc[ok]
        if pr.numel():
            v1 = _pair_l1(qflat, rflat, pr, pc, step)
            exact_pairs += pr.numel()
            r_all, c_all, v_all = torch.cat([r0, pr]), torch.cat([c0, pc]), torch.cat([v0, v1])
        else:
            r_all, c_all, v_all = r0, c0, v0
        best, arg = _row_argmin(r_all, c_all, v_all, b)
        dist[i: i + b], index[i: i + b] = (best / dim).cpu(), arg.cpu()
        bar.update(b)
    bar.close()
    return NearestOtherClass(dist, index, time.perf_counter() - t0, "pruned", exact_pairs, bound_pairs,
                             4 * rows * n_ref, rows)


# --------------------------------------------------------------------------- the bound

def _check_k(k: float) -> float:
    try:
        k = float(k)
    except (TypeError, ValueError):
        raise AdvlabError(f"k must be a number > 0, got {k!r}") from None
    if not (k > 0) or math.isinf(k):
        raise AdvlabError(f"k must be a finite number > 0, got {k}")
    return k


def sigma_bound(distance: torch.Tensor, k: float) -> torch.Tensor:
    """sigma_i = d_ij / 2k (eq. 3, taken with equality as the paper does in its tables): the bound of
    each image from its ``distance`` d_ij to the nearest other-class image (mean absolute pixel
    difference, [0, 1] scale; :func:`nearest_other_class`), same shape. Raises ``AdvlabError`` for
    k <= 0."""
    return distance / (2.0 * _check_k(k))


def bound_statistics(distance: torch.Tensor, ks: Sequence[float] = PAPER_KS) -> List[Dict[str, float]]:
    """Table II rows: per k the minimum (best), mean (average) and maximum (worst) sigma over the
    set, with the median and standard deviation beside them.

    ``distance`` (N,): each image's d_ij (:func:`nearest_other_class`); ``ks``: the k values of
    sigma = d / 2k. Returns one dict per k: ``k``, ``min``, ``mean``, ``max``, ``median``, ``std``."""
    if not isinstance(distance, torch.Tensor) or distance.dim() != 1 or distance.numel() == 0:
        raise AdvlabError("distance must be a non-empty 1-D tensor of d_ij")
    d = distance.double()
    out = []
    for k in ks:
        s = sigma_bound(d, k)
        out.append({"k": float(k), "min": float(s.min()), "mean": float(s.mean()), "max": float(s.max()),
                    "median": float(s.median()), "std": float(s.std()) if s.numel() > 1 else 0.0})
    return out


@dataclass
class VisualBound:
    """d_ij of every image of a set and the bound derived from it (:func:`visual_bound`)."""

    distance: torch.Tensor
    index: torch.Tensor
    labels: torch.Tensor
    search: NearestOtherClass
    ks: Tuple[float, ...] = PAPER_KS

    def sigma(self, k: float) -> torch.Tensor:
        """Per-image bound sigma_i at ``k``."""
        return sigma_bound(self.distance, k)

    def sigma_mean(self, k: float) -> float:
        """The database's mean bound at ``k`` (the paper's sigma_mean, used by the score)."""
        return float(self.sigma(k).double().mean())

    def statistics(self, ks: Optional[Sequence[float]] = None) -> List[Dict[str, float]]:
        return bound_statistics(self.distance, self.ks if ks is None else ks)

    def to_dict(self) -> Dict[str, Any]:
        return {"n": int(self.distance.numel()), "method": self.search.method, "seconds": self.search.seconds,
                "exact_pairs": self.search.exact_pairs, "bound_pairs": self.search.bound_pairs,
                "tile_bytes": self.search.tile_bytes, "statistics": self.statistics()}


def visual_bound(data, y: Optional[torch.Tensor] = None, ks: Sequence[float] = PAPER_KS, **search) -> VisualBound:
    """The VIB of every image of ``data`` (a dataset with ``.images``/``.labels``, or images with
    ``y``): nearest other-class neighbour within the set (``search``: options of
    :func:`nearest_other_class`), then sigma_i = d_ij / 2k for each k of ``ks``."""
    if y is None:
        if not (hasattr(data, "images") and hasattr(data, "labels")):
            raise AdvlabError("data must be a dataset with .images/.labels, or pass the labels as y")
        x, y = data.images, data.labels
    else:
        x = data
    ks = tuple(_check_k(k) for k in ks)
    if not ks:
        raise AdvlabError("ks must name at least one k")
    res = nearest_other_class(x, y, **search)
    return VisualBound(res.distance, res.index, y.cpu(), res, ks)


# --------------------------------------------------------------------------- the score

def perturbation_magnitude(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute pixel difference between ``x_adv`` and ``x`` (the bound's distance),
    a float32 CPU tensor of shape (N,) in pixel units of the [0, 1] scale. Raises ``AdvlabError`` for
    non-tensors, different shapes, or a non-batch ``x``."""
    if not isinstance(x, torch.Tensor) or not isinstance(x_adv, torch.Tensor):
        raise AdvlabError("x and x_adv must be tensors")
    if x.shape != x_adv.shape:
        raise AdvlabError(f"x_adv must have the shape of x {tuple(x.shape)}, got {tuple(x_adv.shape)}")
    if x.dim() < 2:
        raise AdvlabError(f"x must be a batch (N, ...), got shape {tuple(x.shape)}")
    return (x_adv.detach().float().cpu() - x.detach().float().cpu()).abs().flatten(1).mean(1)


def effectiveness_score(result, x: torch.Tensor, sigma) -> Dict[str, Any]:
    """The paper's attack-effectiveness score (0: ineffective, 100: highly effective) of an
    :class:`advlab.attacks.AttackResult` (run with ``keep_adversarials=True``) on clean images ``x``.

    ``sigma``: the bound, a number (the paper: the database's mean sigma at k = 2) or a per-image
    tensor (N,). An image counts as *effectively attacked* when the attack succeeded on it (the
    one success rule, a rejection is never a success) and the perturbation's mean absolute pixel
    difference is at most its bound. Success is untargeted ("a class other than the true one")
    even for a targeted attack, as the paper defines effectiveness. Returns ``score`` (% of the attacked images the model got
    right when clean), ``within_bound_of_successes`` (% of the successes inside the bound),
    ``asr``, the counts and the magnitude statistics of the successes.

    ``result``: the :class:`~advlab.attacks.AttackResult` of the attack on ``x``.
    """
    for attr in ("adversarials", "labels", "success"):
        if not hasattr(result, attr):
            raise AdvlabError(f"result must be an AttackResult (it has no .{attr})")
    if result.adversarials is None:
        raise AdvlabError("effectiveness_score needs the adversarials: run the attack with keep_adversarials=True")
    n = int(result.labels.shape[0])
    if not isinstance(x, torch.Tensor) or x.shape[0] != n:
        raise AdvlabError(f"x must hold the {n} clean images the attack ran on, got "
                          f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    mag = perturbation_magnitude(x, result.adversarials)
    if isinstance(sigma, torch.Tensor):
        s = sigma.detach().double().cpu().flatten()
        if s.numel() == 1:
            s = s.expand(n)
        elif s.numel() != n:
            raise AdvlabError(f"sigma must be a number or hold one bound per image ({n}), got {s.numel()} values")
    else:
        try:
            s = torch.full((n,), float(sigma), dtype=torch.float64)
        except (TypeError, ValueError):
            raise AdvlabError(f"sigma must be a number or a tensor, got {type(sigma).__name__}") from None
    if bool(torch.isnan(s).any()) or bool((s < 0).any()):
        raise AdvlabError("sigma must be >= 0")
    counted = getattr(result, "counted", None)
    if counted is None:
        counted = torch.ones(n, dtype=torch.bool)
    counted = counted.cpu().bool()
    # the paper's success is "a class other than the true one" (also for a targeted attack), by
    # the one success rule (a rejection is never a success)
    if getattr(result, "adv_pred", None) is not None:
        success = is_success(result.adv_pred.cpu(), result.labels.cpu())
    else:
        success = result.success.cpu().bool()
    success = success & counted
    inside = mag.double() <= s
    effective = success & inside
    nc, ns, ne = int(counted.sum()), int(success.sum()), int(effective.sum())
    ms = mag[success]
    return {"score": 100.0 * ne / nc if nc else float("nan"),
            "within_bound_of_successes": 100.0 * ne / ns if ns else float("nan"),
            "asr": 100.0 * ns / nc if nc else float("nan"),
            "n": n, "n_counted": nc, "n_success": ns, "n_effective": ne,
            "sigma": float(s.mean()) if n else float("nan"),
            "mean_magnitude": float(ms.double().mean()) if ns else float("nan"),
            "median_magnitude": float(ms.median()) if ns else float("nan"),
            "effective": effective}
