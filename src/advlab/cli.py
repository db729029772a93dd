"""The ``advlab`` command: demo, train, attack, evaluate, exam, defend, reproduce, datasets, models.

Errors print one line and exit non-zero; ``--debug`` shows the traceback."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional

from . import __version__
from ._util import AdvlabError, EpsUnitWarning

from .attacks.registry import ATTACKS, attack_parameters, build_attack

#: attack parameters exposed as flags: flag -> (type, help)
ATTACK_FLAGS = {
    "eps": (float, "perturbation budget in pixel units ([0,1] scale)"),
    "alpha": (float, "step size"),
    "steps": (int, "iterations"),
    "norm": (str, "threat model norm: inf or 2 (pgd)"),
    "decay": (float, "momentum decay (mim)"),
    "c": (float, "initial trade-off constant (cw, lbfgs)"),
    "confidence": (float, "margin kappa (cw)"),
    "lr": (float, "optimizer learning rate (cw, ka3)"),
    "binary_search_steps": (int, "searches over c (cw, lbfgs)"),
    "overshoot": (float, "overshoot (deepfool)"),
    "num_candidates": (int, "candidate classes (deepfool)"),
    "theta": (float, "pixel change per step (jsma)"),
    "gamma": (float, "maximum fraction of pixels changed (jsma)"),
    "K": (int, "anonymity level K (ka3)"),
    "similarity": (str, "similarity loss: cw-ssim, ssim or none (ka3)"),
    "lam": (float, "weight of the similarity term (ka3)"),
    "seed": (int, "seed for random starts"),
}


def _progress(args) -> bool | None:
    """Progress bars: off with --quiet (or $ADVLAB_QUIET), else on a terminal only (None = auto)."""
    return False if getattr(args, "quiet", False) else None


def _err(msg: str) -> AdvlabError:
    return AdvlabError(msg)


def build_attacks(names: List[str], model, **params) -> Dict[str, object]:
    """Build several registered attacks sharing the flags: each takes the flags it accepts; a flag
    that none of them accepts is an error."""
    params = {k: v for k, v in params.items() if v is not None}  # unset flags keep the class defaults
    # without --seed, every attack with a random start is seeded with 0: a command gives the same numbers
    # whatever ran before it in the process (torch's global stream is not the command's to depend on)
    seeded = lambda n: {} if "seed" in params or "seed" not in attack_parameters(n) else {"seed": 0}  # noqa: E731
    if len(names) == 1:
        return {names[0]: _flag_errors(build_attack, names[0], model, **params, **seeded(names[0]))}
    accepted = {n: attack_parameters(n) for n in names}
    for k, v in params.items():
        if v is not None and not any(k in a for a in accepted.values()):
            raise _err(f"none of the attacks {', '.join(names)} takes --{k.replace('_', '-')}")
    return {n: build_attack(n, model, **{k: v for k, v in params.items() if k in accepted[n]}, **seeded(n))
            for n in names}


def _flag_errors(fn, name, model, **params):
    bad = [k for k, v in params.items() if v is not None and k not in attack_parameters(name)]
    if bad:
        raise _err(f"attack {name!r} does not take --{bad[0].replace('_', '-')}; it takes: "
                   + ", ".join(f"--{p.replace('_', '-')}" for p in sorted(attack_parameters(name))))
    return fn(name, model, **params)


# ----------------------------------------------------------------------------- commands

def cmd_datasets(args) -> int:
    from .data import DATASETS, dataset_info, download_dataset

    if args.download:
        paths = download_dataset(args.download, root=args.root, mirrors=args.mirror or None)
        folder = Path(paths[0]).parent if paths else args.root
        print(f"{args.download}: files ready in {folder}")
        for p in (paths or []):
            print(f"  {p}")
        return 0
    if args.name:
        info = dataset_info(args.name)
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{'name':<16} description")
    for name in sorted(DATASETS):
        print(f"{name:<16} {DATASETS[name][1]}")
    return 0


def cmd_models(args) -> int:
    from .models import MODELS, build_model, count_parameters

    print(f"{'name':<12} {'input':<10} {'params':>10} {'params@1x8x8':>13}  description")
    for name in sorted(MODELS):
        _, shape, desc = MODELS[name]
        n = count_parameters(build_model(name, 10, shape))
        try:
            n8 = f"{count_parameters(build_model(name, 10, (1, 8, 8))):,}"
        except Exception:
            n8 = "-"
        print(f"{name:<12} {'x'.join(map(str, shape)):<10} {n:>10,} {n8:>13}  {desc}")
    return 0


def _load_data(name: str, root, split: str, download: bool = False):
    from .data import load_dataset

    return load_dataset(name, root=root, split=split, download=download)


def cmd_train(args) -> int:
    from .models import build_model
    from .train import accuracy, fit, save_checkpoint

    from .models import model_info

    model_info(args.model)  # unknown names fail before any data is read
    train = _load_data(args.dataset, args.root, "train", args.download)
    test = _load_data(args.dataset, args.root, "test", args.download)
    mean, std = train.channel_stats()
    model = build_model(args.model, train.num_classes, train.in_shape, mean=mean, std=std, seed=args.seed)
    hist = fit(model, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
               schedule=None if args.schedule == "none" else args.schedule, seed=args.seed, device=args.device,
               eval_dataset=test, progress=_progress(args))
    acc = accuracy(model, test)
    out = Path(args.out)
    save_checkpoint(model, out, dataset=args.dataset, test_accuracy=acc, epochs=args.epochs, seed=args.seed,
                    history=hist.epochs)
    print(f"{args.model} on {args.dataset}: test accuracy {acc:.4f} after {len(hist.epochs)} epochs "
          f"({sum(e['seconds'] for e in hist.epochs):.1f} s); checkpoint {out}")
    return 0


def _inputs(args, split: str = "test"):
    """The model (``--model``/``--checkpoint`` with ``--weights --mean --std --num-classes``) and
    its test images (``--dataset``/``--root``, or ``--data`` with ``--labels``, and
    ``--dataset-option``), checked against each other before any attack (advlab.models.inputs)."""
    from . import defenses  # noqa: F401 - registers the saved defenses' formats with the model loader
    from .models.inputs import load_inputs, parse_options

    options = parse_options(getattr(args, "dataset_option", None))  # malformed options fail before any file is read
    if args.num_classes is not None and args.num_classes < 2:
        raise _err(f"--num-classes must be an integer >= 2, got {args.num_classes}")
    return load_inputs(args.checkpoint, args.weights, dataset=args.dataset, root=args.root, data=args.data,
                       labels=args.labels, options=options, mean=args.mean, std=args.std,
                       num_classes=args.num_classes, device=args.device, split=split)


def _log(inputs) -> None:
    """Say how the model and the data were read (stderr), once everything fits."""
    if os.environ.get("ADVLAB_QUIET"):
        return
    print(f"advlab: model: {inputs.loaded.describe()}; data: {inputs.dataset}, {len(inputs.test)} images of shape "
          f"{tuple(inputs.test.images.shape[1:])}", file=sys.stderr)
    for note in inputs.notes:
        print(f"advlab: note: {note}", file=sys.stderr)


def _model_section(rep, inputs, args) -> None:
    info = inputs.loaded.to_dict()
    info["data"] = {"name": inputs.dataset, "n": len(inputs.test), "shape": list(inputs.test.images.shape[1:]),
                    "notes": list(inputs.notes)}
    rep.results["model"] = info
    rep.results["checkpoint"] = {"path": str(args.checkpoint), "metadata": info["metadata"]}
    rep.add_text(f"Model: {inputs.loaded.describe()}; data: {inputs.dataset}"
                 + (f" ({'; '.join(inputs.notes)})" if inputs.notes else "") + ".")
    if args.eps is not None:
        from ._util import format_eps

        eps = args.eps if isinstance(args.eps, list) else [args.eps]
        rep.add_text("eps: " + ", ".join(format_eps(e) for e in eps) + " (pixel units on [0, 1]).")


def cmd_attack(args) -> int:
    from ._util import check_eps_units
    from .eval.figures import example_grid
    from .eval.report import Report, markdown_table
    from .eval.runner import AttackRun, pick_images, run_attacks

    names = [a.strip() for a in args.attack.split(",") if a.strip()]
    if not names:
        raise _err(f"--attack names no attack; valid names: {', '.join(ATTACKS)}")
    inputs = _inputs(args)
    model, dataset, test = inputs.model, inputs.dataset, inputs.test
    x, y = pick_images(model, test, args.n, only_correct=args.only_correct, seed=args.seed or 0)
    if args.eps is not None:
        check_eps_units(max(args.eps) if isinstance(args.eps, list) else args.eps, args.norm or "inf", x.shape[1:])
    params = {k: getattr(args, k) for k in ATTACK_FLAGS}
    if isinstance(args.eps, list):  # --eps 0.05,0.1,0.2: one accuracy-vs-eps sweep per attack
        from .eval.sweep import check_epsilons, eps_sweep, sweeps_figure

        check_epsilons(args.eps, "--eps")
        rest = {k: v for k, v in params.items() if k not in ("eps", "seed") and v is not None}
        accepted = {n: attack_parameters(n) for n in names}
        for k in rest:
            if not any(k in a for a in accepted.values()):
                flag = f"--{k.replace('_', '-')}"
                raise _err(f"attack {names[0]!r} does not take {flag}; it takes: "
                           + ", ".join(f"--{p.replace('_', '-')}" for p in sorted(accepted[names[0]]))
                           if len(names) == 1 else f"none of the attacks {', '.join(names)} takes {flag}")
        _log(inputs)
        sweeps = [eps_sweep(n, model, x, y, epsilons=args.eps, seed=args.seed or 0, batch_size=args.batch_size,
                            progress=_progress(args), **{k: v for k, v in rest.items() if k in accepted[n]})
                  for n in names]
        rep = Report(args.out, f"advlab attack: {', '.join(names)} on {dataset}, eps sweep",
                     spec={"command": "attack", **{k: v for k, v in vars(args).items() if k != "func"}},
                     seed=args.seed)
        rows = [r for sw in sweeps for r in sw.rows()]
        cols = ["attack", "norm", "eps", "robust accuracy", "success rate", "detected"]
        rep.add_text(f"{x.shape[0]} test images of {dataset}; clean accuracy {100 * sweeps[0].clean_accuracy:.2f}%.")
        rep.add_table("Accuracy vs eps", rows, cols,
                      note="Robust accuracy is over all images, success rate and detected over those classified "
                           "correctly when clean. A fixed-budget attack is run at each eps; a minimum-norm attack "
                           "(cw, deepfool, lbfgs: L2; jsma: L0, changed pixels) runs once, and an image counts as "
                           "broken at eps when its adversarial's norm is <= eps.")
        rep.add_figure("accuracy-vs-eps", sweeps_figure(sweeps), "robust accuracy against eps")
        rep.results["sweep"] = {sw.attack: sw.to_dict() for sw in sweeps}
        _model_section(rep, inputs, args)
        out = rep.save()
        print(markdown_table(rows, cols))
        print(f"report: {out}")
        return 0
    attacks = build_attacks(names, model, **params)
    _log(inputs)
    ev = run_attacks([AttackRun(n, a) for n, a in attacks.items()], x, y, batch_size=args.batch_size,
                     progress=_progress(args))
    rows, results = ev.rows, ev.results
    if len(rows) > 1:
        rows.append(ev.worst_row())
    rep = Report(args.out, f"advlab attack: {', '.join(names)} on {dataset}",
                 spec={"command": "attack", **{k: v for k, v in vars(args).items() if k != "func"}}, seed=args.seed)
    cols = ["attack", "n", "clean_acc", "robust_acc", "asr", "mean_l2", "median_l2", "mean_linf", "mean_l0", "ssim",
            "mse", "seconds"]
    rep.add_table("Attack results", rows, cols,
                  note="ASR, norms, SSIM and MSE are over the samples the model classified correctly when clean; "
                       "norms and similarities over the successful adversarials.")
    grid = {n: r.adversarials[:8] for n, r in results.items()}
    rep.add_figure("examples", example_grid(x[:8], grid, magnify=10, labels=[str(int(v)) for v in y[:8]]),
                   "clean / adversarial / perturbation x10")
    _model_section(rep, inputs, args)
    for n, r in results.items():
        if n == "ka3" and "rank" in r.extras:
            _ka3_extras(rep, n, r)
    out = rep.save()
    print(markdown_table(rows, cols))
    print(f"report: {out}")
    return 0


def _ka3_extras(rep, name, res) -> None:
    from .eval.figures import rank_pmf_figure
    from .metrics.anonymity import rank_pmf

    pmf = rank_pmf(res.extras["rank"], 10)
    rep.results[f"{name}_rank_pmf"] = pmf
    rep.add_figure(f"{name}-rank-pmf", rank_pmf_figure({name: pmf}), "rank pmf of the true label (Fig. 4)")


def cmd_demo(args) -> int:
    from .eval.demo import run_demo

    out = run_demo(out_dir=args.out, dataset=args.dataset, root=args.root, quick=args.quick, device=args.device,
                   progress=_progress(args), seed=args.seed)
    print(out["table"])
    print(f"report: {out['path']}")
    return 0


def cmd_exam(args) -> int:
    from .exam import ADAPTIVE, run_exam
    from .eval.report import markdown_table

    entries = [e.strip() for e in args.entries.split(",") if e.strip()] if args.entries else None
    out = run_exam(out_dir=args.out, quick=args.quick, dataset=args.dataset, root=args.root, entries=entries,
                   n=args.n, seed=args.seed, progress=_progress(args))
    cols = ["entry", "naive PGD-CE", "evaluate", ADAPTIVE, "flags", "verdict"]
    print(markdown_table([{k: (f"{100 * r[k]:.1f}" if isinstance(r[k], float) else r[k]) for k in cols}
                          for r in out["rows"]], cols))
    print(f"report: {out['path']}")
    bad = [r["entry"] for r in out["rows"] if r["verdict"] not in ("seen through", "sound")]
    if bad:
        print(f"the evaluator failed its exam on: {', '.join(bad)}")
    return 1 if bad else 0


def cmd_reproduce(args) -> int:
    from .papers import list_reproductions, reproduce

    if args.list or not args.name:
        print(f"{'name':<16} description")
        for name, desc in list_reproductions():
            print(f"{name:<16} {desc}")
        return 0
    out = args.out or os.path.join("results", Path(args.name).stem + ("-quick" if args.quick else ""))
    try:
        with _sigterm_as_interrupt():
            rep = reproduce(args.name, out, quick=args.quick, data_root=args.data_root, device=args.device,
                            fresh=args.fresh)
    except KeyboardInterrupt:
        print(f"advlab: interrupted; the finished stages are kept in {Path(out) / '.stages'}: run the same command "
              "again to resume (--fresh starts over)", file=sys.stderr)
        return 130
    print(Path(rep.out_dir, "report.md").read_text())
    print(f"report: {rep.out_dir}")
    return 0


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (``kill``) unwinds like Ctrl-C for the block, so temporary files are removed and
    the finished stages stay (the main thread only; elsewhere the handler is left as it is)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _torchrun(args, command: str = "evaluate", positional: tuple = ()) -> int:
    """``--launcher torchrun``: run this same command again under ``torchrun --standalone
    --nproc_per_node N -m advlab.cli COMMAND ...`` (one machine; for several, call torchrun
    yourself with --nnodes and a rendezvous endpoint). torchrun's own agent runs in this process;
    the command's arguments are handed over after parsing (torchrun's parser would take ``--n``
    for an abbreviation of its own options); ``positional``: the argument names passed without a flag."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    skip = {"func", "command", "launcher", "nproc", *positional}
    argv = [command] + [str(getattr(args, k)) for k in positional if getattr(args, k, None) is not None]
    for k, v in vars(args).items():
        if k in skip or v is None or v is False:
            continue
        for item in (v if isinstance(v, list) else [v]):  # --dataset-option, --defense, --param repeat
            argv += [f"--{k.replace('_', '-')}"] + ([] if item is True else [repr(item) if isinstance(item, float)
                                                                             else str(item)])
    if args.nproc < 1:
        raise _err(f"--nproc must be >= 1, got {args.nproc}")
    launch = torchrun.get_args_parser().parse_args(["--standalone", f"--nproc_per_node={args.nproc}", "-m",
                                                    "advlab.cli"])
    launch.training_script_args = argv
    try:
        torchrun.run(launch)
    except ChildFailedError as e:
        print(f"advlab: error: a torchrun worker failed ({e.get_first_failure()[1].message})", file=sys.stderr)
        return 1
    return 0


