"""``advlab compare``: defenses trained and attacked under the same conditions, one leaderboard.

>>> from advlab.eval.compare import compare
>>> out = compare(["none", "madry", "msvdd", "my_pkg.defs:MyDefense"], dataset="mnist", out_dir="cmp")
>>> out.leaderboard[0]["defense"], out.out_dir / "report.md"

One base model (a zoo architecture trained here with the seed, or the user's own ``model``) on one
dataset; every defense is fitted from a copy of it on the same training images (a 15% validation
split is held out of every fit, and tunes the thresholds of the defenses that have one, such as
M-SVDD-D's beta), with the same seed and its documented defaults (``params`` override them); the
training time is measured. Then, on the same ``n`` test images and at every eps of the grid
(L-inf and L2, pixel units on [0, 1]):

- **claimed**: the threat model the defense's own paper measured it under (its
  ``claimed_threat``): white-box PGD on ``forward`` (PCL, adversarial training, none, a user's
  defense unless it says otherwise), PGD crafted on the ``surrogate`` and transferred (M-SVDD-D,
  VIB), or PGD crafted on a Jacobian substitute trained on the surrogate's labels (black-box,
  I-defender);
- **adaptive**: the :func:`~advlab.eval.evaluate` battery on the defense's own decision (BPDA,
  EoT, rejections, escalation as its checks call for), then the defense-aware attacks advlab has
  (:func:`advlab.adaptive.aware.defense_aware_attacks`), as one survivor chain; the adaptive
  number is the per-sample worst case of the chain, the claimed attack and the previous (smaller)
  eps, so it can never be above the claimed one or rise with eps.

A rejection (``advlab.REJECT``) is a detection, never a correct prediction: robust accuracy counts
only correct labels, the detected share is shown beside it, and the clean test set's rejection
rate (the false-positive rate) beside the clean accuracy. The attack-outcome checks
(:func:`advlab.eval.runner.outcome_checks`: transfer or black-box beating the white-box attacker)
and the battery's masking flags are shown per defense.

A defense is a registry name (:data:`advlab.defenses.DEFENSES`: ``none``, ``madry``, ``msvdd``,
``pcl``, ``vib``, ``idefender``) or ``"package.module:Class"``, a class implementing the
:class:`~advlab.defenses.Defense` contract (``fit(model, dataset, **params)`` classmethod,
``forward``, ``predict`` with ``advlab.REJECT``, optional ``detect``, ``surrogate``,
``claimed_threat``, ``adaptive_attacks``), or the class itself. A defense that fails to fit or to be
evaluated becomes a row with its error; the run goes on.

Resumable like the reproductions (:mod:`advlab.eval.stages`: the base model, each fit, each
(defense, norm, eps) cell); under ``torchrun`` the attacks shard over the processes
(:mod:`advlab.distributed`) and rank 0 writes the report.
"""

from __future__ import annotations

import copy
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import REJECT, distributed
from .._util import AdvlabError, check_positive_int, format_eps, parse_eps
from ..adaptive.aware import defense_aware_attacks
from ..adaptive.substitute import jacobian_substitute
from ..attacks import PGD
from ..attacks.logits import checked_predict
from ..attacks.result import AttackResult
from ..data import load_dataset, shared_data_root, shared_folder, split_validation
from ..defenses import DEFENSES, Defense, defense_class
from ..defenses.advtrain import MadryDefense, Undefended
from ..models import build_model
from ..models.loading import import_object
from ..train import fit, resolve_device
from .evaluate import evaluate
from .report import Report
from .runner import (AttackRun, outcome_checks, pick_images, result_state, run_attacks, survivor_chain,
                     worst_case)
from .stages import stage, stage_cache

__all__ = ["compare", "Comparison", "SETTINGS", "QUICK", "DEFAULT_DEFENSES", "load_defense_class"]

#: the six rows of the committed reports, in order
DEFAULT_DEFENSES = ("none", "madry", "msvdd", "pcl", "vib", "idefender")

