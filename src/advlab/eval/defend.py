"""``advlab defend NAME``: build a defended model from a trained checkpoint and write its report.

The defense names are those of :data:`advlab.defenses.DEFENSES`; each has a builder here that
fits it, saves it through the one checkpoint path, and evaluates it on the runner under the
transfer threat model and a full-knowledge one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from torch import nn

from .._util import AdvlabError, check_device, check_positive_int
from ..data import load_dataset, split_validation
from ..defenses import DEFENSES, defense_class
from ..metrics.bound import PAPER_KS
from ..train import accuracy, load_checkpoint, read_checkpoint, save_checkpoint
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
    model, meta, source = _classifier(checkpoint, device)
    fit_set, val_set = split_validation(train_ds, val_fraction, seed)
    defense = MSVDDDefense.fit(model, fit_set, projections=projections, svdd_epochs=svdd_epochs,
                               positive_epochs=positive_epochs, finetune_epochs=finetune_epochs, head=head, seed=seed,
                               device=device, progress=progress)
    t_fit = time.perf_counter() - t0
    tune_c = defense.tune_beta(val_set, goal="classification")
    acc_c = accuracy(defense, test_ds)
    tune_d = defense.tune_beta(val_set, goal="defense", max_accuracy_drop=max_accuracy_drop)
    acc_d = accuracy(defense, test_ds)
    chosen = tune_d if goal == "defense" else tune_c
    defense.set_beta(chosen["beta"])
    defense.save(out_dir / "msvdd.pt", source_checkpoint=source, beta_goal=goal, beta_O_c=tune_c["beta"],
                 beta_O_d=tune_d["beta"])
    save_checkpoint(defense.surrogate, out_dir / "surrogate.pt", role="W~-LC surrogate of M-SVDD-D")
    eps = _default_eps(test_ds, eps)
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
    acc = {"W-LC": accuracy(model, test_ds), "W~-LC": accuracy(sur, test_ds), "W~-SVDD (beta=O_c)": acc_c,
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
    return _save(rep, t0, accuracy=acc, tuning={"O_c": tune_c["beta"], "O_d": tune_d["beta"]}, attacks=rows,
                 fit_seconds=t_fit)


def defend_pcl(checkpoint, train_ds, test_ds, out_dir, n: int = 500, seed: int = 0, device=None,
               progress: Optional[bool] = None, pc_epochs: int = 3, epochs: Optional[int] = None,
               warmup_epochs: int = 0, layers=None, preset: str = "paper", lr: float = 0.01, batch_size: int = 128,
               adversarial: Optional[str] = None, adv_eps=None, eps: Optional[float] = None, battery_steps: int = 100,
               square_queries: int = 1000, reading: str = "algorithm1") -> Report:
    """``advlab defend pcl``: train PCL (Algorithm 1's PC phase, ``pc_epochs``; ``epochs`` is an
    alias) from a trained classifier (a checkpoint path or an ``nn.Module``; the CE warm-up is the
    checkpoint itself unless ``warmup_epochs``), save it (``out_dir/pcl.pt``, load with
    :meth:`PCLDefense.load`) and report clean accuracy (logits and eq. 6) and one survivor chain at
    L-inf ``eps`` (0.3 for one channel, 8/255 otherwise): PGD-10 (the paper's protocol), then the
    :func:`advlab.eval.evaluate` battery, APGD-DLR and PGD-margin (``battery_steps`` steps each).
    ``reading="eq8"`` trains eq. 8's auxiliary branches (see :class:`PCLDefense`)."""
    from ..attacks import build_attack
    from ..defenses.pcl import PCLDefense
    from .checks import zero_gradient_fraction
    from .evaluate import evaluate
    from .runner import survivor_chain

    t0 = time.perf_counter()
    model, meta, source = _classifier(checkpoint, device)
    eps, gray = _default_eps(test_ds, eps), test_ds.images.shape[1] == 1
    defense = PCLDefense.fit(model, train_ds, layers=layers, preset=preset, warmup_epochs=warmup_epochs,
                             pc_epochs=int(epochs if epochs is not None else pc_epochs), lr=lr, batch_size=batch_size,
                             adversarial=adversarial, adv_eps=adv_eps or ((0.1, 0.5) if gray else (0.01, 0.05)),
                             seed=seed, device=device, progress=progress, reading=reading)
    t_fit = time.perf_counter() - t0
    defense.save(Path(out_dir) / "pcl.pt", source_checkpoint=source)
    x, y = pick_images(defense, test_ds, n, seed=seed)
    bat, m = [], battery_steps

    def battery(xs, ys):
        bat.append(evaluate(defense, xs, ys, eps=eps, seed=seed, steps=m, square_queries=square_queries, progress=False))
        return bat[-1].x_adv

    runs = [AttackRun("PGD-10 (paper protocol)", build_attack("pgd", defense, eps=eps, alpha=eps / 10, steps=10, seed=seed)),
            AttackRun("+ battery (APGD-CE, APGD-T, FAB-T, Square)", battery, "adaptive"),
            AttackRun("+ APGD-DLR", build_attack("apgd-dlr", defense, eps=eps, steps=m, seed=seed), "adaptive"),
            AttackRun("+ PGD-margin", build_attack("pgd", defense, eps=eps, alpha=2.5 * eps / m, steps=m, loss="margin",
                                                   seed=seed + 1), "adaptive")]
    chain = survivor_chain(runs, x, y, defense.predict, progress=progress)
    acc = {"input_model": accuracy(model, test_ds), "pcl_logits": accuracy(defense, test_ds),
           "pcl_eq6": float((defense.predict(test_ds.images, rule="prototype") == test_ds.labels).double().mean())}
    flags, zero = [f.to_dict() for f in bat[0].flags] if bat else [], zero_gradient_fraction(defense, x, y)
    rep = Report(out_dir, "PCL defense", spec={"checkpoint": source or type(model).__name__, "pc_epochs": pc_epochs,
                                               "preset": preset, "layers": defense.layers, "n": n, "eps": eps,
                                               "adversarial": adversarial, "seed": seed}, seed=seed)
    rep.add_text(f"Trained PCL on `{meta.get('model', {}).get('name', type(model).__name__)}`, supervised layers "
                 f"{', '.join(defense.layers)} (preset {preset}); file: pcl.pt. Exactly-zero CE input gradient on "
                 f"{100 * zero:.1f}% of the attacked images (a saturated softmax, which masks gradients).")
    rep.add_table("Test accuracy (%)", [{"before (input model)": 100 * acc["input_model"], "PCL (argmax of logits)":
                                         100 * acc["pcl_logits"], "PCL (eq. 6, nearest prototype)": 100 * acc["pcl_eq6"]}])
    rep.add_table(f"Robust accuracy on {x.shape[0]} test images, L-inf {eps:g} (%)",
                  [{"attack": r.name, "threat model": r.threat, "robust accuracy after it": 100 * chain.stages[r.name]}
                   for r in runs], note="Each attack runs on the images every earlier one failed on; the paper-protocol "
                  "number alone overstates robustness, the last row is the one to use.")
    if flags:
        rep.add_table("Gradient-masking flags", flags, ["name", "message", "meaning"])
    return _save(rep, t0, accuracy=acc, stages=chain.stages, robust_accuracy=chain.robust_accuracy, flags=flags,
                 zero_ce_gradient=zero, fit_seconds=t_fit, history=defense.history)


def _classifier(checkpoint, device):
    """(model in eval mode, checkpoint metadata, checkpoint path or None) of a path or an ``nn.Module``."""
    if isinstance(checkpoint, nn.Module):
        return checkpoint.eval(), {}, None
    model, meta = load_checkpoint(checkpoint, device=device)
    return model.eval(), meta, str(checkpoint)


def _default_eps(test_ds, eps: Optional[float]) -> float:
    return (0.3 if test_ds.images.shape[1] == 1 else 8 / 255) if eps is None else float(eps)


def _save(rep: Report, t0: float, **results) -> Report:
    rep.results.update(results)
    rep.time("total", time.perf_counter() - t0)
    rep.save()
    return rep


def rejection_rates(defense, x) -> Dict[str, float]:
    """Share of ``x`` that an I-defender rejects at each stored kept fraction (``{"ID-95": ...}``:
    on natural data, its false-positive rate); the active fraction is restored after."""
    from .. import REJECT

    out = {}
    for q in defense.keeps.tolist():
        defense.set_keep(q)
        out[f"ID-{round(100 * q)}"] = float((defense.predict(x) == REJECT).double().mean())
    defense.set_keep(float(defense.keeps[0]))
    return out


def defend_idefender(checkpoint, train_ds, test_ds, out_dir, n: int = 500, seed: int = 0, device=None,
                     progress: Optional[bool] = None, layers=None, components=(1, 2, 3, 4),
                     covariance=("full", "diag"), keeps=(0.95, 0.99), rule: str = "predicted",
                     pca: Optional[int] = None, eps: Optional[float] = None, steps: int = 50,
                     adaptive: bool = True, **_ignored) -> Report:
    """``advlab defend idefender``: fit I-defender on a trained classifier and report.

    ``checkpoint`` is a checkpoint path or an ``nn.Module``. Writes ``out_dir/idefender.pt`` (load
    with :meth:`IDefender.load`) and a report: clean accuracy and false-positive rate at each kept
    fraction, FGSM and PGD on the classifier (semi-white-box: the attacker ignores the detector)
    with the detector's AUC, and with ``adaptive`` the fully adaptive attack on the defense, each
    labelled with its threat model. Extra options (e.g. ``svdd_epochs`` from the CLI) are ignored."""
    from ..adaptive.idefender import IDefenderAdaptive
    from ..attacks import FGSM, PGD
    from ..defenses.idefender import IDefender
    from ..metrics.detection import detection_auc

    t0 = time.perf_counter()
    model, meta, source = _classifier(checkpoint, device)
    defense = IDefender.fit(model, train_ds, layers=layers, components=components, covariance=covariance,
                            keeps=keeps, rule=rule, pca=pca, seed=seed, device=device)
    defense.save(Path(out_dir) / "idefender.pt", source_checkpoint=source)
    eps = _default_eps(test_ds, eps)
    x, y = pick_images(model, test_ds, n, only_correct=True, seed=seed)
    s_nat = defense.detect(x)
    semi = "semi-white-box (classifier only)"
    runs = [(f"FGSM {eps:g}", FGSM(model, eps=eps), semi), (f"PGD {eps:g}", PGD(model, eps=eps, steps=steps, seed=seed),
                                                            semi)]
    if adaptive:
        runs.append((f"adaptive {eps:g}", IDefenderAdaptive(defense, eps=eps, steps=steps, seed=seed),
                     "white-box adaptive (full knowledge)"))
    rows = []
    for name, atk, threat in runs:
        res = atk.run((x, y), predict_fn=defense.predict, keep_adversarials=True, progress=progress)
        # the detector's AUC: on every adversarial, or on the adaptive attack's successes
        adv = res.adversarials[res.success & res.counted] if threat != semi else res.adversarials
        rows.append(dict(result_row(name, res, threat=threat),
                         auc=detection_auc(s_nat, defense.detect(adv)) if len(adv) else None))
    fpr = rejection_rates(defense, test_ds.images)
    rep = Report(out_dir, "I-defender defense", spec={"checkpoint": source or type(model).__name__,
                                                      "layers": defense.layers, "keeps": list(keeps), "rule": rule,
                                                      "n": n, "eps": eps, "seed": seed}, seed=seed)
    rep.add_text(f"Defended `{meta.get('model', {}).get('name', type(model).__name__)}` with I-defender: hidden state "
                 f"{defense.layers} ({defense.feature_dim} values), {defense.history['covariance']} covariance, "
                 f"K per class {defense.history['components']}; active thresholds keep {defense.keep:g} of each "
                 f"class's training data. File: idefender.pt.")
    rep.add_table("Clean test data", [{"accuracy (classifier) %": 100 * accuracy(model, test_ds),
                                       "accuracy (defended, rejection = error) %": 100 * accuracy(defense, test_ds),
                                       **{f"FPR {k} %": 100 * v for k, v in fpr.items()}}])
    rep.add_table("Attacks (rates over the clean-correct images)", rows,
                  ["attack", "threat model", "n", "asr", "failed", "detected", "auc", "mean_linf", "seconds"],
                  note="auc: the detector's ROC AUC, clean vs adversarial (for the adaptive row, its successes).")
    return _save(rep, t0, fpr=fpr, attacks=rows, history={k: v for k, v in defense.history.items() if k != "bic"})


def defend_vib(checkpoint, train_ds, test_ds, out_dir, n: int = 500, seed: int = 0, device=None,
               progress: Optional[bool] = None, k: float = 2.0, samples: int = 10, epochs: int = 10,
               lr: float = 1e-3, batch_size: int = 64, eps: Optional[float] = None, steps: int = 50,
               square_queries: int = 1000, **_ignored) -> Report:
    """``advlab defend vib``: distil the VIB defense from a trained classifier and report.

    ``checkpoint``: a checkpoint path or an ``nn.Module``. Writes ``out_dir/vib.pt`` (load with
    :meth:`VIBDefense.load`) and a report: clean accuracy of both models, DeepFool and FGSM
    crafted on the undefended model and transferred, and the battery (``eps``: 0.3 for one
    channel, 8/255 otherwise) on the defense itself."""
    from ..attacks import build_attack
    from ..defenses.vib import VIBDefense
    from .evaluate import evaluate
    from .runner import adversarial_result

    t0 = time.perf_counter()
    model, meta, source = _classifier(checkpoint, device)
    defense = VIBDefense.fit(model, train_ds, k=k, samples=samples, epochs=epochs, lr=lr, batch_size=batch_size,
                             seed=seed, device=device, progress=progress)
    defense.save(Path(out_dir) / "vib.pt", source_checkpoint=source)
    eps = _default_eps(test_ds, eps)
    x, y = pick_images(model, test_ds, n, only_correct=False, seed=seed)
    runs = [AttackRun("DeepFool", build_attack("deepfool", model), "transfer"),
            AttackRun(f"FGSM {eps:g}", build_attack("fgsm", model, eps=eps), "transfer")]
    rows = []
    for name, res in run_attacks(runs, x, y, progress=progress).results.items():
        rows.append(result_row(f"{name} (on the undefended model itself)", res, threat="white-box"))
        rows.append(result_row(name, rejudge(res, x, defense.predict, untargeted=True), threat="transfer"))
    bat = evaluate(defense, x, y, norm="inf", eps=eps, seed=seed, steps=steps, square_queries=square_queries,
                   progress=progress)
    rows.append(result_row(f"battery L-inf {eps:g}", adversarial_result(x, y, bat.x_adv, defense.predict,
                                                                      seconds=bat.seconds.get("total", 0.0)),
                           threat="adaptive"))
    rep = Report(out_dir, "VIB defense", spec={"checkpoint": source or type(model).__name__, "k": k, "samples": samples,
                                               "epochs": epochs, "lr": lr, "n": n, "eps": eps, "seed": seed}, seed=seed)
    acc = {"undefended": 100 * accuracy(model, test_ds), "VIB": 100 * accuracy(defense, test_ds)}
    rep.add_text(f"Defended `{meta.get('model', {}).get('name', type(model).__name__)}` with VIB (k={k:g}, "
                 f"{samples} noise copies per image, {epochs} epochs; mean sigma {defense.history['sigma_mean']:.4f}). "
                 "The defense is deterministic at test time (no EoT needed). File: vib.pt.")
    rep.add_table("Test accuracy (%)", [acc])
    rep.add_table("Attacks (rates over the clean-correct images)", rows,
                  ["attack", "threat model", "n", "clean_acc", "robust_acc", "asr", "failed", "detected", "mean_l2",
                   "seconds"],
                  note="transfer: crafted on the undefended model, judged by the defense (the paper's setting); "
                       "adaptive: advlab.eval.evaluate on the defense itself.")
    return _save(rep, t0, accuracy=acc, attacks=rows, battery=bat.to_dict(), history=defense.history)


#: the x label of a histogram of per-image bounds sigma_i
BOUND_XLABEL = "per-image bound sigma_i at k={k:g} (mean |pixel difference| / 2k)"


def bound_command(dataset: str, root, out_dir, ks: Sequence[float] = PAPER_KS, split: str = "train",
                  subset: Optional[int] = None, seed: int = 0, device=None, max_tile_mb: float = 64.0,
                  method: str = "auto", progress: Optional[bool] = None) -> Report:
    """``advlab bound --dataset NAME``: the visual imperceptible bound (VIB paper, eq. 2-3) of every
    image of a dataset's ``split`` (the nearest other-class neighbour within that split), Table
    II's statistics per k, per-image distances in results.json (``distance``), and a histogram PNG."""
    from ..metrics.bound import bound_statistics, visual_bound
    from .figures import histogram

    t0 = time.perf_counter()
    ds = load_dataset(dataset, root, split)
    if subset:
        ds = ds.subset(int(subset), seed=seed)
    vb = visual_bound(ds, ks=ks, device=device, max_tile_mb=max_tile_mb, method=method, progress=progress)
    rep = Report(out_dir, f"Visual imperceptible bound: {dataset} ({split})",
                 spec={"dataset": dataset, "split": split, "subset": subset, "ks": list(ks), "method": method,
                       "max_tile_mb": max_tile_mb}, seed=seed)
    rep.add_text(f"{len(ds)} images; d_ij = mean absolute pixel difference to the nearest image of another class "
                 f"in the same split; sigma_i = d_ij / 2k. Search: {vb.search.method}, {vb.search.seconds:.1f} s, "
                 f"{vb.search.exact_pairs / len(ds) ** 2:.3%} of the pairs computed in full, largest tile "
                 f"{vb.search.tile_bytes / 2 ** 20:.1f} MiB.")
    rep.add_table("Bound statistics (Table II layout)",
                  [dict(r, dataset=dataset) for r in bound_statistics(vb.distance, ks)],
                  ["dataset", "k", "min", "mean", "max", "median", "std"])
    k = float(ks[0]) if ks else 1.0
    rep.add_figure("bound-histogram", histogram({dataset: vb.distance / (2 * k)}, BOUND_XLABEL.format(k=k),
                                                "visual imperceptible bound"), f"per-image sigma_i at k = {k:g}")
    return _save(rep, t0, bound=vb.to_dict(), distance=vb.distance.tolist(), neighbour=vb.index.tolist(),
                 labels=vb.labels.tolist())


#: ``advlab defend NAME`` builders, keyed by the DEFENSES registry's names
BUILDERS = {"msvdd": defend_msvdd, "pcl": defend_pcl, "idefender": defend_idefender, "vib": defend_vib}
#: the builder option that ``--epochs`` sets
EPOCHS_OPTION = {"msvdd": "svdd_epochs"}
