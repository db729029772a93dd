"""Time advlab's attacks on a batch of MNIST test images with a LeNet-5, beside other libraries.

For every attack it prints: seconds for the batch, nominal steps, the ratio
``seconds / (steps x one plain forward+backward of the same batch)`` (the forward+backward being the
loss gradient with respect to the input, parameters frozen, which is what one attack step costs;
it is re-measured just before each attack, so the ratio holds on a machine whose load drifts),
the forward passes the attack actually made (in full-batch equivalents, counted by a hook), the
success rate on the images the model classifies correctly, and the median L2 norm of the
successful perturbations. When torchattacks, foolbox or ART are importable, the same attacks with
the same parameters run through them on the same model and images (they are never dependencies).

Attacks written in other advlab modules (C&W, DeepFool, L-BFGS, JSMA, K-A3) are included when
``advlab.attacks`` exports them, with their constructors' defaults; their nominal steps are
``steps x binary_search_steps`` where they have those attributes, and the forward count shows
what they really did.

    python benchmarks/attacks.py                        # trains a LeNet-5 for 3 epochs first
    python benchmarks/attacks.py --checkpoint lenet.pt  # or an advlab checkpoint
    python benchmarks/attacks.py --attacks PGD,FGSM --others none
    python benchmarks/attacks.py --model mnist-fc1 --attacks KA3-1,KA3-5,KA3-9 --others none
    python benchmarks/attacks.py --attacks PGD-L2 --seeds 0,1,2,3,4   # mean success over seeds

K-A3's rows (``KA3-K``: K = 1, 5, 9 with the CW-SSIM term) stop samples early, so their ratio is
per *sample-step*: ``seconds / (sample-steps x unit / n)``, the sample-steps counted by the
attack (``total_sample_steps``), as the K-A3 report prints it. With ``--seeds`` an attack that
takes ``seed`` runs once per seed (the other libraries with torch's and numpy's global RNG seeded
the same) and the row shows the mean success (min-max over the seeds) and the mean median L2.
Beside another library's row, ``common`` is the median L2 of ours and theirs on the images both
broke.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import advlab
import advlab.attacks
from advlab._util import frozen_eval
from advlab.attacks.registry import attack_parameters

REPO = Path(__file__).resolve().parents[1]

# name shown, registry name (advlab.attacks.ATTACKS), parameters, nominal forward+backward passes
# (None: from the attack)
SPECS = [
    ("FGSM", "fgsm", dict(eps=0.3), 1),
    ("BIM", "bim", dict(eps=0.3, alpha=0.01, steps=40), 40),
    ("MIM", "mim", dict(eps=0.3, alpha=0.01, steps=40, decay=1.0), 40),
    ("PGD", "pgd", dict(eps=0.3, alpha=0.01, steps=40, random_start=True, seed=0), 40),
    ("PGD-margin", "pgd", dict(eps=0.3, alpha=0.01, steps=40, loss="margin", seed=0), 40),
    ("PGD-earlystop", "pgd", dict(eps=0.3, alpha=0.01, steps=40, early_stop=True, seed=0), 40),
    ("PGD-L2", "pgd-l2", dict(eps=2.0, alpha=0.1, steps=40, random_start=True, seed=0), 40),
    ("IterativeL2", "l2", dict(eps=2.0, alpha=0.1, steps=40), 40),
    ("APGD-CE", "apgd", dict(eps=0.3, steps=40, early_stop=False, seed=0), 40),
    ("APGD-CE-earlystop", "apgd", dict(eps=0.3, steps=40, seed=0), 40),
    # black-box: one forward per query (no backward), so its ratio is well under 1
    ("Square", "square", dict(eps=0.3, queries=1000, seed=0), 1000),
    # the attacks of the other modules run with their own defaults (set there from the papers)
    ("CarliniWagnerL2", "cw", dict(), None),
    # one C&W run of 100 steps, no binary search: the setting the other libraries are timed with
    ("CW-100", "cw", dict(c=1.0, steps=100, lr=0.1, binary_search_steps=1), None),
    # the same at the other libraries' default learning rate (0.01), and at 1000 steps
    ("CW-100-lr0.01", "cw", dict(c=1.0, steps=100, lr=0.01, binary_search_steps=1), None),
    ("CW-1000-lr0.01", "cw", dict(c=1.0, steps=1000, lr=0.01, binary_search_steps=1), None),
    # C&W without the early stop: the converged reference of the early-stop rule
    ("CW-100-lr0.01-noabort", "cw", dict(c=1.0, steps=100, lr=0.01, binary_search_steps=1, abort_early=False),
     None),
    ("CW-lr0.01", "cw", dict(lr=0.01), None),
    ("DeepFool", "deepfool", dict(steps=50, overshoot=0.02, num_candidates=10), None),
    ("LBFGS", "lbfgs", dict(), None),
    ("JSMA", "jsma", dict(theta=1.0, gamma=0.1), None),
    # torchattacks' JSMA loops over images: the comparison runs on the first 64
    ("JSMA-64", "jsma", dict(theta=1.0, gamma=0.1, _n=64), None),
    ("KA3", "ka3", dict(), None),
    # K-A3 with CW-SSIM at K = 1, 5, 9 (ratio per sample-step; MNIST-FC1 with --model mnist-fc1)
    ("KA3-1", "ka3", dict(K=1), None),
    ("KA3-5", "ka3", dict(K=5), None),
    ("KA3-9", "ka3", dict(K=9), None),
    ("KA3-5-nosim", "ka3", dict(K=5, similarity=None), None),
]

#: rows compared with another library under the name of the row whose parameters they share
PEER_NAME = {"CW-100-lr0.01": "CW-100", "CW-1000-lr0.01": "CW-100"}


def second_ranked(model, x, y):
    """The class each clean image ranks second (JSMA's default target in advlab)."""
    with torch.no_grad():
        return advlab.attacks.runner_up(model(x), y)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="advlab checkpoint of a LeNet-5 (default: train one for --epochs)")
    p.add_argument("--save-checkpoint", help="where to save the model trained here, for later runs")
    p.add_argument("--data-root", default="../shared/data/mnist-10k", help="folder with the MNIST IDX files")
    p.add_argument("--n", type=int, default=512, help="batch size (images from the start of the test split)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs when no checkpoint is given")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the reference numbers use 2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--attacks", default="all", help="comma-separated names from the table (default: all)")
    p.add_argument("--others", default="torchattacks,foolbox,art",
                   help="other libraries to run beside (comma-separated, or 'none')")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per attack; the fastest is shown")
    p.add_argument("--model", default="lenet5", help="model trained when no checkpoint is given (lenet5, mnist-fc1)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: attacks with a seed run once per seed")
    return p.parse_args(argv)