#: per dataset: the base model and its training, the eps grids (pixel units), the headline cell,
#: the attacked images and the attack budgets. Sized so that the six default rows take about 30
#: minutes on 2 CPU cores: MNIST is mnist-10k (8k training / 2k test images), Fashion-MNIST a seeded
#: 8k / 2k subset (``subset``) of its 60k / 10k, as in the reproductions.
SETTINGS: Dict[str, Dict[str, Any]] = {
    "digits": {"model": "lenet5", "train": {"epochs": 30, "lr": 3e-3, "batch_size": 32},
               "eps": {"inf": [0.05, 0.1, 0.2], "2": [0.5, 1.0]}, "headline": ("inf", 0.1), "n": 100,
               "budget": {"steps": 50, "targets": 3, "square_queries": 1000, "escalate": 1, "claimed_steps": 40}},
    "mnist": {"model": "lenet5", "train": {"epochs": 5, "lr": 3e-3, "batch_size": 64},
              "eps": {"inf": [0.1, 0.2, 0.3], "2": [1.0, 2.0]}, "headline": ("inf", 0.3), "n": 100,
              "budget": {"steps": 50, "targets": 3, "square_queries": 1000, "escalate": 1, "claimed_steps": 40}},
    "fashion-mnist": {"model": "lenet5", "train": {"epochs": 8, "lr": 3e-3, "batch_size": 64}, "subset": (8000, 2000),
                      "eps": {"inf": [0.05, 0.1, 0.2], "2": [0.5, 1.0]}, "headline": ("inf", 0.1), "n": 100,
                      "budget": {"steps": 50, "targets": 3, "square_queries": 1000, "escalate": 1,
                                 "claimed_steps": 40}},
}
#: ``quick=True``: the embedded digits, tiny budgets (a smoke run, minutes; its numbers are no result)
QUICK: Dict[str, Any] = {
    "dataset": "digits", "train": {"epochs": 8, "lr": 3e-3, "batch_size": 32}, "n": 32,
    "eps": {"inf": [0.1], "2": [1.0]}, "headline": ("inf", 0.1),
    "budget": {"steps": 10, "targets": 1, "square_queries": 100, "escalate": 0, "claimed_steps": 10},
    "substitute": {"seeds": 40, "rounds": 2, "epochs": 3},
    "params": {"madry": {"epochs": 2, "steps": 3}, "pcl": {"pc_epochs": 1},
               "msvdd": {"projections": 16, "positive_epochs": 1, "svdd_epochs": 1, "finetune_epochs": 1},
               "vib": {"epochs": 1, "samples": 2}, "idefender": {"components": [1], "covariance": ["diag"]}},
}
#: each registry defense's parameters in a comparison beyond its ``fit`` defaults: PCL starts from
#: the trained base model (no CE warm-up of its own); the rest are the defaults as they are
FIT_DEFAULTS: Dict[str, Dict[str, Any]] = {"pcl": {"warmup_epochs": 0}}
#: the Jacobian substitute of the black-box threat model (Papernot et al. 2017): seed images taken
#: from the training set, augmentation rounds, epochs per round
SUBSTITUTE = {"seeds": 150, "rounds": 5, "epochs": 10}
THREAT_LABELS = {"white-box": "white-box PGD on the defense", "transfer": "PGD transferred from the surrogate",
                 "black-box": "PGD from a Jacobian substitute (black-box)"}


# --------------------------------------------------------------------------- defenses
def load_defense_class(spec: Union[str, type]) -> type:
    """The class behind a defense spec: a registry name (:data:`advlab.defenses.DEFENSES`),
    ``"package.module:Class"`` (imported, the working directory importable as with ``python -m``;
    this runs the user's code, as their defense needs) or a class. The class must have a callable
    ``fit``; its instances must be ``nn.Module`` (checked after fitting). Raises
    :class:`~advlab.AdvlabError` naming the spec otherwise."""
    if isinstance(spec, type):
        cls = spec
    elif not isinstance(spec, str) or not spec:
        raise AdvlabError(f"a defense is a registry name, 'package.module:Class' or a class, got {spec!r}")
    elif ":" not in spec:
        cls = defense_class(spec)
    else:
        cls = import_object(spec, f"defense {spec}")
        if not isinstance(cls, type):
            raise AdvlabError(f"defense {spec!r} is a {type(cls).__name__}, not a class")
    if not callable(getattr(cls, "fit", None)):
        raise AdvlabError(f"defense class {cls.__name__} has no fit(model, dataset, **params) classmethod "
                          "(the Defense contract, advlab.defenses.Defense)")
    return cls


@dataclass
class _Entry:
    """One row to be: the spec as given, its label, its class (None when it failed to load) and params."""

    spec: Union[str, type]
    label: str
    cls: Optional[type]
    params: Dict[str, Any]
    error: Optional[str] = None


def _entries(defenses: Sequence[Any], params: Dict[str, Dict[str, Any]], quick: bool) -> List[_Entry]:
    out, seen = [], set()
    for d in defenses:
        p: Dict[str, Any] = {}
        label = None
        if isinstance(d, dict):  # {name: ..., params: {...}, label: ...} (the YAML form)
            unknown = set(d) - {"name", "params", "label"}
            if unknown or "name" not in d:
                raise AdvlabError(f"a defense entry takes name, params and label, got {sorted(d)}")
            label, p, d = d.get("label"), dict(d.get("params") or {}), d["name"]
        try:
            cls, error = load_defense_class(d), None
        except AdvlabError as e:
            if isinstance(d, str) and ":" not in d:
                raise  # an unknown registry name is a typo: fail before any work
            cls, error = None, str(e)
        name = d if isinstance(d, str) else d.__name__
        reg = name if name in DEFENSES else None
        label = label or (reg or name.rpartition(":")[2] or name)
        if label in seen:
            raise AdvlabError(f"two defenses would be labelled {label!r}; give one a label")
        seen.add(label)
        merged = dict(FIT_DEFAULTS.get(reg, {})) if reg else {}
        if quick and reg:
            merged.update(QUICK["params"].get(reg, {}))
        merged.update(params.get(label, params.get(name, {})) or {})
        merged.update(p)
        out.append(_Entry(d, label, cls, merged, error))
    if not out:
        raise AdvlabError("compare needs at least one defense")
    return out


