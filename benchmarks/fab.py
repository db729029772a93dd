"""Time advlab's FAB-T (L-inf and L2) against a plain forward+backward loop, and beside
torchattacks' FAB (multi-targeted) and AutoAttack's own FAB when they are importable.

For every row it prints: seconds for the batch; sample-steps (images through a forward with
gradients enabled, the steps actually taken, in full-batch units); the ratio ``seconds /
(sample-steps x unit)``, ``unit`` being one plain forward+backward of the batch (the input
gradient of one logit difference, parameters frozen; re-measured just before each row, so the
ratio holds on a machine whose load drifts): what one step costs over the gradient itself (the
projections, the bookkeeping and any extra forward); ``fwd``: every forward pass made, in
full-batch units; the success rate on the correctly classified images; the median distance of the
successful perturbations in the attack's norm. Beside another library's row, ``common`` is the
median distance of ours / theirs on the images both broke.

With ``eps`` the attack is AutoAttack's (a sample is broken when an adversarial within eps is
found; advlab's FAB stops a sample there, ``early_stop``); without, it is minimum-norm (every
library keeps the first target class that gives an adversarial, and the closest one found in
that run): the distances compare the minimisation itself.

    python benchmarks/fab.py                              # MNIST: trains a LeNet-5 for 3 epochs first
    python benchmarks/fab.py --checkpoint lenet.pt        # or an advlab checkpoint
    python benchmarks/fab.py --dataset digits --n 360     # the embedded 8x8 digits, no shared data
    python benchmarks/fab.py --rows linf-min,l2-min --others none

torchattacks and autoattack are never dependencies: ``pip install --no-deps torchattacks``; for
AutoAttack's FAB put a checkout of github.com/fra31/auto-attack on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import advlab
from advlab._util import frozen_eval
from advlab.attacks import FAB

REPO = Path(__file__).resolve().parents[1]

#: row name -> (norm, eps or None); eps in pixel units, AutoAttack's MNIST budgets and half of them
ROWS = {
    "linf-0.3": ("inf", 0.3),
    "linf-0.15": ("inf", 0.15),
    "linf-min": ("inf", None),
    "l2-2.0": ("2", 2.0),
    "l2-1.0": ("2", 1.0),
    "l2-min": ("2", None),
}
ROWS_DIGITS = {"linf-0.3": ("inf", 0.3), "linf-0.1": ("inf", 0.1), "linf-min": ("inf", None),
               "l2-1.0": ("2", 1.0), "l2-0.5": ("2", 0.5), "l2-min": ("2", None)}

#: a huge eps, for the other libraries' minimum-norm runs (they need one; it only gates the result)
NO_BUDGET = 1e6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=("mnist", "digits"))
    p.add_argument("--checkpoint", help="advlab checkpoint of a model for the dataset (default: train a LeNet-5)")
    p.add_argument("--data-root", default="../shared/data/mnist-10k", help="folder with the MNIST IDX files")
    p.add_argument("--n", type=int, default=512, help="batch size (images from the start of the test split)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs when no checkpoint is given")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--steps", type=int, default=100, help="FAB iterations per run (AutoAttack: 100)")
    p.add_argument("--targets", type=int, default=9, help="target classes (AutoAttack: 9)")
    p.add_argument("--rows", default="all", help="comma-separated row names (default: all)")
    p.add_argument("--others", default="torchattacks,autoattack", help="other libraries beside, or 'none'")
    return p.parse_args(argv)


def resolve_root(root: str) -> Path:
    for base in (Path.cwd(), REPO):
        cand = (base / root).resolve()
        if cand.is_dir():
            return cand
    sys.exit(f"data folder not found: {root} (pass --data-root, or --dataset digits)")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load(args, device):
    from advlab.data import load_dataset
    from advlab.models import build_model
    from advlab.train import fit, load_checkpoint

    if args.dataset == "digits":
        train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
        shape, kw = (1, 8, 8), {}
    else:
        root = resolve_root(args.data_root)
        train, test = load_dataset("mnist", root, "train"), load_dataset("mnist", root, "test")
        shape, kw = (1, 28, 28), dict(mean=0.1307, std=0.3081)
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, device=device)[0]
    else:
        epochs = args.epochs if args.dataset == "mnist" else max(args.epochs, 20)
        print(f"training a LeNet-5 on {len(train)} images for {epochs} epochs (use --checkpoint to skip)...",
              flush=True)
        model = build_model("lenet5", 10, shape, seed=0, **kw)
        fit(model, train, epochs=epochs, lr=3e-3, batch_size=64, schedule="onecycle", seed=0, progress=False)
    return model.to(device).eval(), test.images[: args.n].to(device), test.labels[: args.n].to(device)


class Counter:
    """Images through the model's forward: all of them, and those with gradients enabled."""

    def __init__(self, model):
        self.all = self.grad = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        n = int(inputs[0].shape[0])
        self.all += n
        self.grad += n if torch.is_grad_enabled() else 0


