"""Complex-wavelet structural similarity (CW-SSIM, Wang and Simoncelli 2005) on a complex
steerable pyramid built in the Fourier domain (Portilla-Simoncelli design), in torch:
batched, differentiable, for 1- and 3-channel images from 8x8 to 64x64 and beyond.

>>> from advlab.metrics import cw_ssim
>>> s = cw_ssim(x, y)                  # (N,) in [0, 1]; 1 for identical images

For every oriented subband and every position, with ``c1`` and ``c2`` the complex coefficients
of the two images in a ``window`` x ``window`` neighbourhood (local means)::

    S = (2 |mean(c1 * conj(c2))| + K) / (mean |c1|^2 + mean |c2|^2 + K)

The map is averaged over the valid positions of each band, then over bands and channels. ``S``
depends on the consistency of the phase difference across the window, not on the phase itself,
so a small translation costs far less than it does for SSIM. ``K`` (per-coefficient energy,
pixels in [0, 1]) keeps flat regions at 1 instead of 0/0.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch

from .._util import AdvlabError, check_batch, check_positive_int

__all__ = ["cw_ssim", "CWSSIM", "CWSSIMReference", "SteerablePyramid", "max_pyramid_scales", "select_reference"]


def max_pyramid_scales(height: int, width: int) -> int:
    """The deepest pyramid that fits an image: ``floor(log2(min(H, W))) - 2`` (2 for 28x28,
    1 for 8x8, 4 for 64x64), the same bound as the Portilla-Simoncelli code."""
    return int(math.floor(math.log2(min(height, width)))) - 2


def _crop_bounds(h: int, w: int) -> Tuple[int, int, int, int]:
    """Rows/cols of a centred (fftshifted) spectrum kept when halving the resolution."""
    out = []
    for d in (h, w):
        ctr = math.ceil((d + 0.5) / 2)
        lod = math.ceil((d - 0.5) / 2)
        loctr = math.ceil((lod + 0.5) / 2)
        start = ctr - loctr
        out.append((start, start + lod))
    return out[0][0], out[0][1], out[1][0], out[1][1]


def _hi(log_rad: torch.Tensor, shift: float) -> torch.Tensor:
    """Radial high-pass: raised cosine in log2-frequency, 0 below 2^-(shift+1), 1 above 2^-shift
    (frequency 1 = Nyquist)."""
    return torch.cos(0.5 * math.pi * (log_rad + shift).clamp(-1.0, 0.0))


def _lo(log_rad: torch.Tensor, shift: float) -> torch.Tensor:
    """The complementary low-pass: ``lo^2 + hi^2 = 1``."""
    return torch.sin(0.5 * math.pi * (log_rad + shift).clamp(-1.0, 0.0)).abs()


@lru_cache(maxsize=32)
def _filters(h: int, w: int, scales: int, orientations: int):
    """Fourier-domain filters (float64, CPU) of a complex steerable pyramid for an h x w image.

    Built on the centred (fftshift) grid as in the Portilla-Simoncelli design, then folded into
    one filter per level in the unshifted FFT layout: level i of the pyramid is
    ``ifft2(fft2(x)[rows_i][:, cols_i] * G_i)`` with ``G_i`` of shape (O, h_i, w_i) holding the
    initial low-pass, the low-passes of the coarser cuts, the radial band and the angular masks.
    Returns a list of (G_i complex128, rows_i, cols_i)."""
    order = orientations - 1
    # frequency grids, centred (fftshift layout); 1 = Nyquist
    fx = torch.linspace(-1.0, 1.0, w + 1, dtype=torch.float64)[:-1]
    fy = torch.linspace(-1.0, 1.0, h + 1, dtype=torch.float64)[:-1]
    yy, xx = torch.meshgrid(fy, fx, indexing="ij")
    angle = torch.atan2(yy, xx)
    rad = torch.sqrt(xx ** 2 + yy ** 2)
    cy, cx = math.ceil((h + 0.5) / 2) - 1, math.ceil((w + 0.5) / 2) - 1
    rad[cy, cx] = rad[cy, cx - 1]  # no log(0) at DC: take the neighbour's radius
    log_rad = torch.log2(rad)
    low = _lo(log_rad, 0.0)  # running product of the low-passes, on the current (cropped) grid
    # angular profile: 2 sqrt(const) cos(t)^order on one half plane (analytic -> complex bands)
    const = (2 ** (2 * order)) * (math.factorial(order) ** 2) / (orientations * math.factorial(2 * order))
    phase = (-1j) ** order
    off_r = off_c = 0  # where the current grid starts inside the full centred grid
    levels = []
    for i in range(scales):
        himask = _hi(log_rad, i + 1.0)
        bands = []
        for b in range(orientations):
            t = angle - math.pi * b / orientations
            t = torch.remainder(t + math.pi, 2 * math.pi) - math.pi
            amask = 2.0 * math.sqrt(const) * torch.cos(t) ** order * (t.abs() < math.pi / 2)
            bands.append(amask * himask * low)
        hi_, wi_ = log_rad.shape
        g = torch.fft.ifftshift(torch.stack(bands), dim=(-2, -1)).to(torch.complex128) * phase
        # unshifted index u of this level's grid -> unshifted index of the full-size spectrum
        rows = ((torch.arange(hi_) + hi_ // 2) % hi_ + off_r - h // 2) % h
        cols = ((torch.arange(wi_) + wi_ // 2) % wi_ + off_c - w // 2) % w
        levels.append((g, rows, cols))
        r0, r1, c0, c1 = _crop_bounds(hi_, wi_)
        off_r, off_c = off_r + r0, off_c + c0
        log_rad = log_rad[r0:r1, c0:c1]
        angle = angle[r0:r1, c0:c1]
        low = low[r0:r1, c0:c1] * _lo(log_rad, i + 1.0)
    return levels


class SteerablePyramid:
    """A complex steerable pyramid in the Fourier domain (circular boundaries).

    ``pyr(x)`` maps real images (..., H, W) to a list of ``scales`` complex tensors
    (..., orientations, H_i, W_i), finest first (H_0 = H, then halved, rounding up); the
    coefficients equal those of pyrtools' ``SteerablePyramidFreq(order=orientations-1,
    is_complex=True)``. Filters are computed once per (H, W, scales, orientations) and cached;
    the transform is differentiable. ``scales=None`` takes the deepest pyramid that fits
    (:func:`max_pyramid_scales`).
    """

    def __init__(self, scales: Optional[int] = None, orientations: int = 4):
        if isinstance(orientations, bool) or int(orientations) != orientations or not 2 <= int(orientations) <= 16:
            raise AdvlabError(f"orientations must be an integer in [2, 16], got {orientations}")
        if scales is not None and (isinstance(scales, bool) or int(scales) != scales or int(scales) < 1):
            raise AdvlabError(f"scales must be an integer >= 1 or None (deepest that fits), got {scales}")
        self.scales = None if scales is None else int(scales)
        self.orientations = int(orientations)
        self._dev_cache = {}

    def scales_for(self, h: int, w: int) -> int:
        """Number of pyramid scales used on H x W images: ``scales`` if set, else the most that fit
        (floor(log2(min(H, W))) - 2). Raises ``AdvlabError`` when the images are smaller than 8 x 8 or
        ``scales`` does not fit them."""
        top = max_pyramid_scales(h, w)
        if top < 1:
            raise AdvlabError(f"images of size {h}x{w} are too small for a steerable pyramid (need >= 8x8)")
        if self.scales is None:
            return top
        if self.scales > top:
            raise AdvlabError(f"scales={self.scales} does not fit {h}x{w} images: at most {top} "
                              f"(floor(log2(min(H, W))) - 2)")
        return self.scales

    def _filters_on(self, h: int, w: int, device, dtype):
        key = (h, w, str(device), dtype)
        f = self._dev_cache.get(key)
        if f is None:
            cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
            f = [(g.to(device=device, dtype=cdtype), rows.to(device), cols.to(device))
                 for g, rows, cols in _filters(h, w, self.scales_for(h, w), self.orientations)]
            self._dev_cache[key] = f
        return f

    def __call__(self, x: torch.Tensor) -> List[torch.Tensor]:
        h, w = x.shape[-2:]
        levels = self._filters_on(h, w, x.device, x.dtype)
        spec = torch.fft.fft2(x)
        out = []
        for i, (g, rows, cols) in enumerate(levels):
            s = spec if i == 0 else spec.index_select(-2, rows).index_select(-1, cols)
            out.append(torch.fft.ifft2(s.unsqueeze(-3) * g))
        return out


_BOX_CACHE: dict = {}


def _box_matrix(n: int, win: int, device, dtype) -> torch.Tensor:
    """(n, n - win + 1) matrix whose columns average ``win`` consecutive entries."""
    key = (n, win, str(device), dtype)
    m = _BOX_CACHE.get(key)
    if m is None:
        m = _band_ones(n, win, device, dtype) / win
        _BOX_CACHE[key] = m
    return m


def _box_mean(t: torch.Tensor, win: int) -> torch.Tensor:
    """Mean over every valid ``win`` x ``win`` window of the last two dims, as two right
    matrix products (one flat matmul each). The result is transposed: (..., W', H')."""
    h, w = t.shape[-2:]
    bw = _box_matrix(w, win, t.device, t.dtype)
    bh = bw if w == h else _box_matrix(h, win, t.device, t.dtype)
    return (t @ bw).transpose(-1, -2) @ bh


class CWSSIM:
    """CW-SSIM as a reusable callable. ``metric(x, y)`` scores two batches; for an optimisation
    against a fixed clean batch, ``ref = metric.reference(x)`` once and ``metric.score(ref, y)``
    per step (the clean pyramid is transformed only once).

    Parameters: ``scales`` (None: deepest that fits, 2 for 28x28), ``orientations`` (4),
    ``window`` (7; shrinks to the band size for small bands), ``K`` (1e-4, per-coefficient
    energy for pixels in [0, 1]).
    """

    def __init__(self, scales: Optional[int] = None, orientations: int = 4, window: int = 7, K: float = 1e-4):
        self.pyramid_ = SteerablePyramid(scales, orientations)
        check_positive_int(window, "window")
        try:
            good = not isinstance(K, (bool, str)) and 0.0 < float(K) < math.inf
        except (TypeError, ValueError):
            good = False
        if not good:
            raise AdvlabError(f"K must be > 0 and finite (it keeps flat regions at 1 instead of 0/0), got {K!r}")
        self.window = int(window)
        self.K = float(K)
        self._plans: dict = {}

    def pyramid(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Subbands of an (N, C, H, W) batch: list of (N, C, O, H_i, W_i) complex tensors."""
        return self.pyramid_(x)

    def reference(self, x: torch.Tensor) -> "CWSSIMReference":
        """Precompute what :meth:`score` needs of a fixed image batch ``x`` (N, C, H, W), pixels in
        [0, 1]: its pyramid and local mean energies, once (no gradient kept). An attack against a
        fixed clean batch calls this once per batch and :meth:`score` once per step.

        Returns a :class:`CWSSIMReference` (rows selectable with :func:`select_reference`).
        Raises :class:`~advlab.AdvlabError` where ``x`` is not a floating (N, C, H, W) tensor or
        is smaller than 8x8."""
        check_batch(x, "x")
        plan = self._plan(x)
        with torch.no_grad():
            levels = []
            for lv, c in zip(plan.levels, self.pyramid(x.detach())):
                re, im = c.real.contiguous(), c.imag.contiguous()
                e1 = _box_sums(re * re + im * im, lv).mul_(lv.scale)
                levels.append((re, im, e1.add_(self.K)))
            return CWSSIMReference(tuple(x.shape), levels)

    def score(self, ref: "CWSSIMReference", y: torch.Tensor) -> torch.Tensor:
        """Per-sample CW-SSIM (N,) of ``y`` against a :meth:`reference` of the same shape;
        differentiable in ``y`` through a hand-written backward (no autograd graph through the
        pyramid, no host-device synchronisation).

        ``ref``: from :meth:`reference` (rows may be picked with :func:`select_reference`);
        ``y``: (N, C, H, W) floating tensor of ``ref``'s shape, dtype and device, pixels in [0, 1].
        Equals ``metric(x, y)`` for ``ref = metric.reference(x)`` up to float rounding (the
        window sums are added in another order). Raises :class:`~advlab.AdvlabError` where
        ``ref`` is not a reference or the shapes differ."""
        if not isinstance(ref, CWSSIMReference):
            raise AdvlabError(f"ref must come from CWSSIM.reference(x), got {type(ref).__name__}")
        check_batch(y, "y")
        if tuple(y.shape) != ref.shape:
            raise AdvlabError(f"y must have the reference's shape {ref.shape}, got {tuple(y.shape)}")
        return _Score.apply(y, self._plan(y), ref.levels, self.K)

    def _plan(self, x: torch.Tensor) -> "_Plan":
        """Filters, crops and window constants for x's size, device and dtype (built once, cached)."""
        h, w = x.shape[-2:]
        key = (h, w, str(x.device), x.dtype)
        plan = self._plans.get(key)
        if plan is None:
            levels = self.pyramid_._filters_on(h, w, x.device, x.dtype)
            plan = _Plan(levels, h, w, self.window, x.device, x.dtype)
            self._plans[key] = plan
        return plan

    def compare(self, px: Sequence[torch.Tensor], py: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-sample CW-SSIM (N,) from two pyramids of :meth:`pyramid` (differentiable in both)."""
        scores = []
        for c1, c2 in zip(px, py):
            win = min(self.window, *c1.shape[-2:])
            corr = _box_mean(c2 * c1.conj(), win)
            energy = _box_mean(c1.real ** 2 + c1.imag ** 2 + c2.real ** 2 + c2.imag ** 2, win)
            mag = torch.sqrt(corr.real ** 2 + corr.imag ** 2 + 1e-30)
            smap = (2.0 * mag + self.K) / (energy + self.K)
            scores.append(smap.mean(dim=(-2, -1)).flatten(1))  # (N, C * O)
        return torch.cat(scores, 1).mean(1)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y)
        return self.compare(self.pyramid(x), self.pyramid(y))

    def __repr__(self) -> str:
        return (f"CWSSIM(scales={self.pyramid_.scales}, orientations={self.pyramid_.orientations}, "
                f"window={self.window}, K={self.K})")


def select_reference(ref: "CWSSIMReference", index: torch.Tensor) -> "CWSSIMReference":
    """The rows ``index`` (1-D integer tensor on ref's device) of a :meth:`CWSSIM.reference`, for
    attacks that drop finished samples. Raises :class:`~advlab.AdvlabError` for anything but a
    reference."""
    if not isinstance(ref, CWSSIMReference):
        raise AdvlabError(f"ref must come from CWSSIM.reference(x), got {type(ref).__name__}")
    return ref.index_select(index)


class CWSSIMReference:
    """The pyramid of a fixed batch as :meth:`CWSSIM.score` uses it, per level: the real and
    imaginary parts of the coefficients ``c1`` (N, C, O, h, w) and the local mean energy plus
    ``K`` (N, C, O, h', w'). Built by :meth:`CWSSIM.reference`; ``len(ref)`` is N;
    :meth:`index_select` (or :func:`select_reference`) picks rows."""

    __slots__ = ("shape", "levels")

    def __init__(self, shape: Tuple[int, ...], levels: List[tuple]):
        self.shape = tuple(shape)
        self.levels = levels

    def __len__(self) -> int:
        return self.shape[0]

    def index_select(self, index: torch.Tensor) -> "CWSSIMReference":
        """A reference of the rows ``index`` (1-D integer tensor) of this one."""
        levels = [tuple(t.index_select(0, index) for t in lv) for lv in self.levels]
        return CWSSIMReference((int(index.shape[0]),) + self.shape[1:], levels)


def _box_sums(t: torch.Tensor, lv: "_Level", adjoint: bool = False) -> torch.Tensor:
    """Sums over every valid window of images (..., h, w) -> (..., h', w') with ``lv``'s 0/1
    band matrices: ``bhT @ t @ bw`` as one flat matrix product over all rows and one batched one,
    or for small images (``lv.kron``) one product with their Kronecker product (fewer, larger
    products win there). ``adjoint``: the transpose, (..., h', w') -> (..., h, w), which puts
    each window's value back on its pixels."""
    lead = t.shape[:-2]
    h, w = (lv.hp, lv.wp) if adjoint else (lv.h, lv.w)
    ho, wo = (lv.h, lv.w) if adjoint else (lv.hp, lv.wp)
    if lv.kron is not None:
        return t.reshape(-1, h * w).mm(lv.kronT if adjoint else lv.kron).view(*lead, ho, wo)
    u = t.reshape(-1, w).mm(lv.bwT if adjoint else lv.bw).view(-1, h, wo)
    return torch.matmul(lv.bh if adjoint else lv.bhT, u).view(*lead, ho, wo)


def _band_ones(n: int, win: int, device, dtype) -> torch.Tensor:
    """(n, n - win + 1) matrix of 0/1 whose column j picks rows j..j + win - 1."""
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n - win + 1).view(1, -1)
    return ((i >= j) & (i < j + win)).to(dtype=dtype, device=device)


def _col_major(m: torch.Tensor) -> torch.Tensor:
    """``m`` with the same values, stored column-major (the transpose of a contiguous tensor)."""
    return m.t().contiguous().t()


class _Level:
    """Constants of one pyramid level for :meth:`CWSSIM.score`: the band filters ``g`` (O, h, w)
    and their conjugates ``gc``; ``idx``, the flat crop of this level's frequencies from the
    image's spectrum (None at the finest level); the window (``win``, its ``scale`` 1 / win^2 and
    the ``valid`` positions); and the 0/1 band matrices of the window sums (:func:`_box_sums`)."""

    def __init__(self, g, rows, cols, h_full, w_full, window, device, dtype):
        o, h, w = g.shape
        self.o, self.h, self.w = o, h, w
        self.win = win = min(window, h, w)
        self.hp, self.wp = h - win + 1, w - win + 1
        self.valid = self.hp * self.wp
        self.scale = 1.0 / (win * win)
        self.g, self.gc = g, g.conj().resolve_conj()
        self.idx = None if (h, w) == (h_full, w_full) else (rows.view(-1, 1) * w_full + cols.view(1, -1)).flatten()
        # 0/1 band matrices: window sums (the 1 / win^2 is applied to the sums). Stored column-major
        # (the transpose of a contiguous matrix): MKL's skinny products that take them are up to
        # 1.3x faster so (the values are the same)
        bw, bh = _band_ones(w, win, device, dtype), _band_ones(h, win, device, dtype)
        self.bw, self.bh, self.bwT, self.bhT = _col_major(bw), _col_major(bh), _col_major(bw.t()), _col_major(bh.t())
        kron = torch.kron(bh, bw) if h * w <= 256 else None  # (h w, h' w')
        self.kron = None if kron is None else _col_major(kron)
        self.kronT = None if kron is None else _col_major(kron.t())


class _Plan:
    """The per-size constants of :meth:`CWSSIM.score` (see :class:`_Level`)."""

    def __init__(self, levels, h, w, window, device, dtype):
        self.levels = [_Level(g, rows, cols, h, w, window, device, dtype) for g, rows, cols in levels]
        self.h, self.w = h, w


def _add_level_spectrum(gspec: Optional[torch.Tensor], gs: torch.Tensor, idx: Optional[torch.Tensor],
                        shape: Tuple[int, int, int, int]) -> torch.Tensor:
    """Add one level's gradient spectrum ``gs`` into the image's (``shape``, allocated on first
    use): directly at the finest level (``idx`` None), else scattered through the level's flat crop
    ``idx`` (the adjoint of the crop the forward took)."""
    if idx is None:
        return gs if gspec is None else gspec.add_(gs)
    if gspec is None:
        gspec = gs.new_zeros(shape)
    gspec.view(*shape[:2], -1).index_add_(-1, idx, gs.flatten(-2))
    return gspec


class _Score(torch.autograd.Function):
    """CW-SSIM of ``y`` against a fixed reference, with a hand-written backward.

    Forward, per level: the complex band ``c = ifft2(crop(fft2(y)) * g)``, read as its real and
    imaginary planes ``re``, ``im`` (views, no copy); window sums of ``re ar + im ai``,
    ``im ar - re ai`` (the product with the reference's conjugate, ``c1 = ar + i ai``) and
    ``re^2 + im^2``; then ``s = (2 |corr| + K) / (e1 + e2 + K)``, averaged. Backward (weights
    folded in)::

        g_corr = 2 corr / (|corr| D)          g_e2 = -s / D
        (GR, GI, GE) = window-sum adjoint of (g_corr.re, g_corr.im, g_e2)
        g_re = GR ar - GI ai + 2 GE re         g_im = GR ai + GI ar + 2 GE im
        g_y = Re(ifft2(scatter(sum_o conj(g_o) fft2(g_re + i g_im))))

    Exact for every image size (the complex transforms need no symmetry of the crop).
    """

    @staticmethod
    def forward(ctx, y, plan, levels, K):
        n, ch = y.shape[0], y.shape[1]
        spec = torch.fft.fft2(y)                                               # (N, C, H, W)
        flat = spec.flatten(-2)
        total = None
        saved = []
        nl = len(plan.levels)
        for lv, (ar, ai, e1k) in zip(plan.levels, levels):
            h, w, win = lv.h, lv.w, lv.win
            s = spec if lv.idx is None else flat.index_select(-1, lv.idx).view(n, ch, h, w)
            c = torch.view_as_real(torch.fft.ifft2(s.unsqueeze(2) * lv.g))     # (N, C, O, h, w, 2)
            re, im = c[..., 0], c[..., 1]
            buf = torch.empty(n, ch, 3, lv.o, h, w, dtype=y.dtype, device=y.device)
            torch.mul(re, ar, out=buf[:, :, 0]).addcmul_(im, ai)
            torch.mul(im, ar, out=buf[:, :, 1]).addcmul_(re, ai, value=-1.0)
            torch.mul(re, re, out=buf[:, :, 2]).addcmul_(im, im)
            box = _box_sums(buf, lv)                                # (N, C, 3, O, h', w')
            cre, cim = box[:, :, 0], box[:, :, 1]
            mag = torch.mul(cre, cre).addcmul_(cim, cim).add_(1e-30 * win ** 4).sqrt_()  # |window sum|
            den = torch.add(e1k, box[:, :, 2], alpha=lv.scale)                 # e1 + e2 + K
            smap = torch.mul(mag, 2.0 * lv.scale).add_(K).div_(den)
            part = smap.view(n, -1).sum(1).mul_(1.0 / (nl * ch * lv.o * lv.valid))
            total = part if total is None else total.add_(part)
            saved.append((re, im, cre, cim, mag, den, smap))
        if y.requires_grad:
            ctx.plan, ctx.levels, ctx.saved, ctx.shape = plan, levels, saved, y.shape
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        plan, (n, ch, hf, wf) = ctx.plan, ctx.shape
        nl = len(plan.levels)
        gspec = None
        for lv, (ar, ai, _), (re, im, cre, cim, mag, den, smap) in zip(plan.levels, ctx.levels, ctx.saved):
            gnum = (grad * (1.0 / (nl * ch * lv.o * lv.valid))).view(n, 1, 1, 1, 1) / den  # d/d(2|corr| + K)
            # d/d(window sums of re ar + im ai, im ar - re ai, re^2 + im^2), then back onto the pixels
            inner = torch.empty(n, ch, 3, lv.o, lv.hp, lv.wp, dtype=grad.dtype, device=grad.device)
            fac = torch.div(gnum, mag).mul_(2.0 * lv.scale)
            torch.mul(fac, cre, out=inner[:, :, 0])
            torch.mul(fac, cim, out=inner[:, :, 1])
            torch.mul(gnum, smap, out=inner[:, :, 2]).mul_(-lv.scale)
            gb = _box_sums(inner, lv, adjoint=True)                               # (N, C, 3, O, h, w)
            gr, gi, ge = gb[:, :, 0], gb[:, :, 1], gb[:, :, 2]
            g = torch.empty(n, ch, lv.o, lv.h, lv.w, 2, dtype=grad.dtype, device=grad.device)  # (re, im) pairs
            torch.mul(gr, ar, out=g[..., 0]).addcmul_(gi, ai, value=-1.0).addcmul_(ge, re, value=2.0)
            torch.mul(gr, ai, out=g[..., 1]).addcmul_(gi, ar).addcmul_(ge, im, value=2.0)
            gs = (torch.fft.fft2(torch.view_as_complex(g), norm="forward") * lv.gc).sum(2)  # (N, C, h, w)
            gspec = _add_level_spectrum(gspec, gs, lv.idx, (n, ch, hf, wf))
        return torch.fft.ifft2(gspec, norm="forward").real.contiguous(), None, None, None


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    from .similarity import _check_pair as check

    check(x, y)


_DEFAULT: dict = {}


def cw_ssim(x: torch.Tensor, y: torch.Tensor, scales: Optional[int] = None, orientations: int = 4,
            window: int = 7, K: float = 1e-4) -> torch.Tensor:
    """Per-sample CW-SSIM (N,) of two (N, C, H, W) batches with pixels in [0, 1].

    Differentiable in both arguments. ``scales=None`` uses the deepest pyramid that fits the
    image (2 for 28x28, 1 for 8x8); channels are scored separately and averaged.

    ``x``, ``y``: the two batches; ``scales``, ``orientations``: the steerable pyramid's; ``window``:
    the side of the local window of the complex correlations (local means; it shrinks to the band
    size for small bands); ``K``: the small stabilising constant of the index. Values in [0, 1],
    1 for identical images. Raises ``AdvlabError`` on other shapes, too small images or non-finite
    values."""
    try:
        key = (scales, orientations, window, float(K))
        metric = _DEFAULT.get(key)
    except (TypeError, ValueError):  # unhashable or not a number: CWSSIM names the bad one
        key, metric = None, None
    if metric is None:
        metric = CWSSIM(scales, orientations, window, K)
        if key is not None:
            _DEFAULT[key] = metric
    return metric(x, y)