def _fit(entry: _Entry, model: nn.Module, fit_set, seed: int, device, progress) -> nn.Module:
    """Fit ``entry`` on a copy of ``model``; a registry defense with a threshold is tuned after."""
    kwargs = dict(entry.params)
    tune = kwargs.pop("tune_beta", "defense")
    defense = entry.cls.fit(copy.deepcopy(model), fit_set, seed=seed, **_maybe(entry.cls, device=device,
                                                                                 progress=progress), **kwargs)
    if not isinstance(defense, nn.Module):
        raise AdvlabError(f"{entry.cls.__name__}.fit returned a {type(defense).__name__}, not an nn.Module")
    return defense.eval(), tune


def _maybe(cls, **options) -> Dict[str, Any]:
    """The keyword ``options`` that ``cls.fit`` accepts (a user's fit may take neither device nor progress)."""
    import inspect

    try:
        sig = inspect.signature(cls.fit)
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return options
    return {k: v for k, v in options.items() if k in sig.parameters}


# --------------------------------------------------------------------------- results as data
def _result(state: Dict[str, Any]) -> AttackResult:
    return AttackResult(**state)


def _robust(res: AttackResult) -> float:
    """Correct on the clean image and on its adversarial, not rejected: over all images."""
    return float(((res.clean_pred == res.labels) & (res.adv_pred == res.labels) & ~res.detected).double().mean())


def _detected(res: AttackResult) -> float:
    """Clean-correct images whose adversarial was rejected (and not broken), over all images."""
    return float(((res.clean_pred == res.labels) & res.detected & ~res.success).double().mean())


@dataclass
class Comparison:
    """What :func:`compare` measured: ``rows`` (one per defense, every number, errors included),
    ``leaderboard`` (ranked rows of the headline table), ``headline`` (norm, eps), the report folder."""

    rows: List[Dict[str, Any]]
    leaderboard: List[Dict[str, Any]]
    headline: Tuple[str, float]
    out_dir: Path
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the run
def compare(defenses: Sequence[Any] = DEFAULT_DEFENSES, dataset: Optional[str] = None, root=None,
            model: Union[None, str, nn.Module] = None, weights=None, train: Optional[Dict[str, Any]] = None,
            eps: Optional[Dict[str, Sequence[float]]] = None, headline: Optional[Tuple[str, float]] = None,
            n: Optional[int] = None, budget: Optional[Dict[str, int]] = None,
            params: Optional[Dict[str, Dict[str, Any]]] = None, seed: int = 0, quick: bool = False,
            out_dir="results/compare", fresh: bool = False, device=None, progress: Optional[bool] = None,
            log: Callable[[str], None] = print) -> Comparison:
    """Fit every defense in ``defenses`` from one base model and attack each on the same images
    at the same eps grid under its claimed threat model and the adaptive attacker (module docstring).

    ``dataset``: "digits" (embedded, the default), "mnist" or "fashion-mnist" (``root``: their
    folder, else the shared data folder); ``model``: a zoo name trained here on the dataset with
    ``train`` (fit options), or the user's model (an ``nn.Module``, or a model file / ``module:factory``
    read by :func:`advlab.models.inputs.open_model`, with ``weights``); ``eps``: ``{"inf": [...],
    "2": [...]}`` in pixel units (numbers or text such as "8/255"); ``headline``: the (norm, eps) cell
    the leaderboard ranks by (adaptive robust accuracy); ``n``: test images attacked; ``budget``:
    ``steps`` (APGD / FAB / defense-aware iterations), ``targets``, ``square_queries``, ``escalate``
    (of :func:`evaluate`), ``claimed_steps`` (the claimed threat model's PGD); ``params``: per
    defense label, fit parameters over its defaults; ``seed``: the one seed of the base model's
    training, every fit, the image draw and every attack; ``quick``: digits and tiny budgets (smoke
    run); ``device``: where models train and attacks run (default: the CPU); ``progress``: progress
    bars (None: on a terminal); ``log``: called with each progress line (per defense and per cell).
    Defaults per dataset: :data:`SETTINGS`. Writes
    ``out_dir/results.json``, ``report.md``, the figures and ``out_dir/defenses/<label>.pt`` (each
    fitted registry defense; ``none`` and ``madry`` as plain model checkpoints that ``advlab
    evaluate`` reads); resumable (``fresh`` starts over). Raises :class:`~advlab.AdvlabError` on an
    unknown dataset or registry name, a bad eps grid or headline, or bad budgets, before any work.
    Returns a :class:`Comparison`."""
    t_all = time.perf_counter()
    dataset = dataset or ("digits" if quick or model is None else None)
    if dataset is None:
        raise AdvlabError("compare needs a dataset (the base model's training and test data)")
    if dataset not in SETTINGS:
        raise AdvlabError(f"compare knows the settings of {', '.join(SETTINGS)}; got dataset {dataset!r}")
    cfg = copy.deepcopy(SETTINGS[dataset])
    if quick:
        cfg.update({k: copy.deepcopy(QUICK[k]) for k in ("train", "n", "eps", "headline", "budget")})
    cfg["train"].update(train or {})
    cfg["budget"].update(budget or {})
    grid = _eps_grid(eps if eps is not None else cfg["eps"])
    headline = _headline(headline or cfg["headline"], grid)
    n = check_positive_int(n if n is not None else cfg["n"], "n")
    for k, v in cfg["budget"].items():
        check_positive_int(v, f"budget {k}", 0 if k == "escalate" else 1)
    entries = _entries(list(defenses), dict(params or {}), quick)
    for e in entries:  # adversarial training at the comparison's headline L-inf eps (its own default: 0.3 for
        # one-channel images, 8/255 otherwise), so the row is trained for the threat it is ranked at
        default = 0.3 if _channels(dataset) == 1 else 8 / 255
        if e.cls is not None and issubclass(e.cls, MadryDefense) and "eps" not in e.params \
                and headline[0] == "inf" and abs(headline[1] - default) > 1e-12:
            e.params["eps"] = headline[1]
    device = resolve_device(device)
    out_dir = Path(out_dir)
    spec = {"defenses": [e.spec if isinstance(e.spec, str) else f"{e.spec.__module__}:{e.spec.__qualname__}"
                         for e in entries], "labels": [e.label for e in entries],
            "params": {e.label: e.params for e in entries}, "dataset": dataset, "root": str(root) if root else None,
            "model": model if isinstance(model, (str, type(None))) else type(model).__name__,
            "weights": str(weights) if weights else None, "train": cfg["train"], "eps": grid,
            "headline": list(headline), "n": n, "budget": cfg["budget"], "seed": seed, "quick": quick}
    main = distributed.is_main()
    say = log if main else (lambda msg: None)
    with stage_cache(out_dir, spec, fresh=fresh):
        rep = Report(out_dir, f"advlab compare: {len(entries)} defenses on {dataset}", spec=spec, seed=seed)
        train_ds, test_ds = _data(dataset, root, cfg, seed)
        fit_set, val_set = split_validation(train_ds, 0.15, seed)
        base, base_info = _base_model(model, weights, cfg, fit_set, test_ds, dataset, seed, device, progress, say)
        x, y = pick_images(base, test_ds, n, seed=seed)
        say(f"base model: {base_info['describe']}; {len(x)} test images attacked; eps grid "
            + "; ".join(f"L-{nm} {', '.join(format_eps(e) if nm == 'inf' else f'{e:g}' for e in es)}"
                        for nm, es in grid.items() if es))
        rows = []
        for i, e in enumerate(entries, 1):
            say(f"[{i}/{len(entries)}] {e.label}")
            rows.append(_one_defense(e, base, fit_set, val_set, test_ds, x, y, grid, cfg, seed, device, progress,
                                     out_dir if main else None, quick, say))
        board = _leaderboard(rows, headline)
        _write(rep, rows, board, headline, grid, cfg, base_info, dataset, len(x), seed, quick)
        rep.time("total", time.perf_counter() - t_all)
        if main:
            rep.save()
    return Comparison(rows, board, headline, out_dir, time.perf_counter() - t_all)