def resolve_root(root: str) -> Path:
    for base in (Path.cwd(), REPO):
        cand = (base / root).resolve()
        if cand.is_dir():
            return cand
    sys.exit(f"data folder not found: {root} (pass --data-root)")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def get_model(args, device):
    from advlab.data import load_dataset
    from advlab.models import build_model
    from advlab.train import fit, load_checkpoint, save_checkpoint

    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint, device=device)
        return model.eval()
    train = load_dataset("mnist", resolve_root(args.data_root), "train")
    print(f"training {args.model} on {len(train)} images for {args.epochs} epochs (use --checkpoint to skip)...",
          flush=True)
    model = build_model(args.model, 10, (1, 28, 28), mean=0.1307, std=0.3081)
    fit(model, train, epochs=args.epochs, lr=3e-3, batch_size=64, schedule="onecycle", seed=0, progress=False)
    if args.save_checkpoint:
        save_checkpoint(model, args.save_checkpoint)
    return model.to(device).eval()


class ForwardCounter:
    """Counts images through the model's forward (a pre-hook on the top module)."""

    def __init__(self, model):
        self.images = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        self.images += int(inputs[0].shape[0])


def time_plain_step(model, x, y, device, reps=5):
    """Median seconds of one forward+backward of the batch w.r.t. the input (parameters frozen),
    and of one training-style forward+backward w.r.t. the parameters."""
    def input_grad():
        xr = x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(xr), y, reduction="sum")
        torch.autograd.grad(loss, xr)

    def param_grad():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    out = []
    for fn, frozen in ((input_grad, True), (param_grad, False)):
        times = []
        for i in range(reps + 2):
            if frozen:
                with frozen_eval(model):
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
            else:
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
            if i >= 2:  # two warm-up runs
                times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
    model.eval()
    return out


def evaluate(model, x, y, x_adv, ok, with_mask=False):
    """Success rate on the correctly classified images and the median L2 of the successes (and
    the per-sample success mask and L2 norms with ``with_mask``)."""
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    success = (pred != y) & ok
    rate = float(success.sum()) / max(1, int(ok.sum()))
    norms = (x_adv - x).flatten(1).norm(dim=1)
    l2 = norms[success]
    med = float(l2.median()) if l2.numel() else float("nan")
    return (rate, med, success, norms) if with_mask else (rate, med)