def _evaluate_sweep(args) -> Optional[List[float]]:
    """Check ``advlab evaluate``'s numbers (each error names its flag) and return the sweep's eps
    values (None for ``--sweep none``)."""
    from ._util import check_nonneg, check_positive_int
    from .attacks.geometry import check_norm
    from .eval.evaluate import STAGES

    check_nonneg(args.eps, "--eps")
    check_norm(args.norm)
    for flag in ("n", "steps", "square_queries", "targets", "batch_size", "nproc"):
        check_positive_int(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.reported is not None and not 0.0 <= args.reported <= 1.0:
        raise _err(f"--reported must be an accuracy in [0, 1], got {args.reported}")
    if args.attacks is not None:
        stages = [a.strip() for a in args.attacks.split(",") if a.strip()]
        unknown = [a for a in stages if a not in STAGES]
        if unknown or not stages:
            raise _err(f"--attacks must name stages among {', '.join(STAGES)}, got {args.attacks!r}")
    if args.sweep == "none":
        return None
    parts = [v.strip() for v in (args.sweep or "0.25,0.5,2").split(",")]
    try:
        values = [float(v) * (1 if args.sweep else args.eps) for v in parts]
    except ValueError:
        raise _err(f"--sweep must be 'none' or comma-separated eps values, got {args.sweep!r}") from None
    for v in values:
        check_nonneg(v, "--sweep eps")
    return values


def cmd_evaluate(args) -> int:
    from . import distributed
    from .eval.evaluate import BATTERY, evaluate, write_report
    from .eval.runner import pick_images

    sweep = _evaluate_sweep(args)  # every number is checked before a process is launched or a file read
    if getattr(args, "launcher", "none") == "torchrun" and "LOCAL_RANK" not in os.environ:
        return _torchrun(args, "evaluate")
    distributed.init()  # under torchrun: join the process group (the battery's attacks shard); alone: nothing

    inputs = _inputs(args)
    model, dataset = inputs.model, inputs.dataset
    x, y = pick_images(model, inputs.test, args.n, seed=args.seed)
    if distributed.is_main():
        _log(inputs)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()] if args.attacks else list(BATTERY)
    res = evaluate(model, x, y, norm=args.norm, eps=args.eps, seed=args.seed, steps=args.steps,
                   square_queries=args.square_queries, targets=args.targets, attacks=attacks,
                   batch_size=args.batch_size, sweep=sweep, progress=_progress(args))
    if not distributed.is_main():  # every rank holds the gathered result; rank 0 writes it
        return 0
    info = inputs.loaded.to_dict()
    info["data"] = {"name": dataset, "n": len(x), "notes": list(inputs.notes)}
    out = write_report(res, args.out, f"advlab evaluate: {Path(args.checkpoint).name} on {dataset}",
                       reported=args.reported, spec={k: v for k, v in vars(args).items() if k != "func"}, model=info)
    print(Path(out, "report.md").read_text())
    print(f"report: {out}")
    return 0


