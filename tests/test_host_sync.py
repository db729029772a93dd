"""Host-device synchronisations inside the attacks' steps (issue 23, item 4), counted on the CPU.

A synchronisation is any operation that needs a tensor's value on the host: ``.item()``,
``bool(t)`` (a Python ``if`` on a tensor), ``int``/``float``/``__index__``, ``.tolist()``,
``.cpu()``, ``.numpy()``, and the ops whose output size depends on the data (``nonzero``,
``masked_select``, ``unique``, indexing with a boolean mask). On a GPU each one waits for the
device's queue to drain. A :class:`torch.overrides.TorchFunctionMode` counts them.

The budget: a constant per call (input checks, the clean forward's finiteness check, the final
NaN check, per-restart bookkeeping) plus at most :data:`PER_CHECK` per check for finished samples,
which happens every ``check_every`` steps (the accelerators' default
:data:`~advlab.attacks.loop.ACCELERATOR_CHECK_EVERY` for PGD, APGD, Square and DeepFool, whose
CPU default is every step; 5 for K-A3; one per tenth of the steps for C&W's abort-early). So the
count must not grow with the number of steps beyond those checks. Each attack runs on a model
nothing can fool (every sample takes every step) and on a small random one (samples finish at
different steps, so the checks shrink the batch).
"""

import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from advlab.attacks import APGD, KA3, PGD, CarliniWagnerL2, DeepFool, Square
from advlab.attacks.loop import ACCELERATOR_CHECK_EVERY, check_interval

pytestmark = pytest.mark.usefixtures("one_thread")

#: names of the Tensor methods / torch functions that read a value on the host
SYNC_OPS = frozenset({"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy", "nonzero",
                      "argwhere", "masked_select", "unique", "unique_consecutive", "repeat_interleave"})
#: host synchronisations per check for finished samples: one ``any`` and one ``nonzero``
PER_CHECK = 2
#: the most a call may spend outside the steps
PER_CALL = 12
N = ACCELERATOR_CHECK_EVERY


def _bool_index(args) -> bool:
    def walk(a):
        if isinstance(a, torch.Tensor):
            return a.dtype == torch.bool and a.dim() > 0
        return isinstance(a, (tuple, list)) and any(walk(b) for b in a)
    return len(args) > 1 and walk(args[1])


class SyncCounter(TorchFunctionMode):
    """Counts the calls in :data:`SYNC_OPS`, boolean-mask indexing and one-argument ``where``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if (name in SYNC_OPS or (name in ("__getitem__", "__setitem__", "index_put_", "index_put") and _bool_index(args))
                or (name == "where" and len(args) == 1 and not kwargs)):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


class Unfoolable(nn.Module):
    """Logits whose class 0 wins by 50 whatever the input: no attack succeeds, every sample takes
    every step."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.register_buffer("bias", torch.tensor([50.0] + [0.0] * 9))

    def forward(self, x):
        return self.lin(x.flatten(1)) + self.bias


def _small_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))


def _model(kind):
    torch.manual_seed(0)
    return (Unfoolable() if kind == "unfoolable" else _small_cnn()).eval()


def _data(model):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)  # the model's own labels: every sample starts correctly classified
    return x, y


#: name -> (factory(model, steps), steps between two checks)
ATTACKS = {
    "pgd-linf-early-stop": (lambda m, s: PGD(m, eps=0.3, steps=s, early_stop=True, check_every=N), N),
    "pgd-l2-early-stop": (lambda m, s: PGD(m, eps=1.0, norm="2", steps=s, early_stop=True, check_every=N), N),
    "pgd-linf": (lambda m, s: PGD(m, eps=0.3, steps=s), None),
    "apgd-ce": (lambda m, s: APGD(m, eps=0.3, steps=s, check_every=N), N),
    "apgd-l2-dlr": (lambda m, s: APGD(m, eps=1.0, norm="2", loss="dlr", steps=s, check_every=N), N),
    "square-linf": (lambda m, s: Square(m, eps=0.3, queries=s, check_every=N), N),
    "square-l2": (lambda m, s: Square(m, eps=1.0, norm="2", queries=s, check_every=N), N),
    "cw": (lambda m, s: CarliniWagnerL2(m, steps=s, binary_search_steps=1), "tenth"),
    "deepfool": (lambda m, s: DeepFool(m, steps=s, check_every=N), N),
    "ka3-cw-ssim": (lambda m, s: KA3(m, K=2, steps=s), 5),
    "ka3-no-similarity": (lambda m, s: KA3(m, K=2, steps=s, similarity=None), 5),
}


def _count(make, model, steps):
    x, y = _data(model)
    atk = make(model, steps)
    with SyncCounter() as c:
        atk(x, y)
    return c.calls


def _checks(every, steps):
    if every is None:
        return 0
    if every == "tenth":
        return 10
    return math.ceil(steps / every) + 1   # every ``every`` steps, and after the last


@pytest.mark.parametrize("kind", ["unfoolable", "random"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_host_syncs_per_step_stay_within_the_budget(name, kind):
    make, every = ATTACKS[name]
    model = _model(kind)
    short, long = _count(make, model, 2 * N), _count(make, model, 6 * N)
    assert len(short) <= PER_CALL + PER_CHECK * _checks(every, 2 * N), short
    assert len(long) <= PER_CALL + PER_CHECK * _checks(every, 6 * N), long
    # four times as many steps cost only the checks in between
    extra = PER_CHECK * (_checks(every, 6 * N) - _checks(every, 2 * N) if every != "tenth" else 10)
    assert len(long) - len(short) <= extra, (short, long)


def test_the_accelerator_default_is_used_off_the_cpu_and_every_step_on_it():
    assert check_interval(None, torch.device("cuda")) == ACCELERATOR_CHECK_EVERY > 1
    assert check_interval(None, "cpu") == 1
    assert check_interval(3, "cuda") == 3


def test_the_counter_sees_every_kind_of_sync():
    t = torch.arange(4.0)
    with SyncCounter() as c:
        t.sum().item()
        bool(t.any())
        if t.all():
            pass
        t.tolist()
        t.cpu()
        t.nonzero()
        t[t > 1]
        float(t[0])
        torch.where(t > 0)
        t.numpy()
    assert c.calls == ["item", "__bool__", "__bool__", "tolist", "cpu", "nonzero", "__getitem__", "__float__", "where",
                       "numpy"]


@pytest.mark.parametrize("make", [lambda m, n: PGD(m, eps=0.3, steps=20, early_stop=True, check_every=n, seed=0),
                                  lambda m, n: APGD(m, eps=0.3, steps=20, check_every=n),
                                  lambda m, n: DeepFool(m, steps=20, check_every=n)])
def test_results_do_not_depend_on_how_often_finished_samples_leave(make):
    model = _model("random")
    x, y = _data(model)
    every_step = make(model, 1)(x, y)
    for n in (3, N):
        assert torch.equal(make(model, n)(x, y), every_step)
