"""Shared fixtures: paths to ../shared/data (skipped with a reason when absent) and small trained
models, trained once and cached in pytest's cache folder under a digest of the code that trains
them, their build function and their data (a code change retrains them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("ADVLAB_QUIET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADVLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


def _shared(name: str) -> Path:
    root = SHARED / name
    if not (root / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real data not available: {root} is absent (the ../shared folder is only on the "
                    f"development machines; set ADVLAB_SHARED_DATA to point elsewhere)")
    return root


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    return _shared("mnist-10k")


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    return _shared("fashion-mnist")


#: the trained models shared across tests (session fixtures): a test must leave them as it found them
_SHARED_MODELS: list = []


#: what a trained fixture depends on besides its data and its build function: the code that
#: builds and trains it (a change there must retrain, never reuse a model the old code made)
_TRAINING_CODE = ("models", "nn", "data", "train.py", "_util.py", "distributed.py", "__init__.py")


def _fingerprint(build, data_files=()) -> str:
    """Digest of the advlab code a trained fixture depends on, its ``build`` function's source and
    the bytes of its data files."""
    import hashlib
    import inspect

    import advlab

    root = Path(advlab.__file__).parent
    h = hashlib.sha256(inspect.getsource(build).encode())
    for name in _TRAINING_CODE:
        for f in sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / name]:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    for f in data_files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def _trained(cache_dir: Path, key: str, build, data_files=()):
    from advlab.train import load_checkpoint, save_checkpoint

    path = cache_dir / f"{key}-{_fingerprint(build, data_files)}.pt"
    model = None
    if path.is_file():
        try:
            model = load_checkpoint(path)[0]
        except Exception:
            path.unlink()
    if model is None:
        model = build()
        save_checkpoint(model, path)
    _SHARED_MODELS.append(model)
    return model


def _model_state(m) -> tuple:
    return tuple(x.training for x in m.modules()), tuple(p.requires_grad for p in m.parameters())


@pytest.fixture(autouse=True)
def _shared_models_untouched():
    """Fail the test that leaves ``.grad`` on a shared model, or leaves it in another train/eval mode
    or with other ``requires_grad`` flags (rather than a later test that depends on them), and
    undo it so the rest of the session is unaffected, in any test order."""
    before = {id(m): _model_state(m) for m in _SHARED_MODELS}
    yield
    dirty = [m for m in _SHARED_MODELS if any(p.grad is not None for p in m.parameters())]
    for m in dirty:
        m.zero_grad(set_to_none=True)
    changed = []
    for m in _SHARED_MODELS:   # a model first built during this test was built in eval mode
        modes, flags = before.get(id(m), ((False,) * len(list(m.modules())), (True,) * len(list(m.parameters()))))
        if _model_state(m) != (modes, flags):
            changed.append(m)
            for x, t in zip(m.modules(), modes):
                x.training = t
            for p, f in zip(m.parameters(), flags):
                p.requires_grad_(f)
    assert not dirty, "this test left .grad on a shared trained model (differentiate w.r.t. the input only)"
    assert not changed, ("this test left a shared trained model in another train/eval mode or with other "
                         "requires_grad flags (restore them in a finally)")


def pytest_terminal_summary(terminalreporter, config):
    """The test order's seed, also under ``-q`` (which hides pytest-randomly's header line), so that
    an order-dependent failure in CI can be replayed."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and config.pluginmanager.has_plugin("randomly"):
        terminalreporter.write_line(f"test order: pytest-randomly seed {seed} (replay with --randomly-seed={seed})")


@pytest.fixture(scope="session")
def model_cache(request) -> Path:
    return Path(request.config.cache.mkdir("advlab-models"))


@pytest.fixture(scope="session")
def mnist_data(mnist_root):
    from advlab.data import load_dataset

    return load_dataset("mnist", mnist_root, "train"), load_dataset("mnist", mnist_root, "test")


@pytest.fixture(scope="session")
def lenet_mnist(model_cache, mnist_data, mnist_root):
    """LeNet-5 trained on mnist-10k (about 98% test accuracy), in eval mode."""
    from advlab.models import build_model
    from advlab.train import fit

    train, test = mnist_data

    def build():
        m = build_model("lenet5", 10, (1, 28, 28), mean=0.1307, std=0.3081, seed=0)
        fit(m, train, epochs=10, lr=3e-3, batch_size=64, schedule="onecycle", seed=0)
        return m
    return _trained(model_cache, "lenet5-mnist10k-e10-s0", build, sorted(mnist_root.glob("*"))).eval()


@pytest.fixture(scope="session")
def digits_data():
    from advlab.data import load_dataset

    return load_dataset("digits", split="train"), load_dataset("digits", split="test")


@pytest.fixture(scope="session")
def lenet_digits(model_cache, digits_data):
    """LeNet-5 trained on the embedded 8x8 digits (about 97% test accuracy); needs no shared data."""
    from advlab.models import build_model
    from advlab.train import fit

    train, _ = digits_data

    def build():
        m = build_model("lenet5", 10, (1, 8, 8), seed=0)
        fit(m, train, epochs=20, lr=3e-3, batch_size=64, schedule="onecycle", seed=0)
        return m
    return _trained(model_cache, "lenet5-digits-e20-s0", build).eval()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's small models (2 threads thrash on a loaded 2-core machine);
    the previous count is restored after. Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