def _channels(dataset: str) -> int:
    """The image channels of a dataset compare knows."""
    return 1 if dataset in ("digits", "mnist", "fashion-mnist") else 3


def _eps_grid(eps) -> Dict[str, List[float]]:
    if not isinstance(eps, dict):
        raise AdvlabError(f"eps must be a mapping {{'inf': [...], '2': [...]}}, got {eps!r}")
    grid: Dict[str, List[float]] = {}
    for norm, values in eps.items():
        key = {"inf": "inf", "linf": "inf", "l-inf": "inf", "2": "2", "l2": "2"}.get(str(norm).lower())
        if key is None:
            raise AdvlabError(f"eps norms are 'inf' and '2', got {norm!r}")
        if isinstance(values, (int, float, str)):
            values = [values]
        grid[key] = sorted({parse_eps(v, f"eps[{norm!r}]") for v in values})
        if any(v <= 0 for v in grid[key]):
            raise AdvlabError(f"eps values must be > 0, got {grid[key]}")
    if not any(grid.values()):
        raise AdvlabError("the eps grid is empty")
    return grid


def _headline(headline, grid) -> Tuple[str, float]:
    norm, eps = headline
    norm = "inf" if str(norm).lower() in ("inf", "linf", "l-inf") else str(norm)
    eps = parse_eps(eps, "headline eps")
    if eps not in grid.get(norm, []):
        raise AdvlabError(f"the headline cell (L-{norm}, {eps:g}) is not in the eps grid {grid}")
    return norm, eps


def _data(dataset: str, root, cfg, seed: int):
    """(train, test), cut to the setting's seeded ``subset`` (train, test) sizes where it has one."""
    if dataset == "digits":
        train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    else:
        folder = Path(root) if root else shared_folder(shared_data_root(None), dataset)
        train, test = load_dataset(dataset, root=folder, split="train"), load_dataset(dataset, root=folder, split="test")
    sub = cfg.get("subset")
    if sub and len(train.labels) > sub[0]:
        train = train.subset(int(sub[0]), seed=seed)
    if sub and len(test.labels) > sub[1]:
        test = test.subset(int(sub[1]), seed=seed)
    return train, test


