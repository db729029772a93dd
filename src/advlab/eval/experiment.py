"""The generic experiment runner: a user's own YAML spec, run on :mod:`advlab.eval.runner`.

``advlab reproduce my-spec.yaml`` runs a spec without a ``runner:`` key here. The spec names a
dataset, a model (a checkpoint, or a zoo model trained here), optionally a defense from the
registry, and a list of attacks, each under a threat model:

.. code-block:: yaml

    name: my evaluation
    seed: 0
    dataset: {name: mnist, folder: mnist-10k, n: 500, only_correct: true}   # digits needs no files
    model: {checkpoint: lenet.pt}          # or {name: lenet5, train: {epochs: 3, lr: 0.003}}
    defense: {name: msvdd, params: {projections: 64}, beta: defense}   # optional
    attacks:
      - {name: FGSM, kind: fgsm, params: {eps: 0.3}}                  # white-box on the (defended) model
      - {name: PGD, kind: pgd, params: {eps: 0.3, steps: 40}}
      - {name: PGD from surrogate, kind: pgd, params: {eps: 0.3}, threat: transfer, source: surrogate}
    reported: {PGD: 0.05}                   # optional: published robust accuracies, shown beside ours

White-box attacks run on the defended model's ``forward`` (its differentiable scores), every
attack is judged by the defended model's ``predict`` (``advlab.REJECT`` counts as detected), and
the report ends with the per-sample worst case over all attacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from .._util import AdvlabError
from ..attacks import build_attack
from ..data import load_dataset, shared_data_root, shared_folder, split_validation
from ..defenses import build_defense
from ..models import build_model
from ..train import evaluate, fit, load_checkpoint, predict, resolve_device
from .report import Report
from .runner import AttackRun, pick_images, random_targets, run_attacks

COLUMNS = ["attack", "threat model", "n", "clean_acc", "robust_acc", "robust_acc (reported)", "asr", "failed",
           "detected", "mean_l2", "mean_linf", "ssim", "seconds"]


def _section(spec: Dict[str, Any], key: str) -> Dict[str, Any]:
    v = spec.get(key) or {}
    if not isinstance(v, dict):
        raise AdvlabError(f"spec key {key!r} must be a mapping, got {type(v).__name__}")
    return v


def _model(spec: Dict[str, Any], train, device, seed: int):
    m = _section(spec, "model")
    if m.get("checkpoint"):
        return load_checkpoint(m["checkpoint"], device=device)[0]
    if not m.get("name"):
        raise AdvlabError("spec 'model' needs a 'checkpoint' path or a zoo 'name'")
    mean, std = train.channel_stats()
    model = build_model(m["name"], train.num_classes, train.in_shape, mean=mean, std=std, seed=seed)
    fit(model, train, seed=seed, device=device, progress=False, **(m.get("train") or {}))
    return model


def run(spec: Dict[str, Any], out_dir: Path, data_root: Optional[Path] = None, device=None) -> Report:
    """Run a user experiment spec (see the module docstring); returns the saved Report."""
    seed = int(spec.get("seed", 0))
    rep = Report(out_dir, spec.get("name", "advlab experiment"), spec=spec, seed=seed)
    d = _section(spec, "dataset")
    if not d.get("name"):
        raise AdvlabError("spec 'dataset' needs a 'name' (e.g. digits, mnist, fashion-mnist)")
    root = d.get("root") or (None if d["name"] == "digits" else
                             shared_folder(shared_data_root(data_root), d["name"], d.get("folder")))
    train, test = load_dataset(d["name"], root, "train"), load_dataset(d["name"], root, "test")
    device = resolve_device(device)
    model = _model(spec, train, device, seed).eval()
    target, source = model, {"model": model}
    dspec = _section(spec, "defense")
    if dspec:
        fit_set, val_set = split_validation(train, float(dspec.get("val_fraction", 0.15)), seed)
        target = build_defense(dspec["name"], model, fit_set, seed=seed, **(dspec.get("params") or {}))
        if hasattr(target, "tune_beta") and dspec.get("beta"):
            target.tune_beta(val_set, goal=dspec["beta"])
        source.update({"defense": target, "surrogate": getattr(target, "surrogate", None)})
    source["defense"] = target
    x, y = pick_images(target, test, d.get("n", 500), only_correct=bool(d.get("only_correct", False)), seed=seed)
    runs = []
    for a in spec.get("attacks") or []:
        threat = a.get("threat", "white-box")
        src = a.get("source", "defense" if threat in ("white-box", "full-knowledge", "adaptive") else "surrogate")
        if source.get(src) is None:
            raise AdvlabError(f"attack {a.get('name')!r}: unknown source {src!r}; valid: "
                              + ", ".join(k for k, v in source.items() if v is not None))
        targets = random_targets(y, train.num_classes, seed) if a.get("targeted") else None
        runs.append(AttackRun(a.get("name", a["kind"]), build_attack(a["kind"], source[src], **(a.get("params") or {})),
                              threat, targets))
    if not runs:
        raise AdvlabError("spec has no attacks")
    ev = run_attacks(runs, x, y, judge=lambda xb: predict(target, xb), batch_size=int(spec.get("batch_size", 256)))
    rows = ev.rows + ([ev.worst_row()] if len(runs) > 1 else [])
    reported = spec.get("reported") or {}
    for r in rows:
        r["robust_acc (reported)"] = reported.get(r["attack"])
    rep.add_text(f"{len(x)} test images of `{d['name']}`; clean accuracy of the evaluated model on the whole test "
                 f"set {evaluate(target, test):.4f}. Rates over the clean-correct images; a rejection "
                 "(`advlab.REJECT`) is a detection, never a success. The worst case counts a sample as robust "
                 "only if every attack failed on it.")
    rep.add_table("Attacks", rows, COLUMNS)
    rep.results["rows"] = rows
    rep.save()
    return rep
