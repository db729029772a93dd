"""advlab's honest-evaluation battery beside torchattacks' AutoAttack, on an adversarially trained LeNet-5.

The claim checked (not a timed test): on a LeNet-5 adversarially trained with PGD at L-inf 0.3 on
mnist-10k, ``advlab.eval.evaluate`` gives a robust accuracy no higher than torchattacks'
``AutoAttack(version="standard")`` on the same images, in no more wall time.

1. The model: an advlab checkpoint (``--checkpoint``), or a LeNet-5 trained here with Madry et al.'s
   PGD adversarial training through ``advlab.train.fit`` (``batch_transform`` replaces every batch
   by its PGD adversarials: L-inf, random start, ``--train-steps`` steps of ``--train-alpha``).
   A LeNet-5 is small: trained at eps 0.3 from the first step it stays at chance, so the first
   ``--warmup`` epochs are clean and eps then ramps linearly (per batch) to 0.3 over ``--ramp``
   epochs, the alpha scaled with it; the output says so. Its clean accuracy and PGD-40 robust
   accuracy (alpha 0.01, random start) are printed for the whole test split and the first ``--n``.
2. On the first ``--n`` test images: ``advlab.eval.evaluate(model, x, y, norm="inf", eps=0.3,
   seed=0)`` with its standard settings (masking checks, APGD-CE with 100 steps, APGD-T with 100
   steps against the 9 highest wrong classes, Square with 5000 queries, each stage on what the
   earlier ones left), and ``torchattacks.AutoAttack(model, norm="Linf", eps=0.3,
   version="standard", n_classes=10, seed=0)`` (APGD-CE, APGD-T against 9 targets, FAB-T, Square
   5000; note that torchattacks' APGD, APGD-T and FAB default to 10 steps where the reference
   AutoAttack uses 100). Both are timed by the wall clock with the same thread count, ``--rounds``
   times each in ABBA order (advlab, torchattacks, torchattacks, advlab, ...) and summed, so a
   drift of a shared machine's speed cancels; the time of one plain forward+backward of the batch
   (the input gradient, what one attack step costs) is measured just before each run, so the
   drift shows. torchattacks' robust accuracy is recomputed by classifying its adversarials with
   the model, after checking they lie in the eps ball and in [0, 1] (one outside counts as the
   clean image). The images robust under one battery but broken by the other are listed, with
   which of torchattacks' attacks breaks each alone.

    python benchmarks/evaluate.py                                   # trains first (about 20 epochs)
    python benchmarks/evaluate.py --save-checkpoint /tmp/lenet_at.pt
    python benchmarks/evaluate.py --checkpoint /tmp/lenet_at.pt --n 200
    python benchmarks/evaluate.py --checkpoint /tmp/lenet_at.pt --steps 20   # twice torchattacks' step count
    python benchmarks/evaluate.py --checkpoint /tmp/lenet_at.pt --targets 3  # fewer APGD-T targets
    python benchmarks/evaluate.py --checkpoint /tmp/lenet_at.pt --ta-steps 100 --rounds 1  # both at the reference's budgets
    python benchmarks/evaluate.py --checkpoint /tmp/lenet_at.pt --norm 2 --n 200 --ta-steps 100 --rounds 1  # L2 eps 2
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("ADVLAB_QUIET", "1")

import advlab  # noqa: E402
from advlab._util import AdvlabError, frozen_eval  # noqa: E402

EPS = 0.3  # the training eps (L-inf), and the attack eps at L-inf unless --eps says otherwise
#: the threat model the batteries attack (set from --norm / --eps in main)
NORM, ATTACK_EPS = "inf", EPS
TOL = 1e-6  # float slack on the eps ball and the box


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="advlab checkpoint of the adversarially trained LeNet-5 (default: train one)")
    p.add_argument("--save-checkpoint", help="where to save the model trained here, for later runs")
    p.add_argument("--data-root", default=None,
                   help="folder holding mnist-10k/ (or the mnist-10k folder itself); default $ADVLAB_SHARED_DATA, "
                        "else ../shared/data")
    p.add_argument("--n", type=int, default=500, help="images evaluated (from the start of the test split)")
    p.add_argument("--norm", default="inf", choices=["inf", "2"],
                   help="the attacks' norm (the model is trained at L-inf either way; 2: an L-inf-trained model "
                        "attacked at L2, where gradients mislead and FAB-T and Square matter)")
    p.add_argument("--eps", type=float, default=None, help="the attacks' eps (default 0.3 at L-inf, 2.0 at L2)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, for both batteries")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--others", default="torchattacks", help="'torchattacks' (default) or 'none'")
    p.add_argument("--seed", type=int, default=0, help="seed of the training and of both batteries")
    p.add_argument("--steps", type=int, default=100, help="advlab's APGD iterations (100: the reference AutoAttack; "
                   "10: torchattacks' default, for a like-for-like time)")
    p.add_argument("--ta-steps", type=int, default=None, help="iterations of torchattacks' APGD, APGD-T and FAB-T "
                   "(default: its own, 10; 100 gives the reference AutoAttack's budgets)")
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each battery, in ABBA order (default 2)")
    p.add_argument("--targets", type=int, default=None, help="advlab's APGD-T target classes (default: evaluate's)")
    g = p.add_argument_group("adversarial training (when no --checkpoint is given)")
    g.add_argument("--epochs", type=int, default=20, help="training epochs in all, warm-up and ramp included")
    g.add_argument("--warmup", type=int, default=1, help="clean epochs first")
    g.add_argument("--ramp", type=int, default=6, help="epochs over which eps rises linearly from 0 to 0.3")
    g.add_argument("--train-steps", type=int, default=10, help="PGD steps per training batch")
    g.add_argument("--train-alpha", type=float, default=0.05, help="PGD step at eps 0.3 (scaled with eps in the ramp)")
    g.add_argument("--lr", type=float, default=3e-3, help="Adam (peak) learning rate")
    g.add_argument("--schedule", default="onecycle", help="learning-rate schedule of advlab.train.fit")
    g.add_argument("--batch-size", type=int, default=64, help="training batch size")
    return p.parse_args(argv)


def mnist_folder(data_root):
    """The mnist-10k folder: --data-root (the shared root or the folder itself), else
    advlab.data.shared_data_root's default ($ADVLAB_SHARED_DATA, then ../shared/data)."""
    from advlab.data import shared_data_root, shared_folder

    if data_root is not None and (Path(data_root) / "t10k-images-idx3-ubyte.gz").is_file():
        return Path(data_root)
    try:
        return shared_folder(shared_data_root(data_root), "mnist")
    except AdvlabError as e:
        sys.exit(str(e))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the model

