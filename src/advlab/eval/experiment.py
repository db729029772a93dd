"""The generic experiment runner: a user's own YAML spec, run on :mod:`advlab.eval.runner`.

``advlab reproduce my-spec.yaml`` runs a spec without a ``runner:`` key here. The spec names a
dataset, a model (a checkpoint, or a zoo model trained here), optionally a defense from the
registry, and a list of attacks, each under a threat model:

.. code-block:: yaml

    name: my evaluation
    seed: 0
    dataset: {name: mnist, folder: mnist-10k, n: 500, only_correct: true}   # digits needs no files
    model: {source: lenet.pt2}             # any model file, or {source: my_models:lenet, weights: lenet.pt},
                                           # or {name: lenet5, train: {epochs: 3, lr: 0.003}}
    defense: {name: msvdd, params: {projections: 64}, beta: defense}   # optional
    attacks:
      - {name: FGSM, kind: fgsm, params: {eps: 0.3}}                  # white-box on the (defended) model
      - {name: PGD, kind: pgd, params: {eps: 8/255, steps: 40}}     # eps: a number or a fraction
      - {name: PGD from surrogate, kind: pgd, params: {eps: 0.3}, threat: transfer, source: surrogate}
    reported: {PGD: 0.05}                   # optional: published robust accuracies, shown beside ours

``model.source`` (``checkpoint`` is the same key) is read by the one model loader
(:func:`advlab.models.inputs.open_model`: advlab checkpoints, torch.export, TorchScript,
``module:factory`` with ``weights``), with optional ``mean``, ``std`` and ``num_classes``. Budgets
(``eps``, ``alpha``) may be written as fractions (``8/255``), read by :func:`advlab._util.parse_eps`.

White-box attacks run on the defended model's ``forward`` (its differentiable scores), every
attack is judged by the defended model's ``predict`` (``advlab.REJECT`` counts as detected), and
the report ends with the per-sample worst case over all attacks.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Optional

from torch import nn

from .._util import AdvlabError, check_eps_units, parse_eps
from ..attacks import build_attack
from ..data import load_dataset, shared_data_root, shared_folder, split_validation
from ..defenses import build_defense, defense_class
from ..models import build_model, fit_model
from ..train import accuracy, fit, predict, resolve_device
from .. import defenses  # noqa: F401 - registers the saved defenses' formats with the model loader
from ..models.inputs import open_model
from .report import Report
from .runner import AttackRun, Evaluation, outcome_checks, pick_images, random_targets, run_attacks
from .stages import stage

COLUMNS = ["attack", "threat model", "n", "clean_acc", "robust_acc", "robust_acc (reported)", "asr", "failed",
           "detected", "mean_l2", "mean_linf", "ssim", "seconds"]


def _section(spec: Dict[str, Any], key: str) -> Dict[str, Any]:
    v = spec.get(key) or {}
    if not isinstance(v, dict):
        raise AdvlabError(f"spec key {key!r} must be a mapping, got {type(v).__name__}")
    return v


def _int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AdvlabError(f"spec key {what!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _mapping(value, what: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdvlabError(f"spec key {what!r} must be a mapping, got {type(value).__name__}")
    return value


def validate(spec: Dict[str, Any]) -> None:
    """Check a user spec's keys and types before any data is read or any model trained: wrong
    types, unknown attack kinds and parameters, bad threat models and sources are errors naming
    the key (``attacks[1].params``...)."""
    from .._util import unknown_name
    from ..attacks.registry import attack_class, attack_parameters
    from ..data import DATASETS
    from ..defenses.base import defense_class
    from .runner import THREATS

    if not isinstance(spec, dict):
        raise AdvlabError(f"an experiment spec must be a mapping, got {type(spec).__name__}")
    _int(spec.get("seed", 0), "seed", 0)
    _int(spec.get("batch_size", 256), "batch_size", 1)
    d = _mapping(spec.get("dataset"), "dataset")
    if not d.get("name") or not isinstance(d["name"], str):
        raise AdvlabError("spec 'dataset' needs a 'name' (e.g. digits, mnist, fashion-mnist)")
    if d["name"] not in DATASETS:
        raise unknown_name("dataset", d["name"], DATASETS)
    _int(d.get("n", 500), "dataset.n", 1)
    m = _mapping(spec.get("model"), "model")
    if not m.get("source") and not m.get("checkpoint") and not m.get("name"):
        raise AdvlabError("spec 'model' needs a 'source' (a model file or module:factory), a 'checkpoint' path or a "
                          "zoo 'name'")
    unknown_keys = set(m) - {"source", "checkpoint", "weights", "mean", "std", "num_classes", "name", "train"}
    if unknown_keys:
        raise AdvlabError(f"spec key 'model' has unknown key(s) {', '.join(sorted(map(str, unknown_keys)))}; valid: "
                          "source (or checkpoint), weights, mean, std, num_classes, name, train")
    if m.get("source") and m.get("checkpoint"):
        raise AdvlabError("spec 'model' takes 'source' or 'checkpoint' (the same thing), not both")
    for key in ("source", "checkpoint", "weights"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise AdvlabError(f"spec key 'model.{key}' must be a path or module:factory string, got {m[key]!r}")
    _mapping(m.get("train"), "model.train")
    dspec = _mapping(spec.get("defense"), "defense")
    if dspec:
        if not dspec.get("name") or not isinstance(dspec["name"], str):
            raise AdvlabError("spec 'defense' needs a 'name' (see advlab.defenses.DEFENSES)")
        defense_class(dspec["name"])
        _mapping(dspec.get("params"), "defense.params")
        vf = dspec.get("val_fraction", 0.15)
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 < vf < 1.0:
            raise AdvlabError(f"spec key 'defense.val_fraction' must be a number in (0, 1), got {vf!r}")
    attacks = spec.get("attacks")
    if attacks is None or attacks == []:
        raise AdvlabError("spec has no attacks")
    if not isinstance(attacks, list):
        raise AdvlabError(f"spec key 'attacks' must be a list of mappings (one per attack), got {type(attacks).__name__}")
    names = set()
    placeholder = nn.Linear(1, 2)
    for i, a in enumerate(attacks):
        where = f"attacks[{i}]"
        if not isinstance(a, dict):
            raise AdvlabError(f"spec key {where!r} must be a mapping with a 'kind', got {a!r}")
        if not a.get("kind") or not isinstance(a["kind"], str):
            raise AdvlabError(f"spec key {where!r} needs a 'kind' (an attack name, e.g. pgd)")
        attack_class(a["kind"])
        params = _budgets(_mapping(a.get("params"), f"{where}.params"), f"{where}.params")
        threat = a.get("threat", "white-box")
        if threat not in THREATS:
            raise AdvlabError(f"spec key '{where}.threat' must be one of {', '.join(THREATS)}, got {threat!r}")
        src = a.get("source")
        if src is not None and src not in SOURCES:
            raise AdvlabError(f"attack {a.get('name', a['kind'])!r}: unknown source {src!r}; valid: "
                              f"{', '.join(SOURCES)}")
        name = a.get("name", a["kind"])
        if name in names:
            raise AdvlabError(f"two attacks are named {name!r}")
        names.add(name)
        unknown = set(params) - attack_parameters(a["kind"])
        if unknown:
            raise AdvlabError(f"attack {a['kind']!r} does not take {sorted(unknown)[0]!r}; it takes: "
                              f"{', '.join(sorted(attack_parameters(a['kind'])))}")
        try:  # the parameters' values, checked by the attack's own constructor (no model needed)
            build_attack(a["kind"], placeholder, **params)
        except AdvlabError as e:
            raise AdvlabError(f"{where} ({name}): {e}") from None
        except Exception:  # a check that needs the real model: done when the attack is built
            pass
    _mapping(spec.get("reported"), "reported")


def _budgets(params: Dict[str, Any], where: str) -> Dict[str, Any]:
    """``params`` with ``eps``/``alpha`` read by the one eps parser (``8/255``, ``0.3``, ``2e-2``)."""
    out = dict(params)
    for key in ("eps", "alpha"):
        if isinstance(out.get(key), str):
            out[key] = parse_eps(out[key], f"{where}.{key}")
    return out


#: the models an attack may be crafted on (``source:``)
SOURCES = ("model", "defense", "surrogate")


def _model(spec: Dict[str, Any], train, test, device, seed: int):
    m = _section(spec, "model")
    if m.get("source") or m.get("checkpoint"):
        loaded = open_model(m.get("source") or m["checkpoint"], m.get("weights"), mean=m.get("mean"), std=m.get("std"),
                            num_classes=m.get("num_classes"), device=device)
        return fit_model(loaded, test.images[:2], where=f" from {test.name}").model
    if not m.get("name"):
        raise AdvlabError("spec 'model' needs a 'source' (a model file or module:factory), a 'checkpoint' path or a "
                          "zoo 'name'")
    mean, std = train.channel_stats()
    model = build_model(m["name"], train.num_classes, train.in_shape, mean=mean, std=std, seed=seed).to(device)

    def train_it():
        fit(model, train, seed=seed, device=device, progress=False, **(m.get("train") or {}))
        return model.state_dict()
    model.load_state_dict(stage("model", train_it))  # resumable (advlab.eval.stages)
    return model


def run(spec: Dict[str, Any], out_dir: Path, data_root: Optional[Path] = None, device=None) -> Report:
    """Run a user experiment spec (see the module docstring); returns the saved Report."""
    validate(spec)
    seed = int(spec.get("seed", 0))
    rep = Report(out_dir, spec.get("name", "advlab experiment"), spec=spec, seed=seed)
    d = _section(spec, "dataset")
    if not d.get("name"):
        raise AdvlabError("spec 'dataset' needs a 'name' (e.g. digits, mnist, fashion-mnist)")
    root = d.get("root") or (None if d["name"] == "digits" else
                             shared_folder(shared_data_root(data_root), d["name"], d.get("folder")))
    train, test = load_dataset(d["name"], root, "train"), load_dataset(d["name"], root, "test")
    device = resolve_device(device)
    model = _model(spec, train, test, device, seed).eval()
    target, source = model, {"model": model}
    dspec = _section(spec, "defense")
    if dspec:
        fit_set, val_set = split_validation(train, float(dspec.get("val_fraction", 0.15)), seed)
        def fit_defense():
            d = build_defense(dspec["name"], model, fit_set, seed=seed, **(dspec.get("params") or {}))
            if hasattr(d, "tune_beta") and dspec.get("beta"):
                d.tune_beta(val_set, goal=dspec["beta"])
            return d.to_state()
        target = defense_class(dspec["name"]).from_state(copy.deepcopy(model), stage("defense", fit_defense))
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
        params = _budgets(a.get("params") or {}, f"attacks[{len(runs)}].params")
        for key in ("eps",):
            if key in params:
                check_eps_units(params[key], params.get("norm", "inf"), x.shape[1:])
        runs.append(AttackRun(a.get("name", a["kind"]), build_attack(a["kind"], source[src], **params), threat, targets))
    if not runs:
        raise AdvlabError("spec has no attacks")
    ev = Evaluation.from_state(stage("attacks", lambda: run_attacks(
        runs, x, y, judge=lambda xb: predict(target, xb), batch_size=int(spec.get("batch_size", 256))).to_state()))
    rows = ev.rows + ([ev.worst_row()] if len(runs) > 1 else [])
    reported = spec.get("reported") or {}
    for r in rows:
        r["robust_acc (reported)"] = reported.get(r["attack"])
    rep.add_text(f"{len(x)} test images of `{d['name']}`; clean accuracy of the evaluated model on the whole test "
                 f"set {accuracy(target, test):.4f}. Rates over the clean-correct images; a rejection "
                 "(`advlab.REJECT`) is a detection, never a success. The worst case counts a sample as robust "
                 "only if every attack failed on it.")
    rep.add_table("Attacks", rows, COLUMNS)
    flags = outcome_checks(runs, ev.results)
    if flags:
        rep.add_table("Attack-outcome flags", [f.to_dict() for f in flags], ["name", "message", "meaning"],
                      note="Compared on the attacker's success (accepted as a wrong class; a rejection is no "
                           "success), over attacks run on the same images. A flag means a white-box number above "
                           "may be an artefact of the attack failing.")
    rep.results["flags"] = [f.to_dict() for f in flags]
    rep.results["rows"] = rows
    rep.save()
    return rep