def median_or_nan(t):
    return float(t.median()) if t.numel() else float("nan")


def run_timed(fn, device, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def row(name, seconds, steps, t_step, fwd, rate, med, extra="", ratio=None):
    """One printed row; ``ratio`` defaults to seconds / (steps x unit)."""
    if ratio is None and steps:
        ratio = seconds / (steps * t_step)
    ratio_s = f"{ratio:6.2f}" if ratio is not None else "     -"
    steps_s = f"{steps:5d}" if steps else "    -"
    fwd_s = f"{fwd:7.1f}" if fwd is not None else "      -"
    rate_s = f"{100 * rate:7.1f}%" if isinstance(rate, float) else f"{rate:>8}"
    print(f"{name:<30} {seconds:8.2f} {steps_s} {1e3 * t_step:7.1f} {ratio_s} {fwd_s} {rate_s} {med:8.3f}{extra}",
          flush=True)


# --------------------------------------------------------------------------- other libraries

def other_library_runs(lib, model, x, y, spec_name, params, device):
    """A callable running the same attack through ``lib``, or a string saying why not."""
    eps = params.get("eps")
    alpha = params.get("alpha")
    steps = params.get("steps")
    if lib == "torchattacks":
        try:
            import torchattacks as ta
        except Exception as e:  # ImportError, or a broken torchvision under it
            return f"not installed ({type(e).__name__})"
        make = {
            "FGSM": lambda: ta.FGSM(model, eps=eps),
            "BIM": lambda: ta.BIM(model, eps=eps, alpha=alpha, steps=steps),
            "MIM": lambda: ta.MIFGSM(model, eps=eps, alpha=alpha, steps=steps, decay=params.get("decay", 1.0)),
            "PGD": lambda: ta.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True),
            "PGD-L2": lambda: ta.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=True),
            "APGD-CE": lambda: ta.APGD(model, eps=eps, steps=steps, loss="ce", n_restarts=1, seed=0),
            "CW-100": lambda: ta.CW(model, c=params["c"], kappa=0, steps=steps, lr=params["lr"]),
            "DeepFool": lambda: ta.DeepFool(model, steps=steps, overshoot=params["overshoot"]),
            "JSMA-64": lambda: ta.JSMA(model, theta=params["theta"], gamma=params["gamma"]),
        }.get(spec_name)
        if make is None:
            return None
        atk = make()
        if spec_name.startswith("JSMA"):  # the same targets as advlab's (second-ranked class)
            atk.set_mode_targeted_by_label(quiet=True)
            t = second_ranked(model, x, y)
            return lambda: atk(x, t)
        return lambda: atk(x, y)
    if lib == "foolbox":
        try:
            import foolbox as fb
        except Exception as e:
            return f"not installed ({type(e).__name__})"
        make = {
            "FGSM": lambda: fb.attacks.FGSM(random_start=False),
            "BIM": lambda: fb.attacks.LinfBasicIterativeAttack(abs_stepsize=alpha, steps=steps, random_start=False),
            "PGD": lambda: fb.attacks.LinfPGD(abs_stepsize=alpha, steps=steps, random_start=True),
            "PGD-L2": lambda: fb.attacks.L2PGD(abs_stepsize=alpha, steps=steps, random_start=True),
            "IterativeL2": lambda: fb.attacks.L2BasicIterativeAttack(abs_stepsize=alpha, steps=steps,
                                                                      random_start=False),
            "CW-100": lambda: fb.attacks.L2CarliniWagnerAttack(binary_search_steps=1, steps=steps,
                                                               stepsize=params["lr"], confidence=0,
                                                               initial_const=params["c"], abort_early=True),
            "DeepFool": lambda: fb.attacks.L2DeepFoolAttack(steps=steps, candidates=params["num_candidates"],
                                                            overshoot=params["overshoot"]),
        }.get(spec_name)
        if make is None:
            return None
        fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=device)
        atk = make()
        return lambda: atk(fmodel, x, y, epsilons=eps)[1]
    if lib == "art":
        try:
            import numpy as np
            from art.attacks.evasion import (BasicIterativeMethod, CarliniL2Method, DeepFool, FastGradientMethod,
                                             MomentumIterativeMethod, ProjectedGradientDescentPyTorch,
                                             SaliencyMapMethod)
            from art.estimators.classification import PyTorchClassifier
        except Exception as e:
            return f"not installed ({type(e).__name__})"
        clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                nb_classes=10, clip_values=(0.0, 1.0),
                                device_type="gpu" if device.type == "cuda" else "cpu")
        n = x.shape[0]
        make = {
            "FGSM": lambda: FastGradientMethod(clf, norm=np.inf, eps=eps, batch_size=n),
            "BIM": lambda: BasicIterativeMethod(clf, eps=eps, eps_step=alpha, max_iter=steps, batch_size=n,
                                                verbose=False),
            "MIM": lambda: MomentumIterativeMethod(clf, norm=np.inf, eps=eps, eps_step=alpha,
                                                   decay=params.get("decay", 1.0), max_iter=steps, batch_size=n,
                                                   verbose=False),
            "PGD": lambda: ProjectedGradientDescentPyTorch(clf, norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps,
                                                           num_random_init=1, batch_size=n, verbose=False),
            "PGD-L2": lambda: ProjectedGradientDescentPyTorch(clf, norm=2, eps=eps, eps_step=alpha, max_iter=steps,
                                                              num_random_init=1, batch_size=n, verbose=False),
            "CW-100": lambda: CarliniL2Method(clf, confidence=0.0, learning_rate=params["lr"], binary_search_steps=1,
                                              max_iter=steps, initial_const=params["c"], batch_size=n,
                                              verbose=False),
            "DeepFool": lambda: DeepFool(clf, max_iter=steps, epsilon=params["overshoot"],
                                         nb_grads=params["num_candidates"], batch_size=n, verbose=False),
            "JSMA-64": lambda: SaliencyMapMethod(clf, theta=params["theta"], gamma=params["gamma"], batch_size=n,
                                                 verbose=False),
        }.get(spec_name)
        if make is None:
            return None
        atk = make()
        xn, yn = x.cpu().numpy(), y.cpu().numpy()
        if spec_name.startswith("JSMA"):  # targeted, one-hot targets: advlab's second-ranked class
            yn = np.eye(10, dtype=np.float32)[second_ranked(model, x, y).cpu().numpy()]
        elif spec_name in ("CW-100", "DeepFool"):
            yn = None  # untargeted, against the model's own prediction
        return lambda: torch.from_numpy(atk.generate(xn, yn)).to(device)
    return f"unknown library {lib!r}"