def _compare_options(args) -> dict:
    """``advlab compare``'s flags (over a ``--spec`` YAML's keys) as :func:`advlab.eval.compare.compare`'s
    keyword arguments; every value is checked before any data is read."""
    import yaml

    from ._util import check_positive_int, parse_eps

    opts: dict = {}
    if args.spec:
        try:
            spec = yaml.safe_load(Path(args.spec).read_text())
        except yaml.YAMLError as e:
            raise _err(f"--spec {args.spec} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(spec, dict):
            raise _err(f"--spec {args.spec} must hold a mapping of compare's options")
        known = {"defenses", "dataset", "root", "model", "weights", "train", "eps", "headline", "n", "budget",
                 "params", "seed"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise _err(f"--spec key {unknown[0]!r} is not one of compare's: {', '.join(sorted(known))}")
        opts.update(spec)
        if isinstance(opts.get("headline"), dict):
            opts["headline"] = (opts["headline"].get("norm", "inf"), opts["headline"].get("eps"))
    if args.defense:
        opts["defenses"] = list(args.defense)
    for key in ("dataset", "root", "model", "weights"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    eps = dict(opts.get("eps") or {})
    for norm, flag in (("inf", "eps_inf"), ("2", "eps_l2")):
        text = getattr(args, flag)
        if text is not None:
            eps[norm] = [parse_eps(v.strip(), "--" + flag.replace("_", "-")) for v in text.split(",") if v.strip()]
    if eps:
        opts["eps"] = eps
    if args.headline:
        norm, _, value = args.headline.partition(":")
        if not value:
            raise _err(f"--headline must be NORM:EPS such as inf:0.3 or 2:1.5, got {args.headline!r}")
        opts["headline"] = (norm, parse_eps(value, "--headline eps"))
    if args.n is not None:
        opts["n"] = check_positive_int(args.n, "--n")
    budget = dict(opts.get("budget") or {})
    for key in ("steps", "targets", "square_queries", "escalate"):
        if getattr(args, key) is not None:
            budget[key] = check_positive_int(getattr(args, key), "--" + key.replace("_", "-"),
                                             0 if key == "escalate" else 1)
    if budget:
        opts["budget"] = budget
    params = {k: dict(v or {}) for k, v in (opts.get("params") or {}).items()}
    for item in args.param or []:
        key, eq, value = item.partition("=")
        label, dot, name = key.rpartition(".")
        if not eq or not dot or not label or not name:
            raise _err(f"--param must be DEFENSE.NAME=VALUE such as msvdd.projections=64, got {item!r}")
        params.setdefault(label, {})[name] = yaml.safe_load(value)
    if params:
        opts["params"] = params
    if args.seed is not None:
        opts["seed"] = args.seed
    return opts


def cmd_compare(args) -> int:
    from . import distributed
    from ._util import check_positive_int
    from .eval.compare import compare
    from .eval.report import markdown_table

    opts = _compare_options(args)  # every flag checked before a process is launched or a file read
    if args.launcher == "torchrun" and "LOCAL_RANK" not in os.environ:
        check_positive_int(args.nproc, "--nproc")
        return _torchrun(args, "compare")
    distributed.init()
    with _sigterm_as_interrupt():
        try:
            out = compare(quick=args.quick, out_dir=args.out, fresh=args.fresh, device=args.device,
                          progress=_progress(args), log=lambda m: print(m, flush=True), **opts)
        except KeyboardInterrupt:
            print(f"advlab: interrupted; the finished stages are kept in {Path(args.out) / '.stages'}: run the same "
                  "command again to resume (--fresh starts over)", file=sys.stderr)
            return 130
    if not distributed.is_main():
        return 0
    cols = ["rank", "defense", "clean accuracy", "claimed robust", "adaptive robust", "adaptive detected", "flags"]
    print(markdown_table(out.leaderboard, cols))
    print(f"report: {out.out_dir}")
    return 0


def cmd_bound(args) -> int:
    from ._util import check_device, check_positive, check_positive_int
    from .eval.defend import bound_command

    # checked before the dataset is read and the all-pairs search starts
    for k in args.k:
        check_positive(k, "--k")
    check_positive(args.max_tile_mb, "--max-tile-mb")
    if args.subset is not None:
        check_positive_int(args.subset, "--subset")
    if args.device is not None:
        check_device(args.device, "--device")
    rep = bound_command(args.dataset, args.root, args.out, ks=args.k, split=args.split, subset=args.subset,
                        seed=args.seed, device=args.device, max_tile_mb=args.max_tile_mb, method=args.method,
                        progress=_progress(args))
    print(Path(rep.out_dir, "report.md").read_text())
    print(f"report: {rep.out_dir}")
    return 0


def cmd_defend(args) -> int:
    from .eval.defend import run_defense

    rep = run_defense(args)
    print(Path(rep.out_dir, "report.md").read_text())
    print(f"report: {rep.out_dir}")
    return 0


# ----------------------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """argparse with advlab's error format: one line on stderr, ``advlab: error: ...``, exit code 2
    (the usage is one ``--help`` away). Subcommand parsers inherit the class."""

    def error(self, message: str):
        cmd = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        self.exit(2, f"advlab: error: {cmd + ': ' if cmd else ''}{message} (see `{self.prog} --help`)\n")


def _add_launcher(p, note: str = "") -> None:
    """``--launcher`` and ``--nproc`` of the commands whose attacks shard under torchrun."""
    p.add_argument("--launcher", choices=("none", "torchrun"), default="none", help="torchrun: shard the "
                   f"attacks over --nproc processes on this machine{note}")
    p.add_argument("--nproc", type=int, default=2, help="processes for --launcher torchrun")


def _add_common(p):
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: cpu, or the checkpoint's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _eps_arg(text: str) -> float:
    """``--eps``: a number or a fraction (8/255, 0.3, 2e-2), by the one parser (advlab._util.parse_eps)."""
    from ._util import parse_eps

    try:
        return parse_eps(text, "eps", check=False)  # the range is checked with the other numbers, naming --eps
    except AdvlabError:
        raise argparse.ArgumentTypeError(f"invalid float or fraction {text!r} (e.g. 8/255, 0.03)") from None


def _add_model_and_data(p) -> None:
    """The flags of the one model loader and the data the model is evaluated on."""
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True, metavar="SOURCE",
                   help="the model: an advlab checkpoint or saved defense, a torch.export program (.pt2), a "
                   "TorchScript archive, or package.module:factory (your code, importable from the working directory; "
                   "with --weights); --model and --checkpoint are the same flag. Never a plain pickle")
    p.add_argument("--weights", default=None, metavar="FILE", help="weights of a package.module:factory model: a state "
                   "dict (torch.save(model.state_dict(), FILE), read weights-only) or a .safetensors file")
    p.add_argument("--mean", default=None, help="per-channel mean the model expects, e.g. 0.485,0.456,0.406: the model "
                   "is wrapped in advlab's Normalize so attacks stay in [0, 1] pixels (with --std)")
    p.add_argument("--std", default=None, help="per-channel std the model expects (with --mean)")
    p.add_argument("--num-classes", type=int, default=None, help="check the model's output has this many classes")
    p.add_argument("--dataset", default=None, help="dataset (default: the checkpoint's); 'folder' reads --root "
                   "with the model's channels and size")
    p.add_argument("--root", default=None, help="folder of the dataset's files")
    p.add_argument("--data", default=None, metavar="FILE", help="your test data instead of --dataset: a .npz (x/y or "
                   "images/labels; uint8 0-255 or float [0,1]; NHWC or NCHW), a .npy of images with --labels, or an "
                   "image folder root/<class>/*.png (all of it, read with the model's channels and size)")
    p.add_argument("--labels", default=None, metavar="FILE", help="the labels .npy beside --data images.npy")
    p.add_argument("--dataset-option", action="append", default=None, metavar="KEY=VALUE",
                   help="an option of the data loader (repeatable): folder: grayscale=true, size=28,28, "
                   "test_fraction=0.2; --data: layout=nhwc, x_key=NAME, y_key=NAME, scale=255")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="advlab", description="Adversarial robustness of image classifiers: "
                                "attack, defend, detect and measure it honestly.")
    p.add_argument("--version", action="version", version=f"advlab {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("datasets", help="list the datasets, show one, or download one (checked)")
    s.add_argument("name", nargs="?", help="show this dataset's files, checksums and mirrors")
    s.add_argument("--download", metavar="NAME", help="fetch the official files of NAME into --root, "
                   "checking SHA-256 (mnist, fashion-mnist, cifar10, svhn)")
    s.add_argument("--root", default=None, help="target folder (default $ADVLAB_DATA/NAME or ~/.cache/advlab/NAME)")
    s.add_argument("--mirror", action="append", help="base URL or folder to fetch from instead of the official "
                   "mirrors (repeatable; also $ADVLAB_MIRROR)")
    s.set_defaults(func=cmd_datasets)
    s = sub.add_parser("models", help="list the models with parameter counts")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("train", help="train a model and write a checkpoint")
    s.add_argument("--model", required=True, help="model name (see `advlab models`)")
    s.add_argument("--dataset", required=True, help="dataset name (see `advlab datasets`)")
    s.add_argument("--root", default=None, help="folder of the dataset's files")
    s.add_argument("--download", action="store_true", help="fetch the official files into --root (checked)")
    s.add_argument("--epochs", type=int, default=3)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    s.add_argument("--schedule", default="onecycle", choices=["none", "cosine", "step", "onecycle"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="model.pt", help="checkpoint path (default model.pt)")
    _add_common(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("attack", help="attack a model (advlab checkpoint, torch.export, TorchScript or your code's) "
                       "and write a report")
    _add_model_and_data(s)
    s.add_argument("--attack", required=True, help="attack name(s), comma-separated: " + ", ".join(ATTACKS))
    s.add_argument("--n", type=int, default=1000, help="number of test images")
    s.add_argument("--only-correct", action="store_true", help="attack only correctly classified images")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--out", default="results/attack")

    def eps_values(text: str):
        """One eps (a float: a single attack, as always) or a comma list of them (a sweep); each a
        number or a fraction (8/255)."""
        parts = [v.strip() for v in text.split(",") if v.strip()]
        try:
            values = [_eps_arg(v) for v in parts]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"invalid eps {text!r}: expected a number or a fraction such as 8/255, "
                                             "or a comma-separated list of them (a sweep)") from None
        if not values:
            raise argparse.ArgumentTypeError(f"invalid eps {text!r}: expected a number such as 8/255 or 0.03")
        return values[0] if len(values) == 1 else values
    for flag, (typ, help_) in ATTACK_FLAGS.items():
        if flag == "eps":
            typ, help_ = eps_values, (help_ + ", a number or a fraction (8/255); a comma-separated list (0.05,0.1,0.2) "
                                      "runs an accuracy-vs-eps sweep")
        s.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=typ, default=None, help=help_)
    _add_common(s)
    s.set_defaults(func=cmd_attack)

    s = sub.add_parser("evaluate", help="honest robustness evaluation of a model (APGD-CE, APGD-T, FAB-T, Square, "
                       "masking checks, eps sweep)")
    _add_model_and_data(s)
    s.add_argument("--norm", default="inf", help="inf or 2")
    s.add_argument("--eps", type=_eps_arg, required=True, help="perturbation budget in pixel units ([0,1] scale): "
                   "a number or a fraction, e.g. 8/255 or 0.3")
    s.add_argument("--n", type=int, default=1000, help="number of test images (seeded order)")
    s.add_argument("--reported", type=float, default=None, help="a published robust accuracy to set beside ours")
    s.add_argument("--attacks", default=None, help="stages, comma-separated (default APGD-CE,APGD-T,FAB-T,Square; "
                   "APGD-T-CE joins against a defense that rejects)")
    s.add_argument("--steps", type=int, default=100, help="APGD iterations")
    s.add_argument("--square-queries", type=int, default=5000, help="Square's query budget per image")
    s.add_argument("--targets", type=int, default=9, help="wrong classes APGD-T runs against, highest clean "
                   "logit first (default 9, the reference AutoAttack's)")
    s.add_argument("--sweep", default=None, help="eps values for the accuracy-vs-eps curve, comma-separated "
                   "(default: 0.25, 0.5 and 2 times --eps; 'none' to skip)")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="results/evaluate")
    _add_launcher(s, " (same report as one process)")
    _add_common(s)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("compare", help="fit several defenses from one base model and attack them under the same "
                       "conditions (claimed threat model and adaptive attacker): a leaderboard report")
    s.add_argument("--defense", action="append", metavar="NAME", help="a defense: a registry name (none, madry, "
                   "msvdd, pcl, vib, idefender) or package.module:Class implementing the Defense contract "
                   "(repeatable; default: the six registry rows)")
    s.add_argument("--spec", default=None, help="a YAML file with compare's options (defenses, dataset, model, eps, "
                   "headline, n, budget, params, seed); flags override it")
    s.add_argument("--dataset", default=None, help="digits (embedded, default), mnist or fashion-mnist")
    s.add_argument("--root", default=None, help="folder of the dataset's files (default: the shared data folder)")
    s.add_argument("--model", default=None, help="the base model: a zoo name trained here (default lenet5), or your "
                   "model file / module:factory (with --weights)")
    s.add_argument("--weights", default=None, help="weights for a module:factory --model")
    s.add_argument("--eps-inf", default=None, help="L-inf eps grid, comma-separated (pixel units; 8/255 allowed)")
    s.add_argument("--eps-l2", default=None, help="L2 eps grid, comma-separated ('' for none)")
    s.add_argument("--headline", default=None, help="NORM:EPS the leaderboard ranks by, e.g. inf:0.3")
    s.add_argument("--n", type=int, default=None, help="test images attacked (default 100; 32 with --quick)")
    s.add_argument("--steps", type=int, default=None, help="iterations of APGD, FAB and the defense-aware attacks")
    s.add_argument("--targets", type=int, default=None, help="target classes of APGD-T and FAB-T")
    s.add_argument("--square-queries", type=int, default=None, help="Square's queries per image")
    s.add_argument("--escalate", type=int, default=None, help="evaluate's escalation rounds at most")
    s.add_argument("--param", action="append", metavar="DEFENSE.NAME=VALUE", help="a fit parameter over a "
                   "defense's default, e.g. msvdd.projections=64 (repeatable; VALUE read as YAML)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--quick", action="store_true", help="the embedded digits, tiny budgets (a smoke run, minutes)")
    s.add_argument("--fresh", action="store_true", help="start over instead of resuming from --out's finished stages")
    s.add_argument("--out", default="results/compare")
    _add_launcher(s)
    _add_common(s)
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("bound", help="the visual imperceptible bound of a dataset (VIB paper, eq. 2-3): table and "
                       "histogram")
    s.add_argument("--dataset", required=True, help="dataset name (see `advlab datasets`)")
    s.add_argument("--root", default=None, help="folder of the dataset's files")
    s.add_argument("--split", default="train", choices=["train", "test"])
    s.add_argument("--subset", type=int, default=None, help="use a seeded subset of N images")
    s.add_argument("--k", type=float, nargs="+", default=[1.0, 2.0, 2.5, 3.0], help="k values of sigma = d / 2k")
    s.add_argument("--max-tile-mb", type=float, default=64.0, help="memory per chunk of the all-pairs search")
    s.add_argument("--method", default="auto", choices=["auto", "brute", "pruned"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="results/bound")
    _add_common(s)
    s.set_defaults(func=cmd_bound)

    s = sub.add_parser("defend", help="build a defended model from a checkpoint and write its report")
    s.add_argument("defense", help="defense name: msvdd, pcl, idefender or vib (advlab.defenses.DEFENSES)")
    s.add_argument("--checkpoint", "--model", dest="checkpoint", required=True, metavar="CHECKPOINT",
                   help="an advlab checkpoint of a zoo model (advlab train)")
    s.add_argument("--dataset", default=None)
    s.add_argument("--root", default=None)
    s.add_argument("--n", type=int, default=500, help="test images for the attack evaluation")
    s.add_argument("--epochs", type=int, default=None, help="defense training epochs")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="results/defend")
    _add_common(s)
    s.set_defaults(func=cmd_defend)

    s = sub.add_parser("demo", help="train, attack and defend a small model; write a report (under a minute on one core)")
    s.add_argument("--dataset", default="digits", help="digits (embedded, default), mnist or fashion-mnist")
    s.add_argument("--root", default=None, help="folder of the dataset's files (mnist, fashion-mnist)")
    s.add_argument("--out", default="results/demo")
    s.add_argument("--quick", action="store_true", help="fewer images and steps (for tests)")
    s.add_argument("--seed", type=int, default=0)
    _add_common(s)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("exam", help="the evaluator's own exam: evaluate on defenses known to be broken (and two "
                       "sound controls) beside a naive PGD and each one's true robustness")
    s.add_argument("--quick", action="store_true", help="the embedded digits, a subset of the gallery, 64 images "
                   "(minutes; what CI runs)")
    s.add_argument("--dataset", default=None,
                   help="digits or mnist (default: the embedded digits; mnist needs --root and hours on a CPU)")
    s.add_argument("--root", default=None, help="folder of the dataset's files (mnist)")
    s.add_argument("--entries", default=None, help="gallery entries and controls, comma-separated (default: all)")
    s.add_argument("--n", type=int, default=None, help="test images (default 200, 64 with --quick)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="results/exam")
    _add_common(s)
    s.set_defaults(func=cmd_exam)

    s = sub.add_parser("reproduce", help="run a bundled paper reproduction (--list shows them) or your own "
                       "experiment spec (a YAML path)")
    s.add_argument("name", nargs="?", help="reproduction name, or the path of an experiment YAML")
    s.add_argument("--list", action="store_true", help="list the bundled reproductions")
    s.add_argument("--quick", action="store_true", help="small settings, a few minutes")
    s.add_argument("--out", default=None, help="report folder (default results/NAME)")
    s.add_argument("--data-root", default=None, help="folder holding mnist-10k/ and fashion-mnist/")
    s.add_argument("--fresh", action="store_true", help="ignore the stages a previous run of the same spec finished "
                   "in --out (by default an interrupted run resumes from them)")
    _add_common(s)
    s.set_defaults(func=cmd_reproduce)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """advlab's own warnings (an eps in the wrong units) as one ``advlab: warning:`` line."""
    if issubclass(category, EpsUnitWarning):
        print(f"advlab: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=file or sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "quiet", False):
        os.environ["ADVLAB_QUIET"] = "1"
    debug = args.debug or os.environ.get("ADVLAB_DEBUG")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("advlab: interrupted", file=sys.stderr)
        return 130
    except (AdvlabError, FileNotFoundError, PermissionError, OSError, ValueError, ImportError) as e:
        if debug:
            raise
        msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"advlab: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
