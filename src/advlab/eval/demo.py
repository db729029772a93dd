"""``advlab demo``: train a small model, attack it, defend it, write a report — the whole library
in a few minutes on a laptop CPU (embedded 8x8 digits by default, no download)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional

import torch

from .._util import AdvlabError
from ..data import load_dataset
from ..models import build_model
from ..train import accuracy, fit, resolve_device, save_checkpoint
from .figures import example_grid, training_curve
from .report import Report, markdown_table
from .runner import AttackRun, pick_images, run_attacks

#: per dataset: model, epochs, lr, eps for the L-inf attacks, number of test images attacked
SETTINGS = {
    "digits": {"model": "lenet5", "epochs": 30, "lr": 3e-3, "batch_size": 32, "eps": 0.2, "n": 300},
    "mnist": {"model": "lenet5", "epochs": 5, "lr": 3e-3, "batch_size": 32, "eps": 0.3, "n": 500},
    "fashion-mnist": {"model": "lenet5", "epochs": 5, "lr": 3e-3, "batch_size": 32, "eps": 0.1, "n": 500},
}

COLUMNS = ["attack", "threat model", "n", "clean_acc", "robust_acc", "asr", "failed", "detected", "mean_l2",
           "mean_linf", "ssim", "mse", "seconds"]


def demo_attacks(model, eps: float, quick: bool) -> Dict[str, object]:
    """The demo's attack set: FGSM, PGD, C&W L2, DeepFool and 5-A3."""
    from .. import attacks as A

    steps = 10 if quick else 40
    return {
        "FGSM": A.FGSM(model, eps=eps),
        "PGD": A.PGD(model, eps=eps, alpha=eps / 10 if not quick else eps / 4, steps=steps, seed=0),
        "C&W L2": A.CarliniWagnerL2(model, steps=30 if quick else 100, binary_search_steps=3 if quick else 5),
        "DeepFool": A.DeepFool(model, steps=50),
        "5-A3": A.KA3(model, K=5, seed=0, **({"steps": 50} if quick else {})),
    }


def run_demo(out_dir="results/demo", dataset: str = "digits", root=None, quick: bool = False, device=None,
             progress: Optional[bool] = None, seed: int = 0) -> dict:
    """Train, attack and defend; write the report folder. Returns {"path", "table", "report"}."""
    if dataset not in SETTINGS:
        raise AdvlabError(f"demo dataset must be one of {', '.join(SETTINGS)}, got {dataset!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AdvlabError(f"seed must be an integer, got {seed!r}")
    device = resolve_device(device)  # an unknown or absent device fails before the training
    cfg = dict(SETTINGS[dataset])
    if quick:
        cfg["n"] = min(cfg["n"], 100)
    t0 = time.perf_counter()
    train = load_dataset(dataset, root=root, split="train")
    test = load_dataset(dataset, root=root, split="test")
    mean, std = train.channel_stats()
    model = build_model(cfg["model"], train.num_classes, train.in_shape, mean=mean, std=std, seed=seed)
    model.to(resolve_device(device))
    hist = fit(model, train, epochs=cfg["epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"], schedule="onecycle",
               seed=seed, eval_dataset=test, progress=progress, desc="demo train")
    clean_acc = accuracy(model, test)
    rep = Report(out_dir, f"advlab demo ({dataset})", spec={"dataset": dataset, "quick": quick, **cfg}, seed=seed)
    rep.time("train", sum(e["seconds"] for e in hist.epochs))
    rep.add_text(f"{cfg['model']} trained on `{dataset}` ({len(train)} images, {cfg['epochs']} epochs): "
                 f"clean test accuracy **{clean_acc:.4f}** on {len(test)} test images.")
    rep.add_table("Training", hist.epochs, ["epoch", "loss", "train_acc", "test_acc", "seconds"])
    rep.add_figure("training", training_curve(hist, f"{cfg['model']} on {dataset}"), "training curve")
    rep.results["clean_accuracy"] = clean_acc

    x, y = pick_images(model, test, cfg["n"], seed=seed)
    attacks = demo_attacks(model, cfg["eps"], quick)
    ev = run_attacks([AttackRun(n, a) for n, a in attacks.items()], x, y, progress=progress)
    rows, results = ev.rows, ev.results
    budget = {"FGSM": f"L-inf {cfg['eps']}", "PGD": f"L-inf {cfg['eps']}", "C&W L2": "min-L2",
              "DeepFool": "min-L2", "5-A3": "K-anonymity"}
    for r in rows:
        r["threat model"] = f"white-box {budget[r['attack']]}"
    rows.append(msvdd_row(model, train, x, y, eps=cfg["eps"], quick=quick, seed=seed))
    rep.add_table("Attacks and defenses", rows, COLUMNS,
                  note="ASR splits into success / failed / detected over the images classified correctly when "
                       "clean. Norms, SSIM and MSE are over successful adversarials.")
    rep.add_figure("examples", example_grid(x[:8], {k: v.adversarials[:8] for k, v in results.items()},
                                            labels=[str(int(v)) for v in y[:8]]),
                   "clean / adversarial / perturbation x10 (K-A3 Fig. 2 layout)")
    _ka3_figure(rep, results.get("5-A3"), train.num_classes)
    save_checkpoint(model, Path(out_dir) / "model.pt", dataset=dataset, test_accuracy=clean_acc)
    rep.time("total", time.perf_counter() - t0)
    path = rep.save()
    return {"path": path, "table": markdown_table(rows, COLUMNS), "report": rep}


def msvdd_row(model, train, x: torch.Tensor, y: torch.Tensor, eps: float, quick: bool = False, seed: int = 0,
              projections: int = 64) -> Dict[str, object]:
    """The demo's M-SVDD-D row: fit the defense on ``train`` (15% held out to tune beta = O_d),
    craft L-inf PGD (``eps``) on the surrogate W~-LC and judge it with the defended model (the
    paper's transfer threat model). Under 10 s on the 8x8 digits on one CPU core."""
    from ..attacks import PGD
    from ..data import split_validation
    from ..defenses import MSVDDDefense

    t0 = time.perf_counter()
    fit_set, val_set = split_validation(train, 0.15, seed)
    defense = MSVDDDefense.fit(model, fit_set, projections=projections, svdd_epochs=4 if quick else 10,
                               positive_epochs=4 if quick else 10, finetune_epochs=3 if quick else 5, seed=seed,
                               progress=False)
    beta = defense.tune_beta(val_set, goal="defense")["beta"]
    steps = 10 if quick else 40
    run = AttackRun("PGD -> M-SVDD-D", PGD(defense.surrogate, eps=eps, alpha=2.5 * eps / steps, steps=steps,
                                            seed=seed), threat="transfer")
    row = run_attacks([run], x, y, judge=defense.predict, progress=False).rows[0]
    row["threat model"] = f"transfer from W~-LC, L-inf {eps}, beta=O_d={beta:.2f}"
    row["seconds"] = time.perf_counter() - t0
    return row


def _ka3_figure(rep, res, num_classes: int) -> None:
    if res is None or "rank" not in res.extras:
        return
    from ..metrics.anonymity import rank_pmf
    from .figures import rank_pmf_figure

    pmf = rank_pmf(res.extras["rank"], num_classes)
    rep.results["5-A3 rank pmf"] = pmf
    rep.add_figure("rank-pmf", rank_pmf_figure({"5-A3": pmf}), "rank of the true label after 5-A3 (K-A3 Fig. 4)")