# --------------------------------------------------------------------------- main

def run_advlab(model, registered, params, xs, ys, oks, device, repeat, seed=None):
    """One advlab row: (seconds, nominal steps, unit, forwards, success rate, median L2, success
    mask, L2 norms, the ratio per sample-step for K-A3 or None)."""
    if seed is not None:
        params = {**params, "seed": seed}
    atk = advlab.attacks.build_attack(registered, model, **params)
    steps = getattr(atk, "steps", None)
    if steps is not None:
        steps *= getattr(atk, "binary_search_steps", 1)
    atk(xs[:8], ys[:8])  # warm-up
    if hasattr(atk, "reset"):
        atk.reset()
    t_step = time_plain_step(model, xs, ys, device)[0]
    counter = ForwardCounter(model)
    try:
        seconds, x_adv = run_timed(lambda: atk(xs, ys), device, repeat)
    finally:
        counter.handle.remove()
    fwd = counter.images / repeat / xs.shape[0]
    rate, med, success, norms = evaluate(model, xs, ys, x_adv, oks, with_mask=True)
    ratio = None
    if hasattr(atk, "total_sample_steps"):  # K-A3: per sample-step of the timed (last) run
        ratio = seconds / (atk.last_sample_steps * t_step / xs.shape[0])
    return seconds, steps, t_step, fwd, rate, med, success, norms, ratio