def _base_model(model, weights, cfg, fit_set, test_ds, dataset, seed, device, progress, say):
    if isinstance(model, nn.Module):
        return model.eval(), {"describe": f"the given {type(model).__name__}", "trained_here": False,
                              "seconds": 0.0}
    if isinstance(model, str) and (":" in model or Path(model).exists()):
        from ..models.inputs import open_model

        loaded = open_model(model, weights, device=device)
        return loaded.model.eval(), {"describe": loaded.describe(), "trained_here": False, "seconds": 0.0}
    name = model or cfg["model"]
    mean, std = fit_set.channel_stats() if hasattr(fit_set, "channel_stats") else (None, None)
    net = build_model(name, test_ds.num_classes, test_ds.in_shape, mean=mean, std=std, seed=seed).to(device)

    def train_it():
        t0 = time.perf_counter()
        fit(net, fit_set, seed=seed, device=device, progress=progress, desc="base model", **cfg["train"])
        return {"state": net.state_dict(), "seconds": time.perf_counter() - t0}
    st = stage("base-model", train_it)
    net.load_state_dict(st["state"])
    opts = ", ".join(f"{k} {v}" for k, v in cfg["train"].items())
    return net.eval(), {"describe": f"{name} trained here on {len(fit_set.labels) if hasattr(fit_set, 'labels') else '?'} "
                                    f"{dataset} images ({opts}, seed {seed})", "trained_here": True,
                        "seconds": float(st["seconds"])}


