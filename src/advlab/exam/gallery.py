"""The exam's gallery: defenses from the literature in their known-broken form, each built in
seconds from a trained base classifier, each with the mechanism that fools a naive evaluation
and the adaptive attack that sees through it (its *true robustness* attack, :mod:`.truth`).

Families (Athalye, Carlini & Wagner 2018, section 3; Tramèr, Carlini, Brendel & Madry 2020):

- shattered gradients: input quantisation (bit-depth reduction; Xu et al. 2018), a JPEG-like
  block-DCT quantisation (Guo et al. 2018, Das et al. 2017), thermometer encoding (Buckman et
  al. 2018);
- stochastic gradients: random resize and pad (Xie et al. 2018), stochastic activation pruning
  (Dhillon et al. 2018), Gaussian noise at test time;
- vanishing gradients: a saturated log-softmax (scores ``log_softmax(T z)``), defensive
  distillation's temperature left in the deployed logits (Papernot et al. 2016: ``T z``);
- detectors: a confidence-threshold rejector, a feature-squeezing detector whose score passes
  through a non-differentiable bit-depth reduction (Xu et al. 2018), a learned detector in front
  of the classifier (Metzen et al. 2017 style; a naive attacker attacks the classifier only);
- obfuscation by a second network: a denoising autoencoder in front of the model, trained a few
  epochs, whose output layer is sharpened into a near-step so no gradient passes it.

Every entry is a :class:`~advlab.defenses.Defense` (``forward`` scores, ``predict`` with
``advlab.REJECT`` where it abstains, ``detect`` for the detectors, ``randomized``), so
``evaluate`` and every attack take it as they take a user's defense; nothing in it tells the
evaluator which mechanism it uses.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import REJECT
from .._util import AdvlabError
from ..attacks import PGD
from ..data.tensors import TensorImageDataset
from ..defenses.base import Defense
from ..models import build_model
from ..train import fit

__all__ = ["GalleryEntry", "GALLERY", "CONTROLS", "Quantize", "JpegLike", "Thermometer", "build_entry"]


# ---------------------------------------------------------------------------------------------- layers
class Quantize(nn.Module):
    """Bit-depth reduction to ``levels`` values in [0, 1]: ``round(x (L - 1)) / (L - 1)``."""

    def __init__(self, levels: int = 4):
        super().__init__()
        self.levels = int(levels)

    def forward(self, x):
        return torch.round(x.clamp(0, 1) * (self.levels - 1)) / (self.levels - 1)


def _dct_matrix(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.float()


class JpegLike(nn.Module):
    """JPEG's lossy core on each channel: 8x8 block DCT, coefficients rounded to multiples of a
    step that grows with frequency (``step * (1 + u + v)``), inverse DCT, clamped to [0, 1]."""

    def __init__(self, step: float = 0.25, block: int = 8):
        super().__init__()
        self.block = int(block)
        self.register_buffer("dct", _dct_matrix(self.block))
        u = torch.arange(self.block, dtype=torch.float32)
        self.register_buffer("q", step * (1.0 + u[:, None] + u[None, :]))

    def forward(self, x):
        n, c, h, w = x.shape
        b = self.block
        ph, pw = (-h) % b, (-w) % b
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate")
        H, W = xp.shape[2] // b, xp.shape[3] // b
        blocks = xp.reshape(n, c, H, b, W, b).permute(0, 1, 2, 4, 3, 5)
        d = self.dct.to(x.dtype)
        coef = d @ blocks @ d.t()
        q = self.q.to(x.dtype)
        coef = torch.round(coef / q) * q
        rec = (d.t() @ coef @ d).permute(0, 1, 2, 4, 3, 5).reshape(n, c, H * b, W * b)
        return rec[:, :, :h, :w].clamp(0, 1)


class Thermometer(nn.Module):
    """Thermometer encoding (Buckman et al. 2018): each pixel ``v`` becomes ``levels`` channels,
    channel ``k`` being ``1[v >= k / levels]``."""

    def __init__(self, levels: int = 16):
        super().__init__()
        self.levels = int(levels)

    def forward(self, x):
        t = torch.arange(self.levels, device=x.device, dtype=x.dtype) / self.levels
        out = (x.unsqueeze(2) >= t.view(1, 1, -1, 1, 1)).to(x.dtype)
        return out.flatten(1, 2)

    def soft(self, x, tau: float = 0.02):
        """The smooth approximation of the true-robustness attack (a sigmoid per threshold)."""
        t = torch.arange(self.levels, device=x.device, dtype=x.dtype) / self.levels
        return torch.sigmoid((x.unsqueeze(2) - t.view(1, 1, -1, 1, 1)) / tau).flatten(1, 2)


class SharpSigmoid(nn.Module):
    """``sigmoid(k a)``: a steep output layer whose float32 gradient is exactly zero almost everywhere."""

    def __init__(self, k: float = 1.0):
        super().__init__()
        self.k = float(k)

    def forward(self, a):
        return torch.sigmoid(self.k * a)


# ---------------------------------------------------------------------------------------------- defenses
class _Wrapped(Defense):
    """A base classifier behind a preprocessing module: ``forward = model(pre(x))``."""

    title = "gallery entry"

    def __init__(self, model: nn.Module, pre: Optional[nn.Module] = None):
        super().__init__()
        self.pre = pre if pre is not None else nn.Identity()
        self.model = model

    def forward(self, x):
        return self.model(self.pre(x))


class RandomResizePad(Defense):
    """Xie et al. 2018: each image resized by a random factor in [1, 1 + ``scale``] and placed at
    a random offset of a canvas of the enlarged size, then resized back to the input size."""

    randomized = True

    def __init__(self, model: nn.Module, scale: float = 0.25):
        super().__init__()
        self.model, self.scale = model, float(scale)

    def forward(self, x):
        n = x.shape[0]
        s = 1.0 + self.scale * torch.rand(n, device=x.device, dtype=x.dtype)
        # shrink the image by 1/s inside the canvas and shift it by a random offset within the margin
        shift = (torch.rand(n, 2, device=x.device, dtype=x.dtype) * 2 - 1) * (1 - 1 / s)[:, None]
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = s
        theta[:, :, 2] = -shift * s[:, None]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return self.model(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False))


class StochasticActivationPruning(Defense):
    """Dhillon et al. 2018: at ``layer``'s output, ``draws`` activations are sampled with
    probability proportional to their magnitude (with replacement); the ones never drawn are
    zeroed and the kept ones scaled by the inverse of their probability of being kept."""

    randomized = True

    def __init__(self, model: nn.Module, layer: str, fraction: float = 0.5):
        super().__init__()
        self.model, self.layer, self.fraction = model, layer, float(fraction)
        dict(self.model.named_modules())[layer].register_forward_hook(self._prune)

    def _prune(self, module, inputs, h):
        flat = h.flatten(1)
        p = flat.abs() / flat.abs().sum(1, keepdim=True).clamp_min(1e-12)
        draws = max(1, int(self.fraction * flat.shape[1]))
        keep_p = 1 - (1 - p) ** draws
        kept = torch.rand_like(p) < keep_p
        return (flat * kept / keep_p.clamp_min(1e-12)).view_as(h)

    def forward(self, x):
        return self.model(x)


class GaussianNoise(Defense):
    """Gaussian noise of std ``sigma`` added to the input at test time (clamped to [0, 1])."""

    randomized = True

    def __init__(self, model: nn.Module, sigma: float = 0.2):
        super().__init__()
        self.model, self.sigma = model, float(sigma)

    def forward(self, x):
        return self.model((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


class Scaled(Defense):
    """``T z`` (``log_softmax=False``: distillation's temperature left in the deployed logits) or
    ``log_softmax(T z)``: scores whose cross-entropy gradient underflows to exactly zero."""

    def __init__(self, model: nn.Module, temperature: float = 100.0, log_softmax: bool = False):
        super().__init__()
        self.model, self.temperature, self.log_softmax = model, float(temperature), bool(log_softmax)

    def forward(self, x):
        z = self.temperature * self.model(x)
        return F.log_softmax(z, dim=1) if self.log_softmax else z


class ConfidenceRejector(Defense):
    """Rejects (``advlab.REJECT``) every image whose top softmax probability is below ``threshold``."""

    def __init__(self, model: nn.Module, threshold: float = 0.9):
        super().__init__()
        self.model, self.threshold = model, float(threshold)

    def forward(self, x):
        return self.model(x)

    @torch.no_grad()
    def predict(self, x, batch_size: int = 1024):
        def decide(xb):
            p = F.softmax(self.model(xb), dim=1)
            conf, cls = p.max(1)
            return torch.where(conf < self.threshold, torch.full_like(cls, REJECT), cls)
        return self._batched(decide, x, batch_size)


class _Thresholded(Defense):
    """A classifier plus a detector score; rejects where ``detect(x) > threshold``."""

    threshold: float = 0.0

    def forward(self, x):
        return self.model(x)

    @torch.no_grad()
    def predict(self, x, batch_size: int = 1024):
        def decide(xb):
            cls = self.model(xb).argmax(1)
            return torch.where(self.detect(xb) > self.threshold, torch.full_like(cls, REJECT), cls)
        return self._batched(decide, x, batch_size)

    def calibrate(self, x: torch.Tensor, false_positive_rate: float = 0.05) -> "_Thresholded":
        with torch.no_grad():
            scores = torch.cat([self.detect(x[i: i + 512]) for i in range(0, x.shape[0], 512)])
        self.threshold = float(torch.quantile(scores.double(), 1 - false_positive_rate))
        return self


class SqueezeDetector(_Thresholded):
    """Feature squeezing (Xu et al. 2018): the score is the L1 distance between the softmax of
    the image and that of its bit-depth-reduced copy; the squeezer has no gradient."""

    def __init__(self, model: nn.Module, levels: int = 2):
        super().__init__()
        self.model, self.squeeze = model, Quantize(levels)

    def detect(self, x):
        return (F.softmax(self.model(x), 1) - F.softmax(self.model(self.squeeze(x)), 1)).abs().sum(1)


class LearnedDetector(_Thresholded):
    """A binary detector network (clean vs the base model's PGD adversarials) in front of the
    classifier; ``forward`` is the classifier's logits alone."""

    def __init__(self, model: nn.Module, detector: nn.Module):
        super().__init__()
        self.model, self.detector = model, detector

    def detect(self, x):
        out = self.detector(x)
        return out[:, 1] - out[:, 0]


# ---------------------------------------------------------------------------------------------- entries
@dataclass
class GalleryEntry:
    """One known-broken defense: how to build it, what masks, the flags that name the mechanism
    (any one of them counts), and its true-robustness attack (:mod:`advlab.exam.truth`)."""

    name: str
    family: str
    masks: str
    build: Callable[..., Tuple[Defense, Dict[str, object]]]
    flags: Tuple[str, ...]
    truth: str
    quick: bool = False
    #: parameters of the true-robustness attack
    truth_options: Dict[str, object] = field(default_factory=dict)


def _copy(base: nn.Module) -> nn.Module:
    return copy.deepcopy(base).eval()


def _train(model: nn.Module, data: TensorImageDataset, epochs: int, seed: int) -> nn.Module:
    fit(model, data, epochs=epochs, lr=3e-3, batch_size=64, seed=seed, progress=False, desc="gallery")
    return model.eval()


def _b_quantize(base, data, seed, arch):
    return _Wrapped(_copy(base), Quantize(4)), {"layers": ["pre"]}


def _b_jpeg(base, data, seed, arch):
    return _Wrapped(_copy(base), JpegLike(step=0.25)), {"layers": ["pre"]}


def _b_thermometer(base, data, seed, arch):
    c, h, w = data.in_shape
    therm = Thermometer(16)
    net = build_model(arch, data.num_classes, (16 * c, h, w), seed=seed)
    entry = _Wrapped(net, therm)
    _train(entry, data, epochs=3 if data.images.shape[0] > 5000 else 15, seed=seed)
    return entry, {"layers": ["pre"], "approx": {"pre": therm.soft}}


def _b_resize(base, data, seed, arch):
    return RandomResizePad(_copy(base)), {}


def _b_sap(base, data, seed, arch):
    m = _copy(base)
    relus = [n for n, mod in m.named_modules() if isinstance(mod, nn.ReLU)]
    if not relus:
        raise AdvlabError("stochastic activation pruning needs a ReLU in the base model")
    return StochasticActivationPruning(m, relus[0]), {}


def _b_noise(base, data, seed, arch):
    return GaussianNoise(_copy(base), sigma=0.2), {}


def _b_logsoftmax(base, data, seed, arch):
    return Scaled(_copy(base), temperature=100.0, log_softmax=True), {"logits": "model"}


def _b_distilled(base, data, seed, arch):
    return Scaled(_copy(base), temperature=100.0), {"logits": "model"}


def _b_confidence(base, data, seed, arch):
    return ConfidenceRejector(_copy(base), threshold=0.9), {}


def _b_squeeze(base, data, seed, arch):
    d = SqueezeDetector(_copy(base), levels=2)
    return d.calibrate(data.images[:2000]), {"layers": ["squeeze"]}


def _b_detector(base, data, seed, arch):
    x = data.images[:4000]
    eps = 0.3 if x.shape[-1] >= 28 else 0.2
    adv = PGD(_copy(base), eps=eps, steps=20, seed=seed).perturb(x, data.labels[:4000])
    xs = torch.cat([x, adv])
    ys = torch.cat([torch.zeros(x.shape[0], dtype=torch.long), torch.ones(x.shape[0], dtype=torch.long)])
    det = build_model(arch, 2, data.in_shape, seed=seed + 1)
    _train(det, TensorImageDataset(xs, ys, ["clean", "adversarial"], "detector"),
           epochs=2 if x.shape[0] > 3000 else 10, seed=seed)
    return LearnedDetector(_copy(base), det).calibrate(data.images[4000:6000] if data.images.shape[0] > 6000
                                                       else data.images[:2000]), {}


def _b_denoiser(base, data, seed, arch):
    c = data.in_shape[0]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    den = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, c, 3, padding=1), SharpSigmoid(1.0))
    x = data.images[:6000]
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    for epoch in range(3):
        for i in range(0, x.shape[0], 64):
            opt.zero_grad()
            F.mse_loss(den(noisy[i: i + 64]), x[i: i + 64]).backward()
            opt.step()
    den[-1].k = 1000.0  # deployed sharpened: the output is a step, its gradient exactly zero
    den.eval()
    return _Wrapped(_copy(base), den), {"layers": ["pre"]}