def seed_everything(seed):
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from advlab.data import load_dataset

    test = load_dataset("mnist", resolve_root(args.data_root), "test")
    x = test.images[: args.n].to(device)
    y = test.labels[: args.n].to(device)
    model = get_model(args, device)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    t_step, t_train = time_plain_step(model, x, y, device)
    seeds = None if args.seeds is None else [int(v) for v in args.seeds.split(",")]
    print(f"advlab {advlab.__version__}, torch {torch.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}, {x.shape[0]} images, clean accuracy {float(ok.float().mean()):.4f}")
    print(f"one plain forward+backward of the batch: {1e3 * t_step:.1f} ms w.r.t. the input "
          f"(the unit below), {1e3 * t_train:.1f} ms w.r.t. the parameters")
    print("unit = input fwd+bwd in ms, re-measured before each row; ratio = seconds / (steps x unit) (K-A3: per "
          "sample-step); fwd = forward passes made, in full-batch units;\nsuccess on the correctly classified "
          "images; median L2 of the successful perturbations; common = median L2 of ours / theirs on the images "
          "both broke\n")
    print(f"{'attack':<30} {'seconds':>8} {'steps':>5} {'unit ms':>7} {'ratio':>6} {'fwd':>7} {'success':>8} "
          f"{'med L2':>8}")

    wanted = None if args.attacks == "all" else {a.strip() for a in args.attacks.split(",")}
    libs = [] if args.others == "none" else [s.strip() for s in args.others.split(",") if s.strip()]
    missing_libs = {}
    for name, registered, params, steps in SPECS:
        if wanted is not None and name not in wanted:
            continue
        params = dict(params)
        n_row = params.pop("_n", None)
        xs, ys, oks = (x, y, ok) if n_row is None else (x[:n_row], y[:n_row], ok[:n_row])
        seeded = seeds is not None and "seed" in attack_parameters(registered)
        row_seeds = seeds if seeded else [params.get("seed")]
        ours = []  # per seed: (success mask, norms)
        runs = []
        for sd in row_seeds:
            out = run_advlab(model, registered, params, xs, ys, oks, device, args.repeat, sd if seeded else None)
            runs.append(out)
            ours.append((out[6], out[7]))
        seconds, st, t_step, fwd, rate, med, _, _, ratio = runs[-1]
        steps = steps if steps is not None else st
        if seeded:
            rates = [r[4] for r in runs]
            rate_s = f"{100 * statistics.mean(rates):.1f}%"
            row(name, statistics.median(r[0] for r in runs), steps, statistics.median(r[2] for r in runs), fwd,
                rate_s, statistics.mean(r[5] for r in runs),
                f"   seeds {seeds}: {', '.join(f'{100 * r:.1f}' for r in rates)}")
        else:
            row(name, seconds, steps, t_step, fwd, rate, med, ratio=ratio)
        peer_name = PEER_NAME.get(name, name)
        for lib in libs:
            if lib in missing_libs:
                continue
            fn = other_library_runs(lib, model, xs, ys, peer_name, params, device)
            if fn is None:
                continue
            if isinstance(fn, str):
                print(f"  [{lib}] {fn}")
                missing_libs[lib] = fn
                continue
            rates, meds, secs, commons = [], [], [], []
            failed = False
            for i, sd in enumerate(row_seeds):
                try:
                    if sd is not None:
                        seed_everything(sd)
                    fn_small = other_library_runs(lib, model, xs[:8], ys[:8], peer_name, params, device)
                    fn_small()  # warm-up
                    t_step = time_plain_step(model, xs, ys, device)[0]
                    if sd is not None:
                        seed_everything(sd)
                    seconds, x_adv = run_timed(fn, device, args.repeat)
                except Exception as e:  # another library's failure must not stop the benchmark
                    print(f"  [{lib}] failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    failed = True
                    break
                model.eval()
                x_adv = x_adv.detach().to(x.dtype)
                # foolbox's C&W returns an all-black image where it failed; most are misclassified, so
                # they would count as successes: they count as failures (the clean image in their place)
                blank = (x_adv.flatten(1).abs().amax(1) == 0) & (xs.flatten(1).abs().amax(1) > 0)
                if bool(blank.any()):
                    print(f"    ({int(blank.sum())} blank images returned for failures: counted as failures)",
                          flush=True)
                    x_adv = torch.where(blank.view(-1, 1, 1, 1), xs, x_adv)
                rate, med, success, norms = evaluate(model, xs, ys, x_adv, oks, with_mask=True)
                mine, my_norms = ours[i]
                both = mine & success
                commons.append((median_or_nan(my_norms[both]), median_or_nan(norms[both]), int(both.sum())))
                rates.append(rate)
                meds.append(med)
                secs.append(seconds)
            if failed:
                continue
            common = "   common " + "; ".join(f"{a:.3f} / {b:.3f} on {k}" for a, b, k in commons)
            if seeded:
                row(f"  {name} [{lib}]", statistics.median(secs), steps, t_step, None,
                    f"{100 * statistics.mean(rates):.1f}%", statistics.mean(meds),
                    f"   seeds: {', '.join(f'{100 * r:.1f}' for r in rates)}")
            else:
                row(f"  {name} [{lib}]", secs[0], steps, t_step, None, rates[0], meds[0], common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