def unit_seconds(model, x, device, reps=5):
    """Median seconds of one forward+backward of the batch: the input gradient of ``z_1 - z_0``."""
    times = []
    with frozen_eval(model):
        for i in range(reps + 2):
            sync(device)
            t0 = time.perf_counter()
            xr = x.clone().requires_grad_(True)
            out = model(xr)
            torch.autograd.grad((out[:, 1] - out[:, 0]).sum(), xr)
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def distances(x_adv, x, norm):
    d = (x_adv - x).flatten(1)
    return d.abs().amax(dim=1) if norm == "inf" else d.norm(dim=1)


def measure(model, fn, x, y, ok, norm, device):
    """(seconds, sample-steps, forwards, unit, success mask, distances) of one timed call."""
    unit = unit_seconds(model, x, device)
    counter = Counter(model)
    try:
        sync(device)
        t0 = time.perf_counter()
        x_adv = fn()
        sync(device)
        seconds = time.perf_counter() - t0
    finally:
        counter.handle.remove()
    with torch.no_grad():
        success = (model(x_adv).argmax(1) != y) & ok
    n = x.shape[0]
    return seconds, counter.grad / n, counter.all / n, unit, success, distances(x_adv, x, norm)


def median_or_nan(t):
    return float(t.median()) if t.numel() else float("nan")


def print_row(name, seconds, steps, fwd, unit, success, dist, ok, extra=""):
    rate = float(success.sum()) / max(1, int(ok.sum()))
    ratio = seconds / (steps * unit) if steps else float("nan")
    print(f"{name:<34} {seconds:8.2f} {steps:7.1f} {fwd:7.1f} {1e3 * unit:8.1f} {ratio:6.2f} {100 * rate:7.1f}% "
          f"{median_or_nan(dist[success]):9.4f}{extra}", flush=True)


def other(lib, model, norm, eps, steps, targets, device):
    """A callable (x, y) -> x_adv running FAB-T through ``lib``, or a string saying why not."""
    lib_norm = "Linf" if norm == "inf" else "L2"
    budget = NO_BUDGET if eps is None else eps
    if lib == "torchattacks":
        try:
            import torchattacks
        except Exception as e:  # ImportError, or a broken dependency under it
            return f"not installed ({type(e).__name__})"
        atk = torchattacks.FAB(model, norm=lib_norm, eps=budget, steps=steps, n_restarts=1, multi_targeted=True,
                               n_classes=targets + 1, seed=0)
        return lambda x, y: atk(x, y)
    if lib == "autoattack":
        try:
            from autoattack.fab_pt import FABAttack_PT
        except Exception as e:
            return f"not importable ({type(e).__name__})"
        atk = FABAttack_PT(model, norm=lib_norm, n_restarts=1, n_iter=steps, eps=budget, seed=0, targeted=True,
                           n_target_classes=targets, device=device)
        return lambda x, y: atk.perturb(x, y)
    return f"unknown library {lib!r}"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, x, y = load(args, device)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    table = ROWS_DIGITS if args.dataset == "digits" else ROWS
    wanted = list(table) if args.rows == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in table]
    if unknown:
        sys.exit(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(table)}")
    libs = [] if args.others == "none" else [s.strip() for s in args.others.split(",") if s.strip()]
    print(f"advlab {advlab.__version__}, torch {torch.__version__}, device {device}, threads "
          f"{torch.get_num_threads()}, {args.dataset}: {x.shape[0]} images, clean accuracy "
          f"{float(ok.float().mean()):.4f}; FAB-T, {args.steps} steps, {args.targets} target classes, 1 restart")
    print("steps = sample-steps (forwards with gradients, full-batch units); fwd = all forwards; unit = one plain "
          "fwd+bwd of the batch (ms);\nratio = seconds / (steps x unit); success on the correctly classified images; "
          "median distance (attack's norm) of the successes\n")
    print(f"{'row':<34} {'seconds':>8} {'steps':>7} {'fwd':>7} {'unit ms':>8} {'ratio':>6} {'success':>8} "
          f"{'med dist':>9}")
    missing = {}
    for name in wanted:
        norm, eps = table[name]
        atk = FAB(model, eps=eps, norm=norm, steps=args.steps, targeted_classes=args.targets, seed=0)
        atk(x[:4], y[:4])  # warm-up
        seconds, steps, fwd, unit, success, dist = measure(model, lambda: atk(x, y), x, y, ok, norm, device)
        print_row(f"advlab {name}", seconds, steps, fwd, unit, success, dist, ok)
        for lib in libs:
            run = other(lib, model, norm, eps, args.steps, args.targets, device)
            if isinstance(run, str):
                missing[lib] = run
                continue
            s2, st2, f2, u2, succ2, d2 = measure(model, lambda: run(x, y), x, y, ok, norm, device)
            both = success & succ2
            common = f"  common {median_or_nan(dist[both]):.4f} / {median_or_nan(d2[both]):.4f}"
            print_row(f"  {lib}", s2, st2, f2, u2, succ2, d2, ok,
                      extra=f"{common}  (time ratio {s2 / seconds:.2f}x ours)")
    for lib, why in missing.items():
        print(f"\n{lib}: {why}")


if __name__ == "__main__":
    main()
