"""``advlab defend NAME``: build a defended model from a trained checkpoint and write its report.

The defense names are those of :data:`advlab.defenses.DEFENSES`; each has a builder here that
fits it, saves it through the one checkpoint path, and evaluates it on the runner under the
transfer threat model and a full-knowledge one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from torch import nn

from .._util import AdvlabError, check_device, check_positive_int
from ..data import load_dataset, split_validation
from ..defenses import DEFENSES, defense_class
from ..train import evaluate, load_checkpoint, read_checkpoint, save_checkpoint
from .report import Report
from .runner import AttackRun, pick_images, rejudge, result_row, run_attacks, worst_case


def run_defense(args):
    """Dispatch on ``args.defense``; returns the saved Report."""
    defense_class(args.defense)  # unknown names and bad numbers fail before any data is read
    check_positive_int(args.n, "--n")
    if args.epochs is not None:
        check_positive_int(args.epochs, "--epochs", 0)
    if args.device is not None:
        check_device(args.device, "--device")
    meta = read_checkpoint(args.checkpoint)["metadata"]
    dataset = args.dataset or meta.get("dataset")
    if not dataset:
        raise AdvlabError("--dataset is required (the checkpoint does not name one)")
    train = load_dataset(dataset, root=args.root, split="train")
    test = load_dataset(dataset, root=args.root, split="test")
    builder = BUILDERS.get(args.defense)
    if builder is None:
        raise AdvlabError(f"defense {args.defense!r} ({DEFENSES[args.defense].description}) has no "
                          "`advlab defend` builder yet; use its Python API")
    opts = {} if args.epochs is None else {EPOCHS_OPTION.get(args.defense, "epochs"): args.epochs}
    return builder(args.checkpoint, train, test, args.out, n=args.n, seed=args.seed, device=args.device,
                   progress=False if args.quiet else None, **opts)


def defend_msvdd(checkpoint, train_ds, test_ds, out_dir, projections: int = 256, svdd_epochs: int = 10,
                 positive_epochs: Optional[int] = None, finetune_epochs: int = 5, head: Optional[str] = None,
                 goal: str = "defense", max_accuracy_drop: float = 0.03, val_fraction: float = 0.15, n: int = 500,
                 eps: Optional[float] = None, pgd_steps: int = 40, full_knowledge: bool = True, seed: int = 0,
                 device=None, progress: Optional[bool] = None) -> Report:
    """``advlab defend msvdd``: defend a trained classifier and report.

    ``checkpoint`` is a checkpoint path (advlab.train.save_checkpoint) or an ``nn.Module``. The
    defense is fitted on ``train_ds`` minus a ``val_fraction`` validation split that tunes beta
    (``goal`` "defense" -> O_d, "classification" -> O_c). Writes ``out_dir/msvdd.pt`` (load with
    :meth:`MSVDDDefense.load`), ``out_dir/surrogate.pt`` (W~-LC checkpoint) and a report with the
    accuracies and L-inf PGD (``eps``: 0.3 for one channel, 8/255 otherwise) crafted on W~-LC
    and, with ``full_knowledge``, run on the defended model itself, with the F/D split and the
    per-sample worst case of the two."""
    from ..adaptive.msvdd import MSVDDFullKnowledge
    from ..attacks import PGD
    from ..defenses import MSVDDDefense

    if goal not in ("defense", "classification"):
        raise AdvlabError(f"goal must be 'classification' or 'defense', got {goal!r}")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    model, meta = (checkpoint, {}) if isinstance(checkpoint, nn.Module) else load_checkpoint(checkpoint, device=device)
    model.eval()
    fit_set, val_set = split_validation(train_ds, val_fraction, seed)
    defense = MSVDDDefense.fit(model, fit_set, projections=projections, svdd_epochs=svdd_epochs,
                               positive_epochs=positive_epochs, finetune_epochs=finetune_epochs, head=head, seed=seed,
                               device=device, progress=progress)
    t_fit = time.perf_counter() - t0
    tune_c = defense.tune_beta(val_set, goal="classification")
    acc_c = evaluate(defense, test_ds)
    tune_d = defense.tune_beta(val_set, goal="defense", max_accuracy_drop=max_accuracy_drop)
    acc_d = evaluate(defense, test_ds)
    chosen = tune_d if goal == "defense" else tune_c
    defense.set_beta(chosen["beta"])
    source = None if isinstance(checkpoint, nn.Module) else str(checkpoint)
    defense.save(out_dir / "msvdd.pt", source_checkpoint=source, beta_goal=goal, beta_O_c=tune_c["beta"],
                 beta_O_d=tune_d["beta"])
    save_checkpoint(defense.surrogate, out_dir / "surrogate.pt", role="W~-LC surrogate of M-SVDD-D")
    eps = (0.3 if test_ds.images.shape[1] == 1 else 8 / 255) if eps is None else float(eps)
    x, y = pick_images(defense.surrogate, test_ds, n, only_correct=True, seed=seed)
    sur = defense.surrogate
    ev = run_attacks([AttackRun(f"PGD L-inf {eps:g}", PGD(sur, eps=eps, alpha=2.5 * eps / pgd_steps, steps=pgd_steps,
                                                         seed=seed), "transfer")], x, y, progress=progress)
    transfer = rejudge(next(iter(ev.results.values())), x, defense.predict)
    rows = [dict(ev.rows[0], attack=ev.rows[0]["attack"] + " (on W~-LC itself)")]
    rows.append(result_row(f"PGD L-inf {eps:g}", transfer, x, "transfer from W~-LC"))
    results = [transfer]
    if full_knowledge:
        fk = MSVDDFullKnowledge(defense, eps=eps, steps=max(pgd_steps, 50), seed=seed)
        fev = run_attacks([AttackRun(f"full-knowledge PGD L-inf {eps:g}", fk, "full-knowledge")], x, y,
                          judge=defense.predict, progress=progress)
        rows += fev.rows
        results += list(fev.results.values())
        rows.append(result_row("worst case", worst_case(results), threat="adaptive (per-sample worst)"))
    rep = Report(out_dir, "M-SVDD-D defense", spec={"checkpoint": source or type(checkpoint).__name__,
                                                    "projections": projections, "svdd_epochs": svdd_epochs,
                                                    "finetune_epochs": finetune_epochs, "goal": goal,
                                                    "max_accuracy_drop": max_accuracy_drop, "n": n, "eps": eps,
                                                    "seed": seed}, seed=seed)
    acc = {"W-LC": evaluate(model, test_ds), "W~-LC": evaluate(sur, test_ds), "W~-SVDD (beta=O_c)": acc_c,
           "W~-SVDD (beta=O_d)": acc_d}
    rep.add_text(f"Defended `{meta.get('model', {}).get('name', type(model).__name__)}` with M-SVDD-D "
                 f"(M={projections}); beta=O_c={tune_c['beta']:.2f}, beta=O_d={tune_d['beta']:.2f}; the saved "
                 f"model uses beta={chosen['beta']:.2f} ({goal}). Files: msvdd.pt (the defense), surrogate.pt (W~-LC).")
    rep.add_table("Test accuracy (%)", [{k: 100 * v for k, v in acc.items()}])
    rep.add_table("Attacks (rates over the clean-correct images)", rows,
                  ["attack", "threat model", "n", "clean_acc", "robust_acc", "asr", "failed", "detected", "mean_l2",
                   "ssim", "seconds"],
                  note="PGD is crafted on W~-LC (transfer, the paper's threat model); the full-knowledge attack "
                       "runs on the defended model itself; the worst case counts a sample as broken if either "
                       "attack made the defense accept a wrong class.")
    rep.results.update({"accuracy": acc, "tuning": {"O_c": tune_c["beta"], "O_d": tune_d["beta"]}, "attacks": rows,
                        "fit_seconds": t_fit})
    rep.time("total", time.perf_counter() - t0)
    rep.save()
    return rep


def defend_pcl(*args, **kwargs) -> Report:
    """``advlab defend pcl``: see :func:`advlab.eval.repro_pcl.defend_pcl`."""
    from .repro_pcl import defend_pcl as run

    return run(*args, **kwargs)


def defend_idefender(*args, **kwargs) -> Report:
    """``advlab defend idefender``: see :func:`advlab.eval.repro_idefender.defend_idefender`."""
    from .repro_idefender import defend_idefender as run

    return run(*args, **kwargs)


def defend_vib(*args, **kwargs) -> Report:
    """``advlab defend vib``: see :func:`advlab.eval.repro_vib.defend_vib`."""
    from .repro_vib import defend_vib as run

    return run(*args, **kwargs)


#: ``advlab defend NAME`` builders, keyed by the DEFENSES registry's names
BUILDERS = {"msvdd": defend_msvdd, "pcl": defend_pcl, "idefender": defend_idefender, "vib": defend_vib}
#: the builder option that ``--epochs`` sets
EPOCHS_OPTION = {"msvdd": "svdd_epochs"}
