from __future__ import annotations

import numbers
from collections import OrderedDict
from functools import partial
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import nn

from .._util import AdvlabError, check_positive_int, unknown_name
from ..nn import Normalize


class ZooSequential(nn.Sequential):
    """An ``nn.Sequential`` with the layer names advlab's defenses read."""

    head_name: str = "head"
    hidden_layers: Tuple[str, ...] = ()
    feature_layers: Tuple[str, ...] = ()


def _norm(in_shape, mean, std) -> Normalize:
    c = in_shape[0]
    mean = 0.5 if mean is None else mean
    std = 0.5 if std is None else std
    if isinstance(mean, (int, float)):
        mean = [float(mean)] * c
    if isinstance(std, (int, float)):
        std = [float(std)] * c
    return Normalize(mean, std)


def _flat_dim(layers: Sequence[Tuple[str, nn.Module]], in_shape) -> int:
    with torch.no_grad():
        z = torch.zeros(1, *in_shape)
        for _, m in layers:
            z = m(z)
    return int(z.numel())


def mnist_fc1(num_classes: int, in_shape, mean=None, std=None, widths=(512, 256, 100)) -> nn.Module:
    """MNIST-FC1 of the K-A3 paper: four fully connected layers with ReLU, penultimate width 100."""
    d = int(torch.tensor(in_shape).prod())
    layers = [("normalize", _norm(in_shape, mean, std)), ("flatten", nn.Flatten())]
    hidden = []
    for i, w in enumerate(widths, 1):
        layers += [(f"fc{i}", nn.Linear(d, w)), (f"relu{i}", nn.ReLU())]
        hidden.append(f"relu{i}")
        d = w
    layers.append(("head", nn.Linear(d, num_classes)))
    m = ZooSequential(OrderedDict(layers))
    m.hidden_layers = tuple(hidden)
    return m


def model_e(num_classes: int, in_shape, mean=None, std=None) -> nn.Module:
    """Model E of the I-defender paper (Table 1): FC200-ReLU-FC200-ReLU-FC10."""
    return mnist_fc1(num_classes, in_shape, mean, std, widths=(200, 200))


def lenet5(num_classes: int, in_shape, mean=None, std=None) -> nn.Module:
    """LeNet-5: conv6 5x5 - pool - conv16 5x5 - pool - FC120 - FC84 - FC(num_classes).

    For small inputs (under 16 pixels, e.g. the 8x8 digits) the second convolution is padded so
    that the spatial size stays positive."""
    c, h, w = in_shape
    small = min(h, w) < 16
    feats = [
        ("normalize", _norm(in_shape, mean, std)),
        ("conv1", nn.Conv2d(c, 6, 5, padding=2)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(6, 16, 5, padding=2 if small else 0)), ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)), ("flatten", nn.Flatten()),
    ]
    d = _flat_dim(feats, in_shape)
    layers = feats + [
        ("fc1", nn.Linear(d, 120)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(120, 84)), ("relu4", nn.ReLU()),
        ("head", nn.Linear(84, num_classes)),
    ]
    m = ZooSequential(OrderedDict(layers))
    m.hidden_layers = ("relu3", "relu4")
    return m


def cnn6(num_classes: int, in_shape, mean=None, std=None) -> nn.Module:
    """The six-convolution PReLU network of the PCL paper (Table 1): three blocks of two 5x5
    convolutions (32, 64, 128 channels) with PReLU and 2x2 max-pooling, global average pooling,
    FC 512, FC 64, FC (num_classes). Feature points for PCL: ``gap``, ``act_fc1``, ``act_fc2``."""
    c, h, w = in_shape
    layers = [("normalize", _norm(in_shape, mean, std))]
    ch_in = c
    size = min(h, w)
    for b, ch in enumerate((32, 64, 128), 1):
        for j in (1, 2):
            layers += [(f"conv{b}_{j}", nn.Conv2d(ch_in, ch, 5, padding=2)), (f"prelu{b}_{j}", nn.PReLU(ch))]
            ch_in = ch
        if size >= 2:
            layers.append((f"pool{b}", nn.MaxPool2d(2)))
            size //= 2
    layers += [
        ("gap_pool", nn.AdaptiveAvgPool2d(1)), ("gap", nn.Flatten()),
        ("fc1", nn.Linear(128, 512)), ("act_fc1", nn.PReLU()),
        ("fc2", nn.Linear(512, 64)), ("act_fc2", nn.PReLU()),
        ("head", nn.Linear(64, num_classes)),
    ]
    m = ZooSequential(OrderedDict(layers))
    m.hidden_layers = ("act_fc1", "act_fc2")
    m.feature_layers = ("gap", "act_fc1", "act_fc2")
    return m