class MadryBatches:
    """``batch_transform`` for ``advlab.train.fit``: each batch replaced by its PGD adversarials
    (Madry et al. 2018), after ``warmup`` clean epochs and a linear eps ramp over ``ramp`` epochs."""

    def __init__(self, model, batches_per_epoch, eps, steps, alpha, warmup, ramp, seed):
        self.model, self.nb, self.eps, self.steps, self.alpha = model, batches_per_epoch, eps, steps, alpha
        self.warmup, self.ramp, self.seed = warmup, ramp, seed
        self.batch = 0
        self.last_eps = 0.0

    def eps_at(self, b):
        epoch = b / self.nb  # fractional epochs done before this batch
        if epoch < self.warmup:
            return 0.0
        if self.ramp <= 0:
            return self.eps
        return self.eps * min(1.0, (epoch - self.warmup + 1 / self.nb) / self.ramp)

    def __call__(self, x, y):
        from advlab.attacks import PGD

        eps = self.eps_at(self.batch)
        self.batch += 1
        self.last_eps = eps
        if eps == 0:
            return x, y
        atk = PGD(self.model, eps=eps, alpha=self.alpha * eps / self.eps, steps=self.steps, random_start=True,
                  seed=self.seed * 1_000_003 + self.batch)
        return atk(x, y), y


def pgd40(model, x, y, device, batch_size=500):
    from advlab.attacks import PGD

    atk = PGD(model, eps=EPS, alpha=0.01, steps=40, random_start=True, seed=0)
    ok = []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i: i + batch_size].to(device), y[i: i + batch_size].to(device)
        with torch.no_grad():
            ok.append((model(atk(xb, yb)).argmax(1) == yb).cpu())
    return torch.cat(ok)