#: the gallery, in the order of the report
GALLERY: Dict[str, GalleryEntry] = {e.name: e for e in [
    GalleryEntry("quantize", "shattered", "bit-depth reduction to 4 levels (round)", _b_quantize,
                 ("zero-gradients",), "bpda", quick=True),
    GalleryEntry("jpeg-like", "shattered", "8x8 block DCT with rounded coefficients", _b_jpeg,
                 ("zero-gradients",), "bpda"),
    GalleryEntry("thermometer", "shattered", "thermometer encoding, 16 levels (model trained on it)", _b_thermometer,
                 ("zero-gradients",), "bpda"),
    GalleryEntry("resize-pad", "stochastic", "random resize and pad at test time", _b_resize,
                 ("randomized",), "eot"),
    GalleryEntry("sap", "stochastic", "stochastic activation pruning of the first hidden layer", _b_sap,
                 ("randomized",), "eot"),
    GalleryEntry("gaussian-noise", "stochastic", "Gaussian noise (std 0.2) added at test time", _b_noise,
                 ("randomized",), "eot", quick=True),
    GalleryEntry("log-softmax-T100", "vanishing", "scores log_softmax(100 z): saturated softmax", _b_logsoftmax,
                 ("log-probability-outputs", "zero-gradients"), "logits", quick=True),
    GalleryEntry("distilled-T100", "vanishing", "logits scaled by a temperature of 100", _b_distilled,
                 ("zero-gradients",), "logits"),
    GalleryEntry("confidence-rejector", "detector", "rejects when the top softmax probability < 0.9",
                 _b_confidence, ("rejects-inputs", "rejections-absorbed"), "decision", quick=True),
    GalleryEntry("feature-squeezing", "detector", "rejects on the L1 gap to a 1-bit squeezed copy (no gradient)",
                 _b_squeeze, ("detector-zero-gradients", "rejects-inputs"), "decision"),
    GalleryEntry("learned-detector", "detector", "a trained adversarial-vs-clean detector in front of the model",
                 _b_detector, ("rejects-inputs", "rejections-absorbed"), "decision"),
    GalleryEntry("sharp-denoiser", "second network", "a denoising autoencoder with a step-like output layer",
                 _b_denoiser, ("zero-gradients",), "bpda"),
]}

#: the sound controls: no masking flag may be raised on them
CONTROLS = ("undefended", "pgd-trained")


def build_entry(name: str, base: nn.Module, data: TensorImageDataset, seed: int = 0,
                arch: str = "lenet5") -> Tuple[Defense, Dict[str, object]]:
    """Build gallery entry ``name`` from the trained ``base`` classifier and its training data
    (``arch``: the zoo architecture of the networks an entry trains of its own). Returns the
    defense and what its true-robustness attack needs to know (its layers without gradient and
    their approximations, where its logits are)."""
    if name not in GALLERY:
        from .._util import unknown_name

        raise unknown_name("gallery entry", name, GALLERY)
    torch.manual_seed(seed)
    defense, info = GALLERY[name].build(base, data, seed, arch)
    return defense.eval(), info