def _inference_seconds(model, images, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        checked_predict(model, images)
        best = min(best, time.perf_counter() - t0)
    return best


def _inference_ratio(defense, base, images, repeats: int = 5) -> float:
    """The defense's prediction time over the base model's on ``images``: the fastest of ``repeats``
    runs of each, interleaved (so a machine busy with other work slows both alike)."""
    d, b = math.inf, math.inf
    for _ in range(repeats):
        d = min(d, _inference_seconds(defense, images, 1))
        b = min(b, _inference_seconds(base, images, 1))
    return d / max(b, 1e-9)


def _one_defense(e: _Entry, base, fit_set, val_set, test_ds, x, y, grid, cfg, seed, device, progress,
                 save_dir, quick, say) -> Dict[str, Any]:
    row: Dict[str, Any] = {"defense": e.label, "spec": e.spec if isinstance(e.spec, str) else e.spec.__name__,
                           "params": e.params, "status": "ok", "error": None}
    if e.cls is None:
        row.update(status="error", error=e.error, where="load")
        say(f"  {e.label}: {e.error}")
        return row
    try:
        defense, fit_seconds, notes = _fitted(e, base, fit_set, val_set, seed, device, progress)
    except Exception as err:  # noqa: BLE001 - a defense that fails to fit is a row with its error
        row.update(status="error", error=f"{type(err).__name__}: {err}", where="fit")
        say(f"  {e.label}: fit failed: {row['error']}")
        say("".join(traceback.format_exception(err)[-3:]).rstrip())
        return row
    row["fit_seconds"] = fit_seconds
    row["notes"] = notes
    row["claimed_threat"] = getattr(defense, "claimed_threat", "white-box")
    if row["claimed_threat"] not in THREAT_LABELS:
        row["claimed_threat"] = "white-box"
    try:
        pred = checked_predict(defense, test_ds.images)
        row["clean_accuracy"] = float((pred == test_ds.labels).double().mean())
        row["clean_rejections"] = float((pred == REJECT).double().mean())
        row["inference_cost"] = _inference_ratio(defense, base, test_ds.images)
        say(f"  fitted in {fit_seconds:.0f} s; clean accuracy {100 * row['clean_accuracy']:.1f}%, clean rejections "
            f"{100 * row['clean_rejections']:.1f}%, inference {row['inference_cost']:.2f}x the base model")
        if save_dir is not None:
            _save_defense(defense, save_dir / "defenses" / f"{_slug(e.label)}.pt", e)
        row["cells"] = _attack_grid(e, defense, x, y, grid, cfg, seed, fit_set, quick, progress, say)
    except Exception as err:  # noqa: BLE001 - a defense that fails to evaluate is a row with its error
        row.update(status="error", error=f"{type(err).__name__}: {err}", where="evaluate")
        say(f"  {e.label}: evaluation failed: {row['error']}")
        say("".join(traceback.format_exception(err)[-3:]).rstrip())
    return row


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "defense"


def _fitted(e: _Entry, base, fit_set, val_set, seed, device, progress):
    """(defense, fit seconds, notes): fitted, or rebuilt from the stage cache (a :class:`Defense`)."""
    notes: List[str] = []
    cacheable = isinstance(e.cls, type) and issubclass(e.cls, Defense)

    def fit_it():
        t0 = time.perf_counter()
        defense, tune = _fit(e, base, fit_set, seed, device, progress)
        if hasattr(defense, "tune_beta") and tune:
            info = defense.tune_beta(val_set, goal=tune)
            notes.append(f"beta tuned on the validation split (goal {tune}): {info.get('beta', float('nan')):.3g}")
            h = info.get("health")
            if h:
                notes.append(f"health check: DeepFool transferred from the surrogate, {100 * h['detection_rate']:.0f}% "
                             f"detected, {100 * h['transfer_success']:.0f}% accepted as a wrong class "
                             f"({'healthy' if h['healthy'] else 'FRAGILE: ' + h['advice']})")
        secs = time.perf_counter() - t0
        if not cacheable:
            return {"seconds": secs, "notes": notes, "live": defense}
        return {"seconds": secs, "notes": list(notes), "state": defense.to_state()}

    if not cacheable:
        out = fit_it()
        return out["live"], out["seconds"], out["notes"]
    out = stage(f"fit/{e.label}", fit_it)
    defense = e.cls.from_state(copy.deepcopy(base), out["state"])
    return defense.eval(), float(out["seconds"]), list(out["notes"])


def _save_defense(defense, path: Path, e: _Entry) -> None:
    from ..train import save_checkpoint

    inner = getattr(defense, "model", None)
    if getattr(defense, "format", ""):
        defense.save(path, compare_label=e.label)
    elif isinstance(inner, nn.Module) and isinstance(defense, (MadryDefense, Undefended)):
        save_checkpoint(inner, path, role=f"advlab compare: {e.label}")  # `advlab evaluate` reads it as it is


def _claimed_run(defense, threat: str, norm: str, eps: float, steps: int, seed: int, sub) -> AttackRun:
    source = {"white-box": defense, "transfer": getattr(defense, "surrogate", None) or defense,
              "black-box": sub}[threat]
    name = f"claimed: {THREAT_LABELS[threat]} ({steps} steps)"
    return AttackRun(name, PGD(source, eps=eps, norm=norm, alpha=2.5 * eps / steps, steps=steps, seed=seed), threat)


def _substitute(e: _Entry, defense, fit_set, seed, quick):
    """The black-box attacker's Jacobian substitute, trained on the surrogate's (else the defense's) labels."""
    cfg = QUICK["substitute"] if quick else SUBSTITUTE
    oracle = getattr(defense, "surrogate", None) or defense
    seeds = fit_set.images[torch.randperm(len(fit_set.labels), generator=torch.Generator().manual_seed(seed))
                           [: cfg["seeds"]]]
    num_classes = int(fit_set.labels.max()) + 1

    def train_it():
        sub, queries = jacobian_substitute(oracle, seeds, num_classes, rounds=cfg["rounds"], epochs=cfg["epochs"],
                                           seed=seed)
        return {"state": sub.state_dict(), "queries": queries}
    st = stage(f"substitute/{e.label}", train_it)
    sub = build_model("model-e", num_classes, tuple(seeds.shape[1:]), mean=0.5, std=0.5, seed=seed)
    sub.load_state_dict(st["state"])
    return sub.eval(), int(st["queries"])


def _attack_grid(e: _Entry, defense, x, y, grid, cfg, seed, fit_set, quick, progress, say) -> Dict[str, Any]:
    """Every (norm, eps) cell for one defense: the claimed threat model's attack and the adaptive chain."""
    b = cfg["budget"]
    threat = getattr(defense, "claimed_threat", "white-box")
    threat = threat if threat in THREAT_LABELS else "white-box"
    sub, queries = _substitute(e, defense, fit_set, seed, quick) if threat == "black-box" else (None, 0)
    judge = lambda xb: checked_predict(defense, xb)  # noqa: E731 - the defense's own decision
    clean = judge(x).cpu()
    cells: Dict[str, Any] = {}
    for norm, values in grid.items():
        prev_chain, prev_final = None, None
        for eps in values:
            key = f"{norm}/{eps:g}"

            def cell():
                t0 = time.perf_counter()
                claimed = _claimed_run(defense, threat, norm, eps, b["claimed_steps"], seed, sub)
                ev = run_attacks([claimed], x, y, judge=judge, progress=progress)
                a = ev.results[claimed.name]
                evals: List[Any] = []

                def battery(xs, ys):
                    evals.append(evaluate(defense, xs, ys, norm=norm, eps=eps, seed=seed, steps=b["steps"],
                                          targets=b["targets"], square_queries=b["square_queries"],
                                          escalate=b["escalate"], progress=False))
                    return evals[-1].x_adv
                runs = [AttackRun("evaluate battery", battery, "adaptive")]
                runs += [AttackRun(name, atk, "adaptive") for name, atk in
                         defense_aware_attacks(defense, norm=norm, eps=eps, steps=b["steps"], seed=seed)]
                chain = survivor_chain(runs, x, y, judge, start=_result(prev_chain) if prev_chain else None,
                                       clean=clean, progress=progress)
                white = chain.worst
                final = worst_case([a, white] + ([_result(prev_final)] if prev_final else []))
                flags = outcome_checks([claimed, AttackRun("adaptive (white-box chain)", battery, "adaptive")],
                                       {claimed.name: a, "adaptive (white-box chain)": white})
                masking = sorted({f.name for r in evals for f in r.flags})
                return {"claimed": result_state(a), "claimed_name": claimed.name, "white": result_state(white),
                        "final": result_state(final), "stages": chain.stages,
                        "outcome_flags": [f.to_dict() for f in flags], "masking_flags": masking,
                        "rounds": sum(len(r.rounds) for r in evals), "seconds": time.perf_counter() - t0}

            c = stage(f"cell/{e.label}/{key}", cell)
            prev_chain, prev_final = c["white"], c["final"]
            a, final = _result(c["claimed"]), _result(c["final"])
            cells[key] = {"norm": norm, "eps": eps, "claimed_attack": c["claimed_name"],
                          "claimed_robust": _robust(a), "claimed_detected": _detected(a),
                          "adaptive_robust": _robust(final), "adaptive_detected": _detected(final),
                          "clean_accuracy": float((clean == y).double().mean()), "stages": c["stages"],
                          "outcome_flags": c["outcome_flags"], "masking_flags": c["masking_flags"],
                          "rounds": c["rounds"], "seconds": c["seconds"]}
            if queries:
                cells[key]["substitute_queries"] = queries
            say(f"  L-{norm} {eps:g}: claimed ({threat}) {100 * cells[key]['claimed_robust']:.1f}%, adaptive "
                f"{100 * cells[key]['adaptive_robust']:.1f}% robust (+{100 * cells[key]['adaptive_detected']:.1f}% "
                f"detected), {c['seconds']:.0f} s"
                + (f"; flags: {', '.join(c['masking_flags'] + [f['name'] for f in c['outcome_flags']])}"
                   if c["masking_flags"] or c["outcome_flags"] else ""))
    return cells


# --------------------------------------------------------------------------- the report
def _leaderboard(rows, headline) -> List[Dict[str, Any]]:
    key = f"{headline[0]}/{headline[1]:g}"
    ok = [r for r in rows if r["status"] == "ok" and key in r.get("cells", {})]
    ok.sort(key=lambda r: (-r["cells"][key]["adaptive_robust"], -r["clean_accuracy"]))
    board = []
    for i, r in enumerate(ok, 1):
        c = r["cells"][key]
        flags = sorted({f for cc in r["cells"].values() for f in cc["masking_flags"]}
                       | {f["name"] for cc in r["cells"].values() for f in cc["outcome_flags"]})
        board.append({"rank": i, "defense": r["defense"], "clean accuracy": round(100 * r["clean_accuracy"], 1),
                      "clean rejections": round(100 * r["clean_rejections"], 1), "claimed threat": r["claimed_threat"],
                      "claimed robust": round(100 * c["claimed_robust"], 1),
                      "adaptive robust": round(100 * c["adaptive_robust"], 1),
                      "adaptive detected": round(100 * c["adaptive_detected"], 1), "flags": ", ".join(flags) or "none",
                      "training s": round(r["fit_seconds"], 1), "inference cost": round(r["inference_cost"], 2)})
    for r in rows:
        if r["status"] != "ok":
            board.append({"rank": "-", "defense": r["defense"], "flags": f"error ({r.get('where')}): {r['error']}"})
    return board


def _rank_paragraph(rows, headline) -> str:
    """What changed between the claimed threat models' order and the adaptive attacker's, in words
    generated from the numbers: the two orders, who lost its lead over whom, the largest falls."""
    key = f"{headline[0]}/{headline[1]:g}"
    ok = [r for r in rows if r["status"] == "ok" and key in r.get("cells", {})]
    if len(ok) < 2:
        return ""
    claimed = {r["defense"]: r["cells"][key]["claimed_robust"] for r in ok}
    adaptive = {r["defense"]: r["cells"][key]["adaptive_robust"] for r in ok}

    def order(v):
        return ", ".join(f"{d} ({100 * v[d]:.1f}%)" for d in sorted(v, key=lambda d: -v[d]))
    lines = [f"At L-{headline[0]} eps {headline[1]:g}, in the order of the claimed threat models: {order(claimed)}; "
             f"in the order of the adaptive attacker: {order(adaptive)}."]
    lost = []
    for d in sorted(claimed, key=lambda d: -claimed[d]):
        over = [o for o in claimed if claimed[d] > claimed[o] and adaptive[d] <= adaptive[o]]
        if over:
            lost.append(f"{d} is ranked above {', '.join(over)} by its claimed threat model and is not above "
                        f"{'it' if len(over) == 1 else 'them'} under the adaptive attacker")
    lines.append(("; ".join(lost) + ".") if lost else
                 "No defense loses its place: every defense above another under the claimed threat models stays "
                 "above it under the adaptive attacker.")
    falls = sorted(((claimed[d] - adaptive[d], d) for d in claimed), reverse=True)
    big = [(f, d) for f, d in falls if f > 0][:3]
    if big:
        lines.append("Largest falls from the claimed number to the adaptive one: "
                     + ", ".join(f"{d} {100 * f:.1f} points ({next(r for r in ok if r['defense'] == d)['claimed_threat']})"
                                 for f, d in big) + ".")
    return " ".join(lines)


def _write(rep: Report, rows, board, headline, grid, cfg, base_info, dataset, n, seed, quick) -> None:
    from .figures import robustness_curves, scatter_labelled

    b = cfg["budget"]
    rep.add_text(
        f"{'A smoke run (`--quick`): tiny budgets, its numbers are no result. ' if quick else ''}"
        f"Every defense fitted from the same base model ({base_info['describe']}) on the same training images "
        f"(15% held out for validation and threshold tuning), seed {seed}; every defense attacked on the same {n} "
        f"test images of {dataset}. **Claimed**: the threat model of the defense's own paper, PGD with "
        f"{b['claimed_steps']} steps of 2.5 eps / steps (white-box on the defense; transferred from its surrogate; "
        "or from a Jacobian substitute trained on the surrogate's labels, black-box). **Adaptive**: the `evaluate` "
        f"battery on the defense's own decision (APGD-CE, APGD-T with {b['targets']} targets, FAB-T, Square with "
        f"{b['square_queries']} queries, {b['steps']} steps, BPDA / EoT / rejection-aware scores as its checks call "
        f"for, {b['escalate']} escalation round(s) at most), then the defense-aware attacks advlab has (M-SVDD-D "
        "full-knowledge, I-defender likelihood hinge, PCL joint loss and prototype scores), as one survivor chain; "
        "per sample the worst case of that chain, the claimed attack and the next smaller eps. Robust accuracy "
        "counts correct labels over all attacked images; a rejection (`REJECT`) is a detection, never correct "
        "(shown as *detected*); clean rejections are the clean test set's false-positive rate.")
    key = f"{headline[0]}/{headline[1]:g}"
    cols = ["rank", "defense", "clean accuracy", "clean rejections", "claimed threat", "claimed robust",
            "adaptive robust", "adaptive detected", "flags", "training s", "inference cost"]
    rep.add_table(f"Leaderboard at L-{headline[0]} eps {headline[1]:g} (%, ranked by adaptive robust accuracy)",
                  board, cols, key="leaderboard",
                  note="training s: seconds to fit the defense from the trained base model; inference cost: its "
                       "prediction time on the test set over the base model's. Clean accuracy and rejections are "
                       "on the whole test set; robust accuracies on the attacked images.")
    para = _rank_paragraph(rows, headline)
    if para:
        rep.add_text(para)
    grid_rows = []
    for r in rows:
        if r["status"] != "ok":
            continue
        g = {"defense": r["defense"], "claimed threat": r["claimed_threat"]}
        for cell_key, c in r["cells"].items():
            g[f"L-{c['norm']} {c['eps']:g}"] = (f"{100 * c['claimed_robust']:.1f} / {100 * c['adaptive_robust']:.1f}"
                                               + (f" (+{100 * c['adaptive_detected']:.1f} det.)"
                                                  if c["adaptive_detected"] > 0 else ""))
        grid_rows.append(g)
    rep.add_table("Robust accuracy at every eps (claimed / adaptive, %)", grid_rows, key="grid",
                  note="det.: adversarials rejected by the defense (detections), not counted as robust.")
    flag_rows = [{"defense": r["defense"], "cell": k, "flag": f["name"], "message": f["message"]}
                 for r in rows if r["status"] == "ok" for k, c in r["cells"].items() for f in c["outcome_flags"]]
    flag_rows += [{"defense": r["defense"], "cell": k, "flag": name, "message": "raised by evaluate's checks"}
                  for r in rows if r["status"] == "ok" for k, c in r["cells"].items() for name in c["masking_flags"]]
    if flag_rows:
        rep.add_table("Flags (masking checks and attack outcomes)", flag_rows, key="flags",
                      note="What each flag means: the masking-flag table of the documentation (docs/concepts.md, "
                           "'Masking flags'). A flag raised by evaluate's checks made it escalate on that cell; the "
                           "attack-outcome flags compare the claimed attack with the adaptive white-box chain alone "
                           "(the adaptive number is the worst case of both either way).")
    errors = [{"defense": r["defense"], "where": r.get("where"), "error": r["error"]} for r in rows
              if r["status"] != "ok"]
    if errors:
        rep.add_table("Defenses that failed", errors, key="errors")
    for norm, values in grid.items():
        if not values:
            continue
        curves = {}
        for r in rows:
            if r["status"] != "ok":
                continue
            cs = [r["cells"][f"{norm}/{e:g}"] for e in values]
            xs, clean = [0.0] + list(values), 100 * cs[0]["clean_accuracy"]  # eps 0: clean, on the attacked images
            curves[r["defense"]] = {"claimed": (xs, [clean] + [100 * c["claimed_robust"] for c in cs]),
                                    "adaptive": (xs, [clean] + [100 * c["adaptive_robust"] for c in cs])}
        if curves:
            rep.add_figure(f"robust-accuracy-l{norm}", robustness_curves(
                curves, f"robust accuracy vs L-{norm} eps ({n} images; dashed: claimed, solid: adaptive)",
                xlabel=f"L-{norm} eps"), f"robust accuracy against L-{norm} eps, claimed (dashed) and adaptive (solid)")
    pts = {r["defense"]: (100 * r["clean_accuracy"], 100 * r["cells"][key]["adaptive_robust"])
           for r in rows if r["status"] == "ok" and key in r.get("cells", {})}
    if pts:
        rep.add_figure("clean-vs-adaptive", scatter_labelled(
            pts, f"clean vs adaptive robust accuracy (L-{headline[0]} {headline[1]:g})", "clean accuracy (%)",
            "adaptive robust accuracy (%)"), "clean accuracy against adaptive robust accuracy at the headline eps")
    notes = [{"defense": r["defense"], "parameters": ", ".join(f"{k}={v}" for k, v in r["params"].items()) or
              "defaults", "notes": "; ".join(r.get("notes") or []) or ""} for r in rows]
    rep.add_table("Each defense's fit", notes, key="fits")
    compute = base_info.get("seconds", 0.0) + sum(r.get("fit_seconds", 0.0) + sum(
        c["seconds"] for c in r.get("cells", {}).values()) for r in rows)
    rep.add_text(f"Budget: the base model's training, the fits and the attacks took {compute / 60:.1f} min of compute "
                 "as measured when each stage was computed (a resumed run reads finished stages back; the total at "
                 "the bottom is this run's own wall time).")
    rep.results.update(rows=rows, leaderboard=board, headline=list(headline), base_model=base_info,
                       compute_seconds=compute)