def get_model(args, device, test):
    from advlab.data import load_dataset
    from advlab.models import build_model
    from advlab.train import fit, load_checkpoint, save_checkpoint

    if args.checkpoint:
        model, meta = load_checkpoint(args.checkpoint, device=device)
        print(f"model: {args.checkpoint}" + (f" ({meta['training']})" if "training" in meta else ""))
        return model.eval()
    train = load_dataset("mnist", mnist_folder(args.data_root), "train")
    nb = math.ceil(len(train) / args.batch_size)
    model = build_model("lenet5", 10, (1, 28, 28), mean=0.1307, std=0.3081, seed=args.seed).to(device)
    adv = MadryBatches(model, nb, EPS, args.train_steps, args.train_alpha, args.warmup, args.ramp, args.seed)
    training = (f"Madry PGD adversarial training, L-inf eps {EPS}: PGD-{args.train_steps} with random start, alpha "
                f"{args.train_alpha} (scaled with eps in the ramp), adversarials only; {args.warmup} clean warm-up "
                f"epoch(s), then eps ramped linearly per batch from 0 to {EPS} over {args.ramp} epoch(s); "
                f"{args.epochs} epochs in all, Adam lr {args.lr:g}, schedule {args.schedule}, batch "
                f"{args.batch_size}, seed {args.seed}")
    print(f"training a LeNet-5 on {len(train)} mnist-10k images (use --checkpoint to skip): {training}", flush=True)
    x_probe, y_probe = test.images[:500], test.labels[:500]

    def report(epoch, m, model):
        with torch.no_grad():
            clean = float((model(x_probe.to(device)).argmax(1).cpu() == y_probe).float().mean())
        rob = float(pgd40(model, x_probe, y_probe, device).float().mean())
        print(f"  epoch {epoch:3d}: eps {adv.last_eps:.3f}, loss {m['loss']:.4f}, train acc {m['train_acc']:.4f}, "
              f"first 500 test: clean {clean:.4f}, PGD-40 {rob:.4f} ({m['seconds']:.0f} s)", flush=True)

    t0 = time.perf_counter()
    fit(model, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        schedule=None if args.schedule == "none" else args.schedule, seed=args.seed, device=device, progress=False,
        batch_transform=adv, callbacks=[report])
    print(f"trained in {time.perf_counter() - t0:.0f} s")
    if args.save_checkpoint:
        save_checkpoint(model, args.save_checkpoint, dataset="mnist-10k", training=training)
        print(f"saved {args.save_checkpoint}")
    return model.eval()


# --------------------------------------------------------------------------- timing

def time_plain_step(model, x, y, device, reps=5):
    """Median seconds of one forward+backward of the batch w.r.t. the input (parameters frozen)."""
    times = []
    with frozen_eval(model):
        for i in range(reps + 2):
            sync(device)
            t0 = time.perf_counter()
            xr = x.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_torchattacks(model, x, y, device, seed, steps=None):
    """(AutoAttack instance, adversarials, seconds), or a string saying why it did not run.
    ``steps``: the iterations of its APGD, APGD-T and FAB-T (None: torchattacks' default, 10)."""
    try:
        import torchattacks
    except Exception as e:  # ImportError, or a broken torchvision under it
        return f"torchattacks not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        atk = torchattacks.AutoAttack(model, norm="Linf" if NORM == "inf" else "L2", eps=ATTACK_EPS,
                                      version="standard", n_classes=10, seed=seed)
        if steps is not None:
            for sub in atk._autoattack.attacks:
                if hasattr(sub, "steps"):
                    sub.steps = steps
        with torch.random.fork_rng(devices=[]):  # it seeds torch's global RNG
            sync(device)
            t0 = time.perf_counter()
            x_adv = atk(x, y)
            sync(device)
            seconds = time.perf_counter() - t0
    except Exception as e:  # another library's failure must not stop the benchmark
        return f"torchattacks AutoAttack failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    model.eval()
    return atk, x_adv.detach().to(x.dtype), seconds


def ta_stage_names(atk):
    names = []
    for sub in atk._autoattack.attacks:
        name = type(sub).__name__
        names.append(f"{name}-T" if name == "FAB" and getattr(sub, "multi_targeted", False) else name)
    return names


def ta_breakers(atk, model, x, y):
    """For each image, the names of torchattacks' AutoAttack stages that break it when run alone."""
    out = [[] for _ in range(x.shape[0])]
    for name, sub in zip(ta_stage_names(atk), atk._autoattack.attacks):
        with torch.random.fork_rng(devices=[]):
            xa = sub(x, y)
        model.eval()
        xa = in_ball(x, xa.detach().to(x.dtype))[0]
        with torch.no_grad():
            broke = model(xa).argmax(1) != y
        for i in broke.nonzero().flatten().tolist():
            out[i].append(name)
    return out