def model_f(num_classes: int, in_shape, mean=None, std=None, width: float = 1.0, extra_convs: int = 0) -> nn.Module:
    """Model F of the I-defender paper (Table 1): Conv64 8x8 stride 2 - ReLU - Conv128 6x6 stride 2 -
    ReLU - FC10. For inputs too small for those kernels (the 8x8 digits) the convolutions are
    padded to keep a positive spatial size. Larger variants (the Table 8 analogue's second
    architecture, as the paper's WRN-46-8 is a deeper WRN-34-8): ``width`` times the channels, and
    ``extra_convs`` 3x3 convolutions (padding 1, ReLU) after the second one; the hidden state stays
    the flattened last convolution (``model-f-deep2``: 606k parameters on 28x28, F's 1152 values)."""
    c, h, w = in_shape
    small = min(h, w) < 20
    c1, c2 = int(round(64 * width)), int(round(128 * width))
    feats = [
        ("normalize", _norm(in_shape, mean, std)),
        ("conv1", nn.Conv2d(c, c1, 8, stride=2, padding=3 if small else 0)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(c1, c2, 6, stride=2, padding=2 if small else 0)), ("relu2", nn.ReLU()),
    ]
    for j in range(3, 3 + int(extra_convs)):
        feats += [(f"conv{j}", nn.Conv2d(c2, c2, 3, padding=1)), (f"relu{j}", nn.ReLU())]
    feats.append(("flatten", nn.Flatten()))
    d = _flat_dim(feats, in_shape)
    m = ZooSequential(OrderedDict(feats + [("head", nn.Linear(d, num_classes))]))
    m.hidden_layers = ("flatten",)
    return m


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016) of depth 6n+2: 20, 32, 44, 56, 110."""

    head_name = "head"
    hidden_layers: Tuple[str, ...] = ("gap",)
    feature_layers: Tuple[str, ...] = ("layer1_gap", "layer2_gap", "gap")

    def __init__(self, num_classes: int, in_shape, depth: int = 20, mean=None, std=None):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise AdvlabError(f"resnet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        c = in_shape[0]
        self.depth = depth
        self.normalize = _norm(in_shape, mean, std)
        self.stem = nn.Sequential(nn.Conv2d(c, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            layer = []
            for i in range(n):
                layer.append(_BasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1))
                cin = cout
            blocks.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = blocks
        self.layer1_gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.layer2_gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        z1 = self.layer1(self.stem(self.normalize(x)))
        z2 = self.layer2(z1)
        z3 = self.layer3(z2)
        if self.layer1_gap._forward_hooks or self.layer2_gap._forward_hooks:  # tapped by PCL only
            self.layer1_gap(z1)
            self.layer2_gap(z2)
        return self.head(self.gap(z3))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_res else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) adapted to 32x32 inputs (stride 1 stem, as for CIFAR)."""

    head_name = "head"
    hidden_layers: Tuple[str, ...] = ("gap",)
    feature_layers: Tuple[str, ...] = ("gap",)
    # (expansion, out channels, repeats, stride)
    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int, in_shape, width: float = 1.0, mean=None, std=None):
        super().__init__()
        c = in_shape[0]
        self.normalize = _norm(in_shape, mean, std)
        cin = int(32 * width)
        layers = [nn.Conv2d(c, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6()]
        for t, ch, reps, s in self.CFG:
            cout = int(ch * width)
            for i in range(reps):
                layers.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = int(1280 * max(1.0, width))
        layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.head(self.dropout(self.gap(self.features(self.normalize(x)))))


def _resnet(num_classes, in_shape, mean=None, std=None, depth: int = 20):
    return ResNet(num_classes, in_shape, depth=depth, mean=mean, std=std)


def _mobilenet(num_classes, in_shape, mean=None, std=None, width: float = 1.0):
    return MobileNetV2(num_classes, in_shape, width=width, mean=mean, std=std)


#: name -> (builder, natural input shape, one-line description)
MODELS: Dict[str, Tuple[Callable[..., nn.Module], Tuple[int, int, int], str]] = {
    "mnist-fc1": (mnist_fc1, (1, 28, 28), "MLP 512-256-100, ReLU (K-A3 paper, MNIST-FC1)"),
    "model-e": (model_e, (1, 28, 28), "MLP FC200-FC200 (I-defender Table 1, model E)"),
    "lenet5": (lenet5, (1, 28, 28), "LeNet-5: two 5x5 convs, FC120, FC84"),
    "cnn6": (cnn6, (1, 28, 28), "six 5x5 convs with PReLU, GAP, FC512, FC64 (PCL Table 1)"),
    "model-f": (model_f, (1, 28, 28), "Conv64 8x8/2, Conv128 6x6/2, FC (I-defender Table 1, model F)"),
    "model-f-deep2": (partial(model_f, extra_convs=2), (1, 28, 28),
                      "model F with two more 3x3 convs, 128 channels (I-defender Table 8 analogue)"),
    "resnet": (_resnet, (3, 32, 32), "CIFAR ResNet, depth 6n+2 (depth=20/56/110)"),
    "mobilenetv2": (_mobilenet, (3, 32, 32), "MobileNetV2 for 32x32 inputs"),
}


def list_models():
    """Names of the registered models (:data:`MODELS`), sorted."""
    return sorted(MODELS)


def model_info(name: str) -> Tuple[Tuple[int, int, int], str]:
    """(natural input shape (C, H, W), description) of the registered model ``name``; raises
    ``AdvlabError`` naming the valid names for an unknown one."""
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    _, shape, desc = MODELS[name]
    return shape, desc


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def build_model(name: str, num_classes: int = 10, in_shape: Sequence[int] | None = None,
                mean=None, std=None, seed: int | None = None, **kwargs) -> nn.Module:
    """Build a registered model. ``in_shape`` is (C, H, W), the model's natural shape by default;
    ``mean``/``std`` set its inner ``Normalize``; ``seed`` makes the initial weights repeatable
    (without touching the global random state); extra keyword arguments go to the builder
    (``depth`` for resnet, ``width`` for mobilenetv2).

    ``name``: a key of :data:`MODELS` (``advlab models`` lists them; an unknown one is an error naming
    the valid ones); ``num_classes``: the output size. Returns the untrained ``nn.Module`` (images in
    [0, 1] in, logits out)."""
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    builder, natural, _ = MODELS[name]
    given = natural if in_shape is None else in_shape
    try:
        sizes = [check_positive_int(s, "in_shape") for s in given]
    except (AdvlabError, TypeError):
        sizes = []
    if len(sizes) != 3:
        raise AdvlabError(f"in_shape must be (C, H, W) with positive integer sizes, got {given!r}")
    in_shape = tuple(sizes)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Real) \
            or not float(num_classes).is_integer() or num_classes < 2:
        raise AdvlabError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise AdvlabError(f"seed must be an integer or None, got {seed!r}")
    for label, v in (("mean", mean), ("std", std)):
        if isinstance(v, (list, tuple)) and len(v) not in (1, in_shape[0]):
            raise AdvlabError(f"{label} must be one number or one per channel ({in_shape[0]}), got {list(v)}")
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(int(seed))
            model = builder(int(num_classes), in_shape, mean=mean, std=std, **kwargs)
    except TypeError as e:
        raise AdvlabError(f"bad option for model {name!r}: {e}") from None
    except RuntimeError as e:  # a layer's output would be empty: the input is too small for the architecture
        raise AdvlabError(f"in_shape {in_shape} is too small for model {name!r} "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    model.advlab_spec = {"name": name, "num_classes": int(num_classes), "in_shape": list(in_shape),
                         "mean": mean, "std": std, "kwargs": dict(kwargs)}
    return model