def in_ball(x, x_adv):
    """x_adv where it lies in the eps ball and [0, 1] (else x), the number outside, the largest L-inf."""
    diff = (x_adv - x).flatten(1)
    d = diff.abs().amax(1) if NORM == "inf" else diff.norm(dim=1)
    box = (x_adv.flatten(1).amin(1) >= -TOL) & (x_adv.flatten(1).amax(1) <= 1 + TOL)
    ok = (d <= ATTACK_EPS + 1e-4 * max(1.0, ATTACK_EPS)) & box
    return torch.where(ok.view(-1, 1, 1, 1), x_adv, x), int((~ok).sum()), float(d.max())


# --------------------------------------------------------------------------- main

def main(argv=None):
    global NORM, ATTACK_EPS
    args = parse_args(argv)
    NORM = "inf" if args.norm in ("inf", "linf", "Linf") else "2"
    ATTACK_EPS = args.eps if args.eps is not None else (EPS if NORM == "inf" else 2.0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from advlab.data import load_dataset
    from advlab.eval import evaluate

    test = load_dataset("mnist", mnist_folder(args.data_root), "test")
    model = get_model(args, device, test)
    with torch.no_grad():
        clean_all = float((model(test.images.to(device)).argmax(1).cpu() == test.labels).float().mean())
    rob_all = pgd40(model, test.images, test.labels, device)
    x = test.images[: args.n].to(device)
    y = test.labels[: args.n].to(device)
    n = x.shape[0]
    print(f"\nadvlab {advlab.__version__}, torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"model on the whole test split ({len(test)} images): clean accuracy {clean_all:.4f}, "
          f"PGD-40 (eps {EPS}, alpha 0.01, random start) robust accuracy {float(rob_all.float().mean()):.4f}; "
          f"on the first {n}: PGD-40 {float(rob_all[:n].float().mean()):.4f}")

    # ---- both batteries, in ABBA order over --rounds (a drift of a shared machine's speed cancels)
    others = [s.strip() for s in args.others.split(",") if s.strip() and s.strip() != "none"]
    extra = {} if args.targets is None else {"targets": args.targets}
    runs_a, runs_t, atk = [], [], None  # atk: torchattacks' AutoAttack, once it has run
    skip_ta = "torchattacks" not in others
    for r in range(args.rounds):
        order = ("advlab", "torchattacks") if r % 2 == 0 else ("torchattacks", "advlab")
        for who in order:
            if who == "advlab":
                unit = time_plain_step(model, x, y, device)
                sync(device)
                t0 = time.perf_counter()
                res = evaluate(model, x, y, norm=NORM, eps=ATTACK_EPS, seed=args.seed, steps=args.steps, progress=False,
                               **extra)
                sync(device)
                runs_a.append((time.perf_counter() - t0, unit, res))
            elif not skip_ta:
                unit = time_plain_step(model, x, y, device)
                out = run_torchattacks(model, x, y, device, args.seed, args.ta_steps)
                if isinstance(out, str):
                    print(f"[torchattacks] {out}: skipped")
                    skip_ta = True
                else:
                    atk = out[0]
                    runs_t.append((out[2], unit, out[1]))
    sec_a = sum(r[0] for r in runs_a)
    unit_a = statistics.mean(r[1] for r in runs_a)
    res = runs_a[0][2]
    same_a = all(torch.equal(torch.as_tensor(r[2].x_adv), torch.as_tensor(res.x_adv)) for r in runs_a)
    robust_a = torch.tensor([s == "robust" for s in res.status])
    _, out_a, linf_a = in_ball(x.cpu(), res.x_adv.cpu())
    stage_s = ", ".join(f"{k} {v:.1f}" for k, v in res.seconds.items() if k != "total")
    ta = bool(runs_t) and not skip_ta  # torchattacks ran in every round
    if ta:
        xt, sec_t = runs_t[0][2], sum(r[0] for r in runs_t)
        unit_t = statistics.mean(r[1] for r in runs_t)
        same_t = all(torch.equal(r[2], runs_t[0][2]) for r in runs_t)

    print(f"\n{n} images (first of the test split), L{'-inf' if NORM == 'inf' else '2'} eps {ATTACK_EPS}, "
          f"clean accuracy {res.clean_accuracy:.4f}")
    print(f"unit = one plain forward+backward of the {n} images w.r.t. the input, measured just before each battery; "
          f"seconds and units: {args.rounds} round(s) in ABBA order, summed / averaged")
    print("  advlab runs (s): " + ", ".join(f"{r[0]:.1f} (unit {1e3 * r[1]:.1f} ms)" for r in runs_a)
          + ("" if same_a else "  [adversarials differ between runs]"))
    if ta:
        print("  torchattacks runs (s): " + ", ".join(f"{r[0]:.1f} (unit {1e3 * r[1]:.1f} ms)" for r in runs_t)
              + ("" if same_t else "  [adversarials differ between runs]"))
    print()
    print(f"{'battery / stage':<52} {'robust acc':>10} {'seconds':>8} {'unit ms':>8}")
    print(f"{'clean':<52} {res.clean_accuracy:10.4f}")
    for name, acc in res.per_attack.items():
        s = res.seconds.get(name)
        print(f"{'  advlab after ' + name:<52} {acc:10.4f} {s if s is not None else float('nan'):8.1f}")
    label = f"advlab evaluate (checks, APGD-CE/T, FAB-T {args.steps} steps, Square)"
    if args.targets is not None:
        label = f"advlab evaluate (APGD-CE/T, FAB-T {args.steps}, {args.targets} targets, Square)"
    print(f"{label:<52} {res.robust_accuracy:10.4f} {sec_a:8.1f} {1e3 * unit_a:8.1f}")
    if ta:
        xt_ok, out_t, linf_t = in_ball(x, xt)
        with torch.no_grad():
            robust_t = (model(xt_ok).argmax(1) == y).cpu()
        acc_t = float(robust_t.float().mean())
        label = f"torchattacks AutoAttack ({', '.join(ta_stage_names(atk))}" + \
            (f", {args.ta_steps} steps)" if args.ta_steps else ")")
        print(f"{label:<52} {acc_t:10.4f} {sec_t:8.1f} {1e3 * unit_t:8.1f}")
        print(f"\nrobust accuracy advlab - torchattacks: {round(res.robust_accuracy - acc_t, 6) + 0.0:+.4f} "
              f"({int(robust_a.sum())} vs {int(robust_t.sum())} robust images)")
        print(f"wall time ratio advlab / torchattacks: {sec_a / sec_t:.2f} "
              f"(normalised by each one's unit: {(sec_a / unit_a) / (sec_t / unit_t):.2f})")
    print(f"advlab stage seconds (first run): {stage_s}")
    if res.flags:
        print("advlab flags: " + "; ".join(f"{f.name}: {f.message}" for f in res.flags))
    else:
        print("advlab flags: none")
    for note in res.notes:
        print(f"advlab note: {note}")
    dist = "L-inf" if NORM == "inf" else "L2"
    print(f"advlab adversarials: max {dist} {linf_a:.6f}, {out_a} outside the ball or [0, 1]")
    if not ta:
        return 0
    print(f"torchattacks adversarials: max {dist} {linf_t:.6f}, {out_t} outside the ball or [0, 1] "
          f"(counted as the clean image)")

    only_a = (robust_a & ~robust_t).nonzero().flatten().tolist()  # advlab missed what torchattacks broke
    only_t = (robust_t & ~robust_a).nonzero().flatten().tolist()
    print(f"\nper-sample disagreements: {len(only_a)} robust under advlab but broken by torchattacks, "
          f"{len(only_t)} robust under torchattacks but broken by advlab")
    if only_a:
        idx = torch.tensor(only_a, device=device)
        breakers = ta_breakers(atk, model, x[idx], y[idx])
        with torch.no_grad():
            logits = model(xt_ok[idx])
        for j, i in enumerate(only_a):
            margin = float(logits[j, y[i]] - logits[j].scatter(0, y[i].view(1), float("-inf")).max())
            print(f"  image {i}: label {int(y[i])}, torchattacks' adversarial classified {int(logits[j].argmax())} "
                  f"(margin {margin:+.3f}); broken alone by: {', '.join(breakers[j]) or 'none of its stages'}")
    if only_t:
        print(f"  images broken only by advlab: {only_t[:40]}{' ...' if len(only_t) > 40 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
