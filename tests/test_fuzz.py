"""Bad input on every public Python entry point: each case must raise ``AdvlabError`` whose message
names the offending argument (or file), never a traceback from deep inside torch, numpy or yaml,
and leave no temporary or half-written file behind.

The cases form a module-level catalogue, ``CASES`` (id -> case), e.g. ``"pgd/eps=nan"``; hypothesis
draws shapes, values and bytes on top of it (``HYPOTHESIS``). The CLI's cases live in
``test_fuzz_cli.py``, whose last test counts both catalogues (``pytest -s`` prints the count).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from advlab._util import AdvlabError
from helpers import catalogue_params, check_api_case, images, junk, labels, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------- the catalogue

@dataclass
class Case:
    """One named bad input: ``run(tmp)`` must raise AdvlabError whose message matches ``match``
    (a case-insensitive regular expression); ``after(tmp)`` checks what is left on disk."""

    id: str
    run: Callable[[Path], object]
    match: str
    after: Optional[Callable[[Path], None]] = None
    xfail: Optional[str] = None


#: id -> case; ids are "<entry point>/<bad input>"
CASES: Dict[str, Case] = {}
#: hypothesis properties (each one family of drawn bad inputs), id -> description
HYPOTHESIS: Dict[str, str] = {}


def bad(cid: str, match: str, run: Callable[[Path], object], after=None, xfail: Optional[str] = None) -> None:
    if cid in CASES:
        raise RuntimeError(f"duplicate fuzz case id {cid!r}")
    CASES[cid] = Case(cid, run, match, after, xfail)


def leftovers(root: Path) -> list:
    """Temporary or partial files under ``root`` (what an atomic writer must never leave)."""
    return [p for p in root.rglob("*") if p.name.endswith((".tmp", ".part", ".partial")) or p.name.startswith(".")
            and p.is_file()]


def absent(*names: str):
    def check(tmp: Path) -> None:
        for n in names:
            assert not (tmp / n).exists(), f"{n} was written although the call failed"
    return check


# --------------------------------------------------------------------------- shared small things

MODEL = tiny_model(classes=5)
X, Y = images(4), labels(4)


def _zoo(classes: int = 10):
    from advlab.models import build_model

    return build_model("lenet5", classes, (1, 8, 8), seed=0)


_DIGITS = {}


def digits(n: int = 60):
    if n not in _DIGITS:
        from advlab.data import load_dataset

        _DIGITS[n] = load_dataset("digits", split="train").subset(n, seed=0)
    return _DIGITS[n]


def _with(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[index] = value
    return t


#: bad image batches for the attacks (and every other image-taking entry point): name -> (x, needle)
BAD_X = {
    "x=3d": (torch.rand(1, 8, 8), r"\bx\b.*shape"),
    "x=5d": (torch.rand(2, 1, 1, 8, 8), r"\bx\b.*shape"),
    "x=2d": (torch.rand(4, 64), r"\bx\b.*shape"),
    "x=int": ((torch.rand(4, 1, 8, 8) * 255).to(torch.uint8), r"\bx\b.*float"),
    "x=bool": (torch.rand(4, 1, 8, 8) > 0.5, r"\bx\b.*float"),
    "x=nan": (_with(X, 3, NAN), r"\bx\b.*nan"),
    "x=inf": (_with(X, 5, INF), r"\bx\b.*(nan|infinite)"),
    "x=-inf": (_with(X, 7, -INF), r"\bx\b.*(nan|infinite)"),
    "x>1": (X * 255, r"\bx\b.*\[0, 1\]"),
    "x<0": (X - 0.5, r"\bx\b.*\[0, 1\]"),
    "x=list": (X.tolist(), r"\bx\b.*tensor"),
}

#: bad labels for a batch of 4 and 5 classes: name -> (y, needle)
BAD_Y = {
    "y=float": (Y.float(), r"\by\b.*integer"),
    "y=bool": (Y > 2, r"\by\b.*integer"),
    "y=2d": (Y.view(4, 1), r"\by\b.*shape"),
    "y=n-mismatch": (Y[:3], r"\by\b.*shape \(4,\)"),
    "y=too-many": (torch.cat([Y, Y]), r"\by\b.*shape \(4,\)"),
    "y=out-of-range": (_with(Y, 0, 5), r"\by\b.*outside \[0, 4\]"),
    "y=negative": (_with(Y, 1, -1), r"\by\b.*outside \[0, 4\]"),
    "y=list": (Y.tolist(), r"\by\b.*tensor"),
}


# --------------------------------------------------------------------------- attacks

def _attack_cases():
    from advlab.attacks.registry import ATTACKS, attack_parameters, build_attack

    # parameter -> bad values (those the attack takes are tried); each message must name it
    bad_params = {
        "eps": [-0.1, NAN, INF, "abc", True],
        "steps": [0, -3, 2.5, NAN, INF, "ten"],
        "alpha": [-0.01, NAN, INF],
        "lr": [0, -1.0, NAN],
        "c": [0, -1.0, NAN],
        "confidence": [-1.0, NAN],
        "binary_search_steps": [0],
        "overshoot": [-0.5, NAN],
        "num_candidates": [1],
        "theta": [0, NAN],
        "gamma": [0, 1.5],
        "K": [0, -2],
        "similarity": ["nope"],
        "lam": [0, -1.0],
        "queries": [0, -10],
        "p_init": [0, 1.5],
        "restarts": [0],
        "rho": [-0.1, 1.5],
        "norm": ["1", "l3", None],
        "loss": ["nope"],
        "decay": [-1.0, NAN],
        "targeted_classes": [0],
        "eot_iter": [0],
        "history": [0],
        "patience": [0],
        "growth": [0.5],
    }
    for name in ATTACKS:
        accepted = attack_parameters(name)
        for param, values in bad_params.items():
            if param not in accepted:
                continue
            for v in values:
                bad(f"{name}/{param}={v}", rf"\b{param}\b",   # a whole word: "eps" must not pass on "steps"
                    lambda tmp, n=name, p=param, v=v: build_attack(n, MODEL, **{p: v}))
        bad(f"{name}/unknown-param", r"does not take 'epsilon'", lambda tmp, n=name: build_attack(n, MODEL, epsilon=0.1))
        bad(f"{name}/model=not-a-module", r"model.*nn\.Module", lambda tmp, n=name: build_attack(n, lambda x: x))
        for key, (x, needle) in BAD_X.items():
            bad(f"{name}/{key}", needle, lambda tmp, n=name, x=x: build_attack(n, MODEL)(x, Y[: len(x)]))
        for key, (y, needle) in BAD_Y.items():
            bad(f"{name}/{key}", needle, lambda tmp, n=name, y=y: build_attack(n, MODEL)(X, y))
    bad("attacks/unknown-name", r"unknown attack 'pgd3'.*valid names", lambda tmp: build_attack("pgd3", MODEL))
    bad("pgd/target-out-of-range", r"\btarget\b.*outside \[0, 4\]",
        lambda tmp: build_attack("pgd", MODEL, steps=1)(X, Y, target=torch.tensor([0, 1, 2, 9])))
    bad("pgd/target-n-mismatch", r"\btarget\b.*shape \(4,\)",
        lambda tmp: build_attack("pgd", MODEL, steps=1)(X, Y, target=torch.tensor([0, 1])))
    bad("pgd/target-float", r"\btarget\b.*integer",
        lambda tmp: build_attack("pgd", MODEL, steps=1)(X, Y, target=Y.float()))
    bad("deepfool/target-unsupported", r"does not support targeted",
        lambda tmp: build_attack("deepfool", MODEL)(X, Y, target=Y))
    bad("pgd/unknown-per-sample-input", r"takes no per-sample input 'groups'",
        lambda tmp: build_attack("pgd", MODEL)(X, Y, groups=Y))
    bad("ka3/groups-n-mismatch", r"groups.*shape \(4,\)",
        lambda tmp: build_attack("ka3", MODEL, K=2)(X, Y, groups=torch.tensor([0, 1])))
    bad("pgd/seed=abc", r"seed", lambda tmp: build_attack("pgd", MODEL, seed="abc", steps=1)(X, Y))
    bad("pgd/x-channels-do-not-fit-model", r"\bx\b.*model",
        lambda tmp: build_attack("pgd", MODEL, steps=1)(images(4, c=3), Y))
    bad("pgd/run-batch-size=0", r"batch_size",
        lambda tmp: build_attack("pgd", MODEL, steps=1).run((X, Y), batch_size=0))
    bad("pgd/run-data=int", r"^data must be a dataset", lambda tmp: build_attack("pgd", MODEL, steps=1).run(5))
    bad("pgd/run-data=text", r"batch of data must be", lambda tmp: build_attack("pgd", MODEL, steps=1).run("images/"))
    bad("pgd/run-images-nan", r"\bx\b.*nan", lambda tmp: build_attack("pgd", MODEL, steps=1).run((_with(X, 0, NAN), Y)))
    bad("pgd/run-labels-n-mismatch", r"\by\b.*shape", lambda tmp: build_attack("pgd", MODEL, steps=1).run((X, Y[:3])))
    bad("pgd/run-targets-n-mismatch", r"\btarget\b.*shape",
        lambda tmp: build_attack("pgd", MODEL, steps=1).run((X, Y), targets=torch.tensor([1])))


_attack_cases()


@pytest.mark.parametrize("name", ["pgd", "cw", "square"])
def test_attacks_take_float64_images_for_a_float32_model(name):
    """Not an error either: float64 images are attacked in the model's dtype and returned as float64."""
    from advlab.attacks import build_attack

    out = build_attack(name, MODEL, **({"queries": 3} if name == "square" else {"steps": 2}))(X.double(), Y)
    assert out.dtype == torch.float64 and out.shape == X.shape


@pytest.mark.parametrize("name", ["pgd", "cw", "ka3", "square", "deepfool"])
def test_attacks_take_an_empty_batch(name):
    """An empty batch is not an error: the attack returns it unchanged (same shape and dtype)."""
    from advlab.attacks import build_attack

    x = torch.empty(0, 1, 8, 8)
    out = build_attack(name, MODEL)(x, torch.empty(0, dtype=torch.long))
    assert out.shape == x.shape and out.dtype == x.dtype


# --------------------------------------------------------------------------- evaluate (the battery)

class _Always(nn.Module):
    """A model that predicts the given labels on the batch X (confident logits, a gradient through a
    tiny input term), so that the battery's stages run on every image."""

    def __init__(self, y: torch.Tensor, classes: int = 5):
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(y, classes).float() * 10)
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits[: x.shape[0]] + self.w * x.flatten(1).sum(1, keepdim=True)


def _always(y):
    return _Always(y)


def _evaluate_cases():
    from advlab.eval.evaluate import evaluate

    def ev(**kw):
        args = dict(model=MODEL, x=X, y=Y, eps=0.1, steps=2, square_queries=5, checks=False)
        args.update(kw)
        return lambda tmp: evaluate(**args)

    for key, (x, needle) in BAD_X.items():
        bad(f"evaluate/{key}", needle, ev(x=x, y=Y[: len(x)]))
    for key, (y, needle) in BAD_Y.items():
        bad(f"evaluate/{key}", needle, ev(y=y))
    for eps in (-0.1, NAN, INF, "abc"):
        bad(f"evaluate/eps={eps}", r"\beps\b", ev(eps=eps))
    bad("evaluate/norm=1", r"^norm must be 'inf' or '2'", ev(norm="1"))
    bad("evaluate/norm=None", r"^norm must be 'inf' or '2'", ev(norm=None))
    bad("evaluate/empty-batch", r"\bx\b.*empty", ev(x=torch.empty(0, 1, 8, 8), y=torch.empty(0, dtype=torch.long)))
    bad("evaluate/model=not-a-module", r"model.*nn\.Module", ev(model=lambda x: x))
    bad("evaluate/attacks=unknown", r"attacks.*unknown.*FGSM", ev(attacks=["FGSM"]))
    bad("evaluate/attacks=empty", r"attacks.*non-empty", ev(attacks=[]))
    bad("evaluate/bpda=nope", "bpda", ev(bpda="nope"))
    # the random tiny model gets every clean image wrong, so no stage runs: the checks must come first
    bad("evaluate/steps=0", r"\bsteps\b", ev(steps=0))
    bad("evaluate/square_queries=0", r"\bsquare_queries\b", ev(attacks=["Square"], square_queries=0))
    for t in (0, -3, 2.5, "three"):
        bad(f"evaluate/targets={t}", "targets", ev(targets=t))
    bad("evaluate/steps=0-on-a-model-that-is-right", r"\bsteps\b", ev(model=_always(Y), steps=0))
    bad("evaluate/square_queries=0-on-a-model-that-is-right", r"\bsquare_queries\b",
        ev(model=_always(Y), attacks=["Square"], square_queries=0))
    bad("evaluate/sweep=negative", r"\bsweep\b", ev(attacks=["APGD-CE"], sweep=[-0.1]))
    bad("evaluate/sweep=nan", r"\bsweep\b", ev(attacks=["APGD-CE"], sweep=[0.1, NAN]))
    bad("evaluate/sweep=text", r"\bsweep\b must be a sequence", ev(attacks=["APGD-CE"], sweep="0.1,0.2"))
    bad("evaluate/batch_size=0", "batch_size", ev(model=_always(Y), attacks=["APGD-CE"], batch_size=0))
    bad("evaluate/eot_samples=0", r"\beot_samples\b", ev(eot_samples=0, checks=True))


_evaluate_cases()


# --------------------------------------------------------------------------- metrics

def _metric_cases():
    from advlab.metrics import (accuracy, attack_success_rate, balanced_accuracy, bound_statistics, cw_ssim,
                                detection_auc, effectiveness_score, is_success, k_anonymity_violation, label_rank,
                                ms_ssim, mse, nearest_other_class, perturbation_magnitude, perturbation_norms,
                                rank_pmf, roc, satisfies_k_anonymity, sigma_bound, ssim, tpr_at_fpr, visual_bound)

    a, b = images(2, h=16, w=16), images(2, h=16, w=16, seed=1)
    pairs = {"ssim": ssim, "ms_ssim": ms_ssim, "cw_ssim": cw_ssim, "mse": mse}
    for name, fn in pairs.items():
        bad(f"{name}/x=3d", r"\bx\b.*shape", lambda tmp, f=fn: f(a[0], b[0]))
        bad(f"{name}/y=5d", r"\by\b.*shape", lambda tmp, f=fn: f(a, b[:, None]))
        bad(f"{name}/shape-mismatch", r"same shape", lambda tmp, f=fn: f(a, b[:, :, :8]))
        bad(f"{name}/n-mismatch", r"same shape", lambda tmp, f=fn: f(a, b[:1]))
        bad(f"{name}/x=int", r"\bx\b.*float", lambda tmp, f=fn: f((a * 255).long(), b))
        bad(f"{name}/y=bool", r"\by\b.*float", lambda tmp, f=fn: f(a, b > 0.5))
        bad(f"{name}/x=list", r"\bx\b.*tensor", lambda tmp, f=fn: f(a.tolist(), b))
        bad(f"{name}/x=nan", r"\bx\b.*nan", lambda tmp, f=fn: f(_with(a, 0, NAN), b))
        bad(f"{name}/y=inf", r"\by\b.*(nan|infinite)", lambda tmp, f=fn: f(a, _with(b, 9, INF)))
    for name, fn in (("ssim", ssim), ("ms_ssim", ms_ssim)):
        bad(f"{name}/window_size=0", "window_size", lambda tmp, f=fn: f(a, b, window_size=0))
        bad(f"{name}/window_size=2.5", "window_size", lambda tmp, f=fn: f(a, b, window_size=2.5))
        bad(f"{name}/sigma=-1", "sigma", lambda tmp, f=fn: f(a, b, sigma=-1.0))
        bad(f"{name}/sigma=nan", "sigma", lambda tmp, f=fn: f(a, b, sigma=NAN))
        bad(f"{name}/data_range=0", "data_range", lambda tmp, f=fn: f(a, b, data_range=0))
        bad(f"{name}/data_range=nan", "data_range", lambda tmp, f=fn: f(a, b, data_range=NAN))
    bad("ms_ssim/scales=0", "scales", lambda tmp: ms_ssim(a, b, scales=0))
    bad("ms_ssim/scales-too-many-for-16px", "scales", lambda tmp: ms_ssim(a, b, scales=6, weights=[1] * 6))
    bad("ms_ssim/scales=6-without-weights", "weights", lambda tmp: ms_ssim(images(1, h=64, w=64),
                                                                            images(1, h=64, w=64), scales=6))
    bad("ms_ssim/weights-wrong-length", "weights", lambda tmp: ms_ssim(a, b, scales=2, weights=[1.0]))
    bad("ms_ssim/weights-sum-0", "weights", lambda tmp: ms_ssim(a, b, scales=2, weights=[1.0, -1.0]))
    bad("cw_ssim/window=0", r"\bwindow\b", lambda tmp: cw_ssim(a, b, window=0))
    bad("cw_ssim/K=0", r"\bK\b", lambda tmp: cw_ssim(a, b, K=0))
    bad("cw_ssim/K=nan", r"\bK\b", lambda tmp: cw_ssim(a, b, K=NAN))
    bad("cw_ssim/K=abc", r"\bK\b", lambda tmp: cw_ssim(a, b, K="abc"))
    bad("cw_ssim/orientations=1", "orientations", lambda tmp: cw_ssim(a, b, orientations=1))
    bad("cw_ssim/scales=0", "scales", lambda tmp: cw_ssim(a, b, scales=0))
    bad("cw_ssim/scales-too-deep", "scales", lambda tmp: cw_ssim(a, b, scales=5))
    bad("cw_ssim/image-too-small", r"too small", lambda tmp: cw_ssim(images(1, h=4, w=4), images(1, h=4, w=4)))

    # robustness
    pred = torch.tensor([0, 1, 2, 3])
    bad("accuracy/n-mismatch", r"\by\b.*shape", lambda tmp: accuracy(pred, torch.tensor([0])))
    bad("accuracy/pred=float", r"\bpred\b.*integer", lambda tmp: accuracy(pred.float(), pred))
    bad("accuracy/pred=2d", r"\bpred\b.*shape", lambda tmp: accuracy(pred.view(2, 2), pred.view(2, 2)))
    bad("accuracy/pred=list", r"\bpred\b.*tensor", lambda tmp: accuracy([0, 1], pred[:2]))
    bad("is_success/n-mismatch", r"\by\b.*shape", lambda tmp: is_success(pred, pred[:2]))
    bad("is_success/target-n-mismatch", r"\btarget\b.*shape", lambda tmp: is_success(pred, pred, pred[:1]))
    bad("attack_success_rate/n-mismatch", r"\by\b.*shape", lambda tmp: attack_success_rate(pred, pred[:3]))
    bad("attack_success_rate/clean_pred-n-mismatch", r"clean_pred.*shape",
        lambda tmp: attack_success_rate(pred, pred, clean_pred=pred[:2]))
    bad("attack_success_rate/target-n-mismatch", r"\btarget\b.*shape",
        lambda tmp: attack_success_rate(pred, pred, target=pred[:2]))
    bad("perturbation_norms/delta=1d", r"delta.*shape", lambda tmp: perturbation_norms(torch.zeros(5)))
    bad("perturbation_norms/delta=list", r"delta.*tensor", lambda tmp: perturbation_norms([[0.0, 1.0]]))
    bad("perturbation_norms/delta=nan", r"delta.*nan", lambda tmp: perturbation_norms(_with(X, 0, NAN)))

    # anonymity
    logits = torch.randn(4, 5)
    bad("label_rank/logits=1d", r"logits.*\(N, C\)", lambda tmp: label_rank(torch.randn(5), Y[:1]))
    bad("label_rank/y-out-of-range", r"\by\b.*outside", lambda tmp: label_rank(logits, _with(Y, 0, 7)))
    bad("label_rank/y-n-mismatch", r"\by\b.*shape", lambda tmp: label_rank(logits, Y[:2]))
    bad("label_rank/logits=nan", r"logits.*nan", lambda tmp: label_rank(_with(logits, 0, NAN), Y))
    bad("rank_pmf/num_classes=0", "num_classes", lambda tmp: rank_pmf(torch.tensor([1, 2]), 0))
    bad("rank_pmf/num_classes=2.5", "num_classes", lambda tmp: rank_pmf(torch.tensor([1, 2]), 2.5))
    bad("rank_pmf/empty", r"ranks.*empty", lambda tmp: rank_pmf(torch.tensor([], dtype=torch.long), 10))
    bad("rank_pmf/rank=0", r"ranks.*\[1, 10\]", lambda tmp: rank_pmf(torch.tensor([0, 1]), 10))
    bad("rank_pmf/rank>num_classes", r"ranks.*\[1, 10\]", lambda tmp: rank_pmf(torch.tensor([11]), 10))
    bad("rank_pmf/rank=nan", r"ranks", lambda tmp: rank_pmf(torch.tensor([1.0, NAN]), 10))
    bad("rank_pmf/rank=1.5", r"ranks.*integer", lambda tmp: rank_pmf(torch.tensor([1.5, 2.0]), 10))
    bad("rank_pmf/ranks=text", r"ranks", lambda tmp: rank_pmf("abc", 10))
    pmf = rank_pmf(torch.tensor([2, 3]), 4)
    bad("k_anonymity_violation/K=0", r"\bK\b", lambda tmp: k_anonymity_violation(pmf, 0))
    bad("k_anonymity_violation/pmf-not-summing-to-1", "pmf", lambda tmp: k_anonymity_violation(pmf * 2, 2))
    bad("k_anonymity_violation/pmf-negative", "pmf", lambda tmp: k_anonymity_violation(torch.tensor([1.5, -0.5]), 2))
    bad("k_anonymity_violation/pmf-empty", "pmf", lambda tmp: k_anonymity_violation(torch.tensor([]), 2))
    bad("satisfies_k_anonymity/tol=-1", "tol", lambda tmp: satisfies_k_anonymity(pmf, 2, tol=-1))
    bad("satisfies_k_anonymity/tol=nan", "tol", lambda tmp: satisfies_k_anonymity(pmf, 2, tol=NAN))
    bad("satisfies_k_anonymity/K=-1", r"\bK\b", lambda tmp: satisfies_k_anonymity(pmf, -1))

    # detection
    s = torch.tensor([0.1, 0.5, 0.9])
    bad("roc/natural-empty", r"\bnatural\b.*empty", lambda tmp: roc([], s))
    bad("roc/adversarial-nan", r"\badversarial\b.*nan", lambda tmp: roc(s, torch.tensor([0.2, NAN])))
    bad("roc/natural=text", r"\bnatural\b must be per-sample scores", lambda tmp: roc(["a", "b"], s))
    bad("roc/natural=dict", r"\bnatural\b must be per-sample scores", lambda tmp: roc({"a": 1}, s))
    bad("detection_auc/adversarial-empty", r"\badversarial\b.*empty", lambda tmp: detection_auc(s, np.array([])))
    bad("detection_auc/natural-nan", r"\bnatural\b.*nan", lambda tmp: detection_auc([NAN], s))
    bad("detection_auc/adversarial=None", r"\badversarial\b must be per-sample scores", lambda tmp: detection_auc(s, None))
    bad("balanced_accuracy/not-boolean", r"boolean", lambda tmp: balanced_accuracy([0.5], [1]))
    bad("balanced_accuracy/empty", r"natural_flagged.*empty", lambda tmp: balanced_accuracy([], [True]))
    bad("tpr_at_fpr/fpr=2", r"fpr.*\[0, 1\]", lambda tmp: tpr_at_fpr(s, s, 2.0))
    bad("tpr_at_fpr/fpr=nan", r"fpr", lambda tmp: tpr_at_fpr(s, s, NAN))
    bad("tpr_at_fpr/fpr=-0.1", r"fpr", lambda tmp: tpr_at_fpr(s, s, -0.1))

    # bound (VIB)
    d = torch.tensor([0.1, 0.2])
    for k in (0, -1.0, NAN, INF, "abc", None):
        bad(f"sigma_bound/k={k}", r"\bk\b", lambda tmp, k=k: sigma_bound(d, k))
    bad("bound_statistics/empty", r"\bdistance\b", lambda tmp: bound_statistics(torch.tensor([])))
    bad("bound_statistics/2d", r"\bdistance\b", lambda tmp: bound_statistics(torch.zeros(2, 2)))
    bad("bound_statistics/list", r"\bdistance\b", lambda tmp: bound_statistics([0.1, 0.2]))
    bad("bound_statistics/k=0", r"\bk\b", lambda tmp: bound_statistics(d, ks=[0]))
    xs, ys = images(6), torch.tensor([0, 1, 0, 1, 2, 2])
    bad("nearest_other_class/x=3d", r"\bx\b.*shape", lambda tmp: nearest_other_class(xs[0], ys))
    bad("nearest_other_class/x=nan", r"\bx\b.*nan", lambda tmp: nearest_other_class(_with(xs, 0, NAN), ys))
    bad("nearest_other_class/y-n-mismatch", r"\by\b.*shape", lambda tmp: nearest_other_class(xs, ys[:3]))
    bad("nearest_other_class/y=float", r"\by\b.*integer", lambda tmp: nearest_other_class(xs, ys.float()))
    bad("nearest_other_class/one-class", r"no reference image of another class",
        lambda tmp: nearest_other_class(xs, torch.zeros(6, dtype=torch.long)))
    bad("nearest_other_class/empty", r"\bx\b.*empty",
        lambda tmp: nearest_other_class(xs[:0], ys[:0]))
    bad("nearest_other_class/method=nope", "method", lambda tmp: nearest_other_class(xs, ys, method="nope"))
    bad("nearest_other_class/chunk_size=0", "chunk_size", lambda tmp: nearest_other_class(xs, ys, chunk_size=0))
    bad("nearest_other_class/max_tile_mb=0", "max_tile_mb", lambda tmp: nearest_other_class(xs, ys, max_tile_mb=0))
    bad("nearest_other_class/max_tile_mb=nan", "max_tile_mb",
        lambda tmp: nearest_other_class(xs, ys, max_tile_mb=NAN))
    bad("nearest_other_class/pools=0", "pools", lambda tmp: nearest_other_class(xs, ys, pools=[0], method="pruned"))
    bad("nearest_other_class/ref_x-without-ref_y", "ref_x and ref_y",
        lambda tmp: nearest_other_class(xs, ys, ref_x=xs))
    bad("nearest_other_class/ref-shape-mismatch", r"ref_x.*shape",
        lambda tmp: nearest_other_class(xs, ys, ref_x=images(6, h=4, w=4), ref_y=ys))
    bad("nearest_other_class/ref_y-n-mismatch", r"ref_y.*shape",
        lambda tmp: nearest_other_class(xs, ys, ref_x=xs, ref_y=ys[:2]))
    bad("nearest_other_class/probe=abc", "probe", lambda tmp: nearest_other_class(xs, ys, probe="abc"))
    bad("visual_bound/ks=[]", r"\bks\b", lambda tmp: visual_bound(xs, ys, ks=[]))
    bad("visual_bound/ks=[0]", r"\bk\b", lambda tmp: visual_bound(xs, ys, ks=[0]))
    bad("visual_bound/no-labels", r"labels", lambda tmp: visual_bound(xs))
    bad("perturbation_magnitude/shape-mismatch", r"x_adv.*shape", lambda tmp: perturbation_magnitude(X, X[:2]))
    bad("perturbation_magnitude/not-tensors", r"x and x_adv must be tensors",
        lambda tmp: perturbation_magnitude(X, X.tolist()))

    def result(keep=True):
        from advlab.attacks import FGSM

        return FGSM(MODEL, eps=0.1).run((X, Y), keep_adversarials=keep, progress=False)

    bad("effectiveness_score/result=dict", "AttackResult", lambda tmp: effectiveness_score({}, X, 0.1))
    bad("effectiveness_score/no-adversarials", "keep_adversarials",
        lambda tmp: effectiveness_score(result(False), X, 0.1))
    bad("effectiveness_score/x-n-mismatch", r"\bx\b.*4 clean images", lambda tmp: effectiveness_score(result(), X[:2], 0.1))
    bad("effectiveness_score/sigma=-1", "sigma", lambda tmp: effectiveness_score(result(), X, -1.0))
    bad("effectiveness_score/sigma=nan", "sigma", lambda tmp: effectiveness_score(result(), X, NAN))
    bad("effectiveness_score/sigma=abc", "sigma", lambda tmp: effectiveness_score(result(), X, "abc"))
    bad("effectiveness_score/sigma-wrong-length", "sigma",
        lambda tmp: effectiveness_score(result(), X, torch.ones(3)))


_metric_cases()


# --------------------------------------------------------------------------- model zoo and Normalize

def _model_cases():
    from advlab.models import build_model, model_info
    from advlab.nn import Normalize

    bad("build_model/unknown-name", r"unknown model 'lenet6'.*valid names", lambda tmp: build_model("lenet6"))
    bad("model_info/unknown-name", r"unknown model 'resnet18'", lambda tmp: model_info("resnet18"))
    for shape in ((1, 8), (1, 8, 8, 8), (0, 8, 8), (1, -8, 8), ("a", 8, 8), (1, 8.5, 8), 8):
        bad(f"build_model/in_shape={shape}", "in_shape", lambda tmp, s=shape: build_model("lenet5", 10, s))
    for nc in (1, 0, -3, 2.5, "ten", None):
        bad(f"build_model/num_classes={nc}", "num_classes", lambda tmp, nc=nc: build_model("lenet5", nc, (1, 8, 8)))
    bad("build_model/in_shape-too-small-for-lenet5", r"in_shape.*small|too small",
        lambda tmp: build_model("lenet5", 10, (1, 1, 1)))
    bad("build_model/in_shape-too-small-for-model-f", r"in_shape.*small|too small",
        lambda tmp: build_model("model-f", 10, (1, 2, 2)))
    bad("build_model/unknown-option", r"bad option for model 'lenet5'", lambda tmp: build_model("lenet5", depth=20))
    bad("build_model/resnet-depth=7", "depth", lambda tmp: build_model("resnet", 10, depth=7))
    bad("build_model/seed=abc", "seed", lambda tmp: build_model("lenet5", 10, (1, 8, 8), seed="abc"))
    bad("build_model/std=0", "std", lambda tmp: build_model("lenet5", 10, (1, 8, 8), std=0.0))
    bad("build_model/mean-wrong-length", "mean", lambda tmp: build_model("lenet5", 10, (1, 8, 8), mean=[0.1, 0.2]))
    bad("Normalize/std=-1", "std", lambda tmp: Normalize(0.5, -1.0))
    bad("Normalize/std=nan", "std", lambda tmp: Normalize(0.5, NAN))
    bad("Normalize/mean=inf", "mean", lambda tmp: Normalize(INF, 0.5))
    bad("Normalize/mean-std-lengths-differ", r"mean.*std", lambda tmp: Normalize([0.1, 0.2, 0.3], [0.5, 0.5]))
    bad("Normalize/std=text", "std", lambda tmp: Normalize(0.5, "abc"))


_model_cases()


# --------------------------------------------------------------------------- training and checkpoints

class _Evil:
    """A pickle that runs code when unpickled: writes a marker file (never allowed to happen)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _train_cases():
    from advlab.train import fit, load_checkpoint, read_checkpoint, resolve_device, save_checkpoint, write_checkpoint

    ds = digits(40)

    def f(**kw):
        return lambda tmp: fit(_zoo(), kw.pop("dataset", ds), progress=False, **kw)

    for epochs in (-1, 2.5, NAN, "three", None):
        bad(f"fit/epochs={epochs}", r"\bepochs\b", f(epochs=epochs))
    for bs in (0, -8, 1.5, INF):
        bad(f"fit/batch_size={bs}", "batch_size", f(batch_size=bs))
    for lr in (0, -1e-3, NAN, INF, "fast"):
        bad(f"fit/lr={lr}", r"\blr\b", f(lr=lr))
    bad("fit/optimizer=nope", r"optimizer 'nope'", f(optimizer="nope"))
    bad("fit/schedule=nope", r"schedule 'nope'", f(schedule="nope"))
    bad("fit/dataset=int", "dataset", f(dataset=5))
    bad("fit/dataset-empty", r"dataset.*empty", f(dataset=ds.subset(indices=[])))
    bad("fit/dataset-labels-out-of-range", r"dataset labels must lie in \[0, 9\]",
        f(dataset=type(ds)(ds.images, ds.labels + 10, ds.classes)))
    bad("fit/dataset-images-do-not-fit-model", r"model cannot take the dataset's images",
        f(dataset=type(ds)(torch.rand(8, 3, 8, 8), ds.labels[:8], ds.classes)))
    bad("fit/dataset-images-nan", r"dataset images.*nan",
        f(dataset=type(ds)(_with(ds.images, 0, NAN), ds.labels, ds.classes)))
    bad("fit/device=nope", "device", f(device="nope"))
    bad("fit/device=cuda:99", "device", f(device="cuda:99"))
    bad("resolve_device/device=banana", "device", lambda tmp: resolve_device("banana"))

    def ckpt(tmp: Path) -> Path:
        return save_checkpoint(_zoo(), tmp / "ok.pt", dataset="digits")

    def write(tmp, name, data: bytes) -> Path:
        p = tmp / name
        p.write_bytes(data)
        return p

    bad("load_checkpoint/missing", r"checkpoint not found.*nope\.pt", lambda tmp: load_checkpoint(tmp / "nope.pt"))
    bad("load_checkpoint/directory", r"checkpoint not found", lambda tmp: load_checkpoint(tmp))
    bad("load_checkpoint/empty-file", r"empty\.pt", lambda tmp: load_checkpoint(write(tmp, "empty.pt", b"")))
    bad("load_checkpoint/random-bytes", r"junk\.pt.*corrupt",
        lambda tmp: load_checkpoint(write(tmp, "junk.pt", junk(256))))
    bad("load_checkpoint/text-file", r"notes\.pt", lambda tmp: load_checkpoint(write(tmp, "notes.pt", b"hello\n")))
    bad("load_checkpoint/truncated", r"ok\.pt.*corrupt",
        lambda tmp: load_checkpoint(write(tmp, "ok.pt", ckpt(tmp).read_bytes()[:-200])))
    bad("load_checkpoint/half-file", r"ok\.pt.*corrupt",
        lambda tmp: load_checkpoint(write(tmp, "ok.pt", ckpt(tmp).read_bytes()[:1000])))

    def torch_file(tmp, name, obj) -> Path:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return write(tmp, name, buf.getvalue())

    bad("load_checkpoint/plain-tensor", r"t\.pt.*not an advlab checkpoint",
        lambda tmp: load_checkpoint(torch_file(tmp, "t.pt", torch.zeros(3))))
    bad("load_checkpoint/bare-state-dict", r"sd\.pt.*not an advlab checkpoint",
        lambda tmp: load_checkpoint(torch_file(tmp, "sd.pt", _zoo().state_dict())))
    bad("load_checkpoint/metadata-not-a-dict", r"m\.pt.*metadata",
        lambda tmp: load_checkpoint(torch_file(tmp, "m.pt", {"state_dict": {}, "metadata": 5})))
    bad("load_checkpoint/state_dict-not-tensors", r"s\.pt.*state_dict",
        lambda tmp: load_checkpoint(torch_file(tmp, "s.pt", {"state_dict": {"w": "abc"}, "metadata": {}})))
    bad("load_checkpoint/no-model-spec", r"nospec\.pt.*no model spec",
        lambda tmp: load_checkpoint(torch_file(tmp, "nospec.pt", {"state_dict": {}, "metadata": {}})))
    bad("load_checkpoint/spec-unknown-model", r"unknown model 'lenet9'",
        lambda tmp: load_checkpoint(write_checkpoint(tmp / "u.pt", {}, {"model": {"name": "lenet9", "num_classes": 10,
                                                                                   "in_shape": [1, 8, 8]}})))
    bad("load_checkpoint/spec-missing-keys", r"k\.pt.*model spec",
        lambda tmp: load_checkpoint(write_checkpoint(tmp / "k.pt", {}, {"model": {"nom": "lenet5"}})))
    bad("load_checkpoint/spec-is-text", r"txt\.pt.*model spec",
        lambda tmp: load_checkpoint(write_checkpoint(tmp / "txt.pt", {}, {"model": "lenet5"})))
    bad("load_checkpoint/spec-bad-in_shape", "in_shape",
        lambda tmp: load_checkpoint(write_checkpoint(tmp / "b.pt", {}, {"model": {"name": "lenet5", "num_classes": 10,
                                                                                   "in_shape": [1, 0]}})))
    bad("load_checkpoint/weights-do-not-fit", r"ok\.pt.*does not fit",
        lambda tmp: load_checkpoint(ckpt(tmp), model=tiny_model(classes=10)))
    bad("load_checkpoint/device=nope", "device", lambda tmp: load_checkpoint(ckpt(tmp), device="nope"))

    def evil(tmp: Path) -> Path:
        p = tmp / "evil.pt"
        with open(p, "wb") as fh:
            pickle.dump({"state_dict": {}, "metadata": {}, "x": _Evil(tmp / "PWNED")}, fh, protocol=2)
        return p

    def evil_torch(tmp: Path) -> Path:
        return torch_file(tmp, "evil2.pt", {"state_dict": {}, "metadata": {}, "x": _Evil(tmp / "PWNED")})

    bad("load_checkpoint/pickle-with-code", r"evil\.pt is a plain pickle", lambda tmp: load_checkpoint(evil(tmp)),
        after=absent("PWNED"))
    bad("load_checkpoint/torch-zip-with-code", r"evil2\.pt", lambda tmp: load_checkpoint(evil_torch(tmp)),
        after=absent("PWNED"))
    bad("read_checkpoint/wrong-format-tag", r"format 'advlab-msvdd-1' expected",
        lambda tmp: read_checkpoint(ckpt(tmp), format="advlab-msvdd-1"))

    def save_onto_dir(tmp: Path):
        (tmp / "taken").mkdir()
        (tmp / "taken" / "x").write_text("x")
        save_checkpoint(_zoo(), tmp / "taken")

    bad("save_checkpoint/path-is-a-directory", r"taken", save_onto_dir)

    def save_under_file(tmp: Path):
        (tmp / "afile").write_text("x")
        save_checkpoint(_zoo(), tmp / "afile" / "m.pt")

    bad("save_checkpoint/parent-is-a-file", r"afile", save_under_file, after=absent("afile/m.pt"))
    bad("save_checkpoint/metadata-not-serialisable", r"metadata",
        lambda tmp: save_checkpoint(_zoo(), tmp / "m.pt", note=object()), after=absent("m.pt"))


_train_cases()


# --------------------------------------------------------------------------- defenses

def _defense_cases():
    from advlab.defenses import DEFENSES, IDefender, MSVDDDefense, PCLDefense, VIBDefense, build_defense
    from advlab.defenses.base import defense_class
    from advlab.train import save_checkpoint, write_checkpoint

    ds = digits(60)
    bad("defenses/unknown-name", r"unknown defense 'svdd'.*valid names", lambda tmp: defense_class("svdd"))
    bad("build_defense/unknown-name", r"unknown defense 'nope'", lambda tmp: build_defense("nope", _zoo(), ds))
    for name, entry in DEFENSES.items():
        cls = entry.cls
        bad(f"{name}/fit-model=not-a-module", r"model", lambda tmp, c=cls: c.fit(lambda x: x, ds))
        bad(f"{name}/fit-dataset=int", r"dataset", lambda tmp, c=cls: c.fit(_zoo(), 5))
        bad(f"{name}/fit-dataset-images-nan", r"dataset images.*nan",
            lambda tmp, c=cls: c.fit(_zoo(), type(ds)(_with(ds.images, 0, NAN), ds.labels, ds.classes)))
        bad(f"{name}/fit-dataset-images>1", r"dataset images.*\[0, 1\]",
            lambda tmp, c=cls: c.fit(_zoo(), type(ds)(ds.images * 16, ds.labels, ds.classes)))
        bad(f"{name}/fit-labels-out-of-range", r"dataset labels must lie in \[0, 9\]",
            lambda tmp, c=cls: c.fit(_zoo(), type(ds)(ds.images, ds.labels + 10, ds.classes)))
        bad(f"{name}/load-missing", r"not found.*gone\.pt", lambda tmp, c=cls: c.load(tmp / "gone.pt"))
        bad(f"{name}/load-random-bytes", r"junk\.pt",
            lambda tmp, c=cls: c.load((tmp / "junk.pt").write_bytes(junk(64)) and tmp / "junk.pt"))
        bad(f"{name}/load-model-checkpoint", r"m\.pt.*format",
            lambda tmp, c=cls: c.load(save_checkpoint(_zoo(), tmp / "m.pt")))
        bad(f"{name}/load-no-model-spec", r"e\.pt.*no model spec",
            lambda tmp, c=cls: c.load(write_checkpoint(tmp / "e.pt", {}, {}, format=c.format)))
        bad(f"{name}/load-weights-do-not-fit", r"w\.pt.*does not fit",
            lambda tmp, c=cls: c.load(write_checkpoint(tmp / "w.pt", {"bogus": torch.zeros(1)},
                                                       {"model": _zoo().advlab_spec}, format=c.format)))
        bad(f"{name}/load-config-not-a-dict", r"/c\.pt is corrupt: its config",
            lambda tmp, c=cls: c.load(write_checkpoint(tmp / "c.pt", {}, {"model": _zoo().advlab_spec, "config": 5},
                                                       format=c.format)))
    # per-defense options
    bad("msvdd/fit-svdd_epochs=-1", "svdd_epochs", lambda tmp: MSVDDDefense.fit(_zoo(), ds, svdd_epochs=-1))
    bad("msvdd/fit-batch_size=0", "batch_size", lambda tmp: MSVDDDefense.fit(_zoo(), ds, batch_size=0))
    bad("msvdd/v_a>=v_p", r"v_a < v_p", lambda tmp: MSVDDDefense(_zoo(), v_a=0.1, v_p=0.01))
    bad("msvdd/head-not-linear", r"head layer 'relu3'", lambda tmp: MSVDDDefense(_zoo(), head="relu3"))
    bad("msvdd/projections=0", "projections", lambda tmp: MSVDDDefense(_zoo(), projections=0))
    bad("msvdd/tune_beta-goal=nope", "goal", lambda tmp: MSVDDDefense(_zoo()).tune_beta(ds, goal="nope"))
    bad("msvdd/predict-x=3d", r"\bx\b.*shape", lambda tmp: MSVDDDefense(_zoo()).predict(torch.rand(1, 8, 8)))
    bad("msvdd/predict-x=nan", r"\bx\b.*nan", lambda tmp: MSVDDDefense(_zoo()).predict(_with(ds.images[:4], 0, NAN)))
    bad("pcl/fit-pc_epochs=-1", "pc_epochs", lambda tmp: PCLDefense.fit(_zoo(), ds, pc_epochs=-1))
    bad("pcl/preset=nope", "preset", lambda tmp: PCLDefense(_zoo(), preset="nope"))
    bad("pcl/unknown-option", r"unknown PCL option", lambda tmp: PCLDefense(_zoo(), pushh=1.0))
    bad("pcl/reading=eq9", r"reading must be one of algorithm1, eq8", lambda tmp: PCLDefense(_zoo(), reading="eq9"))
    bad("pcl/reading=None", r"reading must be one of", lambda tmp: PCLDefense(_zoo(), reading=None))
    bad("pcl/branch_dim=0", r"branch_dim", lambda tmp: PCLDefense(_zoo(), reading="eq8", branch_dim=0))
    bad("pcl/branch_dim=2.5", r"branch_dim", lambda tmp: PCLDefense(_zoo(), reading="eq8", branch_dim=2.5))
    bad("pcl/eq8-one-layer", r"eq8.*at least two layers",
        lambda tmp: PCLDefense(_zoo(), reading="eq8", layers=["head:input"]))
    bad("pcl/fit-reading=eq9", r"reading must be one of",
        lambda tmp: PCLDefense.fit(_zoo(), ds, warmup_epochs=0, pc_epochs=0, reading="eq9"))
    bad("pcl/predict-rule=nope", "rule", lambda tmp: PCLDefense(_zoo()).predict(ds.images[:4], rule="nope"))
    bad("pcl/predict-x=5d", r"\bx\b.*shape", lambda tmp: PCLDefense(_zoo()).predict(torch.rand(1, 1, 1, 8, 8)))
    bad("vib/k=0", r"\bk\b", lambda tmp: VIBDefense(_zoo(), k=0))
    bad("vib/k=abc", r"\bk\b", lambda tmp: VIBDefense(_zoo(), k="abc"))
    bad("vib/samples=0", r"\bsamples\b", lambda tmp: VIBDefense(_zoo(), samples=0))
    bad("vib/fit-sigma-wrong-length", "sigma", lambda tmp: VIBDefense.fit(_zoo(), ds, sigma=torch.ones(3), epochs=0))
    bad("vib/fit-sigma-negative", "sigma",
        lambda tmp: VIBDefense.fit(_zoo(), ds, sigma=-torch.ones(len(ds)), epochs=0))
    bad("vib/fit-distances-wrong-length", "distances",
        lambda tmp: VIBDefense.fit(_zoo(), ds, distances=torch.ones(2), epochs=0))
    bad("vib/predict-x=int", r"\bx\b.*float", lambda tmp: VIBDefense(_zoo()).predict(torch.zeros(2, 1, 8, 8,
                                                                                              dtype=torch.long)))
    bad("idefender/no-hidden-layers", "layers", lambda tmp: IDefender(tiny_model()))
    bad("idefender/rule=nope", "rule", lambda tmp: IDefender(_zoo(), rule="nope"))
    bad("idefender/fit-components=0", "components", lambda tmp: IDefender.fit(_zoo(), ds, components=0))
    bad("idefender/fit-covariance=nope", "covariance", lambda tmp: IDefender.fit(_zoo(), ds, covariance="nope"))
    bad("idefender/fit-reg_covar=0", "reg_covar", lambda tmp: IDefender.fit(_zoo(), ds, reg_covar=0))
    bad("idefender/fit-empty", r"dataset.*empty", lambda tmp: IDefender.fit(_zoo(), ds.subset(indices=[])))
    bad("idefender/predict-x>1", r"\bx\b.*\[0, 1\]",
        lambda tmp: IDefender(_zoo(), in_shape=(1, 8, 8)).predict(ds.images[:2] * 3))


_defense_cases()


# --------------------------------------------------------------------------- adaptive attacks and wrappers

def _adaptive_cases():
    from advlab.adaptive import BPDA, EoT, auto_bpda
    from advlab.adaptive.bpda import find_gradient_killers
    from advlab.adaptive.idefender import IDefenderAdaptive, IDefenderGrayBox
    from advlab.adaptive.msvdd import MSVDDFullKnowledge
    from advlab.defenses import IDefender, MSVDDDefense

    bad("BPDA/model=not-a-module", r"model", lambda tmp: BPDA(lambda x: x))
    bad("BPDA/unknown-layer", r"no layer named 'nope'", lambda tmp: BPDA(_zoo(), layers=["nope"]))
    bad("BPDA/layers=int", r"layers", lambda tmp: BPDA(_zoo(), layers=5))
    bad("BPDA/approx=number", r"approx", lambda tmp: BPDA(_zoo(), layers=["relu3"], approx=3))
    bad("BPDA/approx-for-unlisted-layer", r"approx names layers not in layers",
        lambda tmp: BPDA(_zoo(), layers=["relu3"], approx={"relu4": None}))
    bad("BPDA/input_transform=text", r"input_transform", lambda tmp: BPDA(_zoo(), input_transform="round"))
    bad("EoT/samples=0", r"\bsamples\b", lambda tmp: EoT(_zoo(), samples=0))
    bad("EoT/samples=nan", r"\bsamples\b", lambda tmp: EoT(_zoo(), samples=NAN))
    bad("EoT/average=nope", r"average", lambda tmp: EoT(_zoo(), average="nope"))
    bad("EoT/batched=text", r"batched", lambda tmp: EoT(_zoo(), batched="yes"))
    bad("auto_bpda/x-empty", r"\bx\b.*empty", lambda tmp: auto_bpda(MODEL, X[:0], Y[:0]))
    bad("auto_bpda/x=nan", r"\bx\b.*nan", lambda tmp: auto_bpda(MODEL, _with(X, 0, NAN), Y))
    bad("auto_bpda/x=3d", r"\bx\b.*shape", lambda tmp: auto_bpda(MODEL, X[0], Y))
    bad("find_gradient_killers/x>1", r"\bx\b.*\[0, 1\]", lambda tmp: find_gradient_killers(MODEL, X * 3))
    bad("MSVDDFullKnowledge/not-a-defense", r"defense|responses", lambda tmp: MSVDDFullKnowledge(_zoo()))
    bad("MSVDDFullKnowledge/eps=-1", r"\beps\b", lambda tmp: MSVDDFullKnowledge(MSVDDDefense(_zoo()), eps=-1))
    bad("MSVDDFullKnowledge/steps=0", r"\bsteps\b", lambda tmp: MSVDDFullKnowledge(MSVDDDefense(_zoo()), steps=0))
    bad("MSVDDFullKnowledge/x=nan", r"\bx\b.*nan",
        lambda tmp: MSVDDFullKnowledge(MSVDDDefense(_zoo()), steps=1)(_with(digits(4).images, 0, NAN), digits(4).labels))
    bad("IDefenderAdaptive/not-a-defense", r"defense|I-defender", lambda tmp: IDefenderAdaptive(_zoo()))
    bad("IDefenderAdaptive/mode=nope", r"\bmode\b",
        lambda tmp: IDefenderAdaptive(IDefender(_zoo(), in_shape=(1, 8, 8)), mode="nope"))
    bad("IDefenderGrayBox/lam=-1", r"lam", lambda tmp: IDefenderGrayBox(IDefender(_zoo(), in_shape=(1, 8, 8)), lam=-1))
    bad("IDefenderGrayBox/norm=1", r"^norm must be",
        lambda tmp: IDefenderGrayBox(IDefender(_zoo(), in_shape=(1, 8, 8)), norm="1"))


_adaptive_cases()


# --------------------------------------------------------------------------- data: loaders, IDX, downloads

def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _data_cases():
    from advlab.data import (dataset_info, download_dataset, download_file, load_dataset, read_idx,
                             split_validation, verify_file)
    from advlab.data.core import TensorImageDataset
    from advlab.data.download import ensure_files, file_digest

    bad("load_dataset/unknown-name", r"unknown dataset 'imagenet'.*valid names", lambda tmp: load_dataset("imagenet"))
    bad("dataset_info/unknown-name", r"unknown dataset 'mnist2'", lambda tmp: dataset_info("mnist2"))
    bad("load_dataset/digits-split=val", r"split.*'val'", lambda tmp: load_dataset("digits", split="val"))
    bad("load_dataset/digits-unknown-option", r"dataset 'digits' takes no option.*size",
        lambda tmp: load_dataset("digits", size=8))
    bad("load_dataset/mnist-missing-folder", r"mnist test files missing in .*nowhere",
        lambda tmp: load_dataset("mnist", tmp / "nowhere", "test"))
    bad("load_dataset/mnist-split=extra", r"split", lambda tmp: load_dataset("mnist", tmp, "extra"))
    bad("load_dataset/folder-root=None", r"\broot=", lambda tmp: load_dataset("folder"))
    bad("load_dataset/folder-missing", r"image folder not found", lambda tmp: load_dataset("folder", tmp / "none"))
    bad("load_dataset/folder-no-classes", r"no class subfolders", lambda tmp: load_dataset("folder", tmp))

    def folder_with(tmp: Path, name: str, data: bytes, size=None):
        (tmp / "cat").mkdir(exist_ok=True)
        (tmp / "cat" / name).write_bytes(data)
        return load_dataset("folder", tmp, **({} if size is None else {"size": size}))

    bad("load_dataset/folder-corrupt-image", r"unreadable image .*broken\.png",
        lambda tmp: folder_with(tmp, "broken.png", b"\x89PNG not really"))
    bad("load_dataset/folder-empty-class", r"class folder .*holds no images",
        lambda tmp: folder_with(tmp, "notes.txt", b"hi"))
    bad("load_dataset/folder-size=0", r"\bsize\b must be \(height, width\)",
        lambda tmp: load_dataset("folder", tmp, size=(0, 4)))
    bad("load_dataset/cifar10-missing", r"cifar10 files missing", lambda tmp: load_dataset("cifar10", tmp))

    def cifar(tmp: Path, obj_bytes: bytes):
        d = tmp / "cifar-10-batches-py"
        d.mkdir()
        (d / "test_batch").write_bytes(obj_bytes)
        return load_dataset("cifar10", tmp, "test")

    bad("load_dataset/cifar10-corrupt-pickle", r"test_batch", lambda tmp: cifar(tmp, b"\x80\x04garbage"))
    bad("load_dataset/cifar10-pickle-with-code", r"refusing to unpickle",
        lambda tmp: cifar(tmp, pickle.dumps(_Evil(tmp / "PWNED"))), after=absent("PWNED"))
    bad("load_dataset/cifar10-wrong-layout", r"test_batch.*'data'",
        lambda tmp: cifar(tmp, pickle.dumps({"data": [1, 2], "labels": [0]})))
    bad("load_dataset/cifar10-labels-out-of-range", r"labels outside \[0, 9\]",
        lambda tmp: cifar(tmp, pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]})))

    def svhn(tmp: Path, data: bytes):
        (tmp / "test_32x32.mat").write_bytes(data)
        return load_dataset("svhn", tmp, "test")

    bad("load_dataset/svhn-corrupt-mat", r"test_32x32\.mat", lambda tmp: svhn(tmp, b"MATLAB 5.0 but not really"))
    bad("load_dataset/svhn-missing", r"svhn test files missing", lambda tmp: load_dataset("svhn", tmp, "test"))

    def mnist(tmp: Path, images: bytes, labels_: bytes):
        (tmp / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (tmp / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels_))
        return load_dataset("mnist", tmp, "test")

    img = _idx_bytes(np.zeros((3, 4, 4)))
    bad("load_dataset/mnist-count-mismatch", r"3 images.*2 labels|labels",
        lambda tmp: mnist(tmp, img, _idx_bytes(np.zeros(2))))
    bad("load_dataset/mnist-labels-out-of-range", r"labels outside \[0, 9\]",
        lambda tmp: mnist(tmp, img, _idx_bytes(np.array([0, 1, 12]))))
    bad("load_dataset/mnist-images-are-labels", r"t10k-images-idx3-ubyte\.gz: expected a 3-d image array",
        lambda tmp: mnist(tmp, _idx_bytes(np.zeros(3)), _idx_bytes(np.zeros(3))))

    def idx(tmp: Path, data: bytes, name: str = "f-ubyte") -> np.ndarray:
        p = tmp / name
        p.write_bytes(data)
        return read_idx(p)

    good = _idx_bytes(np.arange(24).reshape(2, 3, 4))
    bad("read_idx/missing", r"IDX file not found.*none", lambda tmp: read_idx(tmp / "none"))
    bad("read_idx/empty", r"f-ubyte.*not an IDX file", lambda tmp: idx(tmp, b""))
    bad("read_idx/wrong-magic", r"f-ubyte.*bad magic", lambda tmp: idx(tmp, b"\x01\x02" + good[2:]))
    bad("read_idx/bad-dtype-code", r"f-ubyte.*bad magic", lambda tmp: idx(tmp, good[:2] + b"\x07" + good[3:]))
    bad("read_idx/ndim=0", r"f-ubyte.*truncated IDX header", lambda tmp: idx(tmp, b"\x00\x00\x08\x00"))
    bad("read_idx/truncated-header", r"f-ubyte.*truncated IDX header", lambda tmp: idx(tmp, good[:9]))
    bad("read_idx/truncated-data", r"f-ubyte.*truncated", lambda tmp: idx(tmp, good[:-5]))
    bad("read_idx/oversized", r"f-ubyte.*oversized", lambda tmp: idx(tmp, good + b"\x00" * 7))
    bad("read_idx/huge-dims", r"f-ubyte.*truncated", lambda tmp: idx(tmp, b"\x00\x00\x08\x02" + b"\xff" * 8))
    bad("read_idx/corrupt-gzip", r"corrupt gzip.*f\.gz", lambda tmp: idx(tmp, b"\x1f\x8b" + junk(40), "f.gz"))
    bad("read_idx/truncated-gzip", r"corrupt gzip.*f\.gz", lambda tmp: idx(tmp, gzip.compress(good)[:-10], "f.gz"))
    bad("read_idx/gz-without-gzip-header", r"corrupt gzip.*f\.gz.*no gzip header", lambda tmp: idx(tmp, good, "f.gz"))
    bad("read_idx/directory", r"IDX file not found", lambda tmp: read_idx(tmp))

    def payload(tmp: Path) -> Path:
        p = tmp / "src" / "blob.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"advlab" * 100)
        return p

    bad("verify_file/wrong-sha256", r"checksum mismatch for .*blob\.bin: sha256",
        lambda tmp: verify_file(payload(tmp), sha256="0" * 64))
    bad("verify_file/wrong-md5", r"checksum mismatch for .*blob\.bin: md5",
        lambda tmp: verify_file(payload(tmp), md5="0" * 32))
    bad("verify_file/right-sha-wrong-md5", r"md5",
        lambda tmp: verify_file(payload(tmp), sha256=file_digest(payload(tmp)), md5="f" * 32))
    bad("verify_file/malformed-checksum", r"checksum mismatch.*sha256", lambda tmp: verify_file(payload(tmp), sha256="xyz"))
    bad("verify_file/missing", r"file not found.*\bgone\b", lambda tmp: verify_file(tmp / "gone", sha256="0" * 64))
    bad("download_file/wrong-sha256", r"checksum mismatch.*nothing was written",
        lambda tmp: download_file(payload(tmp).as_uri(), tmp / "out" / "blob.bin", sha256="0" * 64),
        after=absent("out/blob.bin"))
    bad("download_file/wrong-md5", r"checksum mismatch.*md5",
        lambda tmp: download_file(payload(tmp).as_uri(), tmp / "out" / "blob.bin", md5="0" * 32),
        after=absent("out/blob.bin"))
    bad("download_file/missing-file-url", r"could not download file://.*gone\.bin",
        lambda tmp: download_file((tmp / "gone.bin").as_uri(), tmp / "out.bin"), after=absent("out.bin"))
    bad("download_file/not-a-url", r"could not download not-a-url", lambda tmp: download_file("not-a-url", tmp / "o"),
        after=absent("o"))
    bad("download_file/timeout=0", "timeout", lambda tmp: download_file(payload(tmp).as_uri(), tmp / "o", timeout=0))
    bad("download_file/timeout=nan", "timeout", lambda tmp: download_file(payload(tmp).as_uri(), tmp / "o",
                                                                         timeout=NAN))

    def dest_is_dir(tmp: Path):
        (tmp / "o").mkdir()
        (tmp / "o" / "keep").write_text("x")
        return download_file(payload(tmp).as_uri(), tmp / "o")

    bad("download_file/dest-is-a-directory", r"could not download|\bo\b", dest_is_dir)
    bad("download_dataset/unknown-name", r"unknown downloadable dataset 'digits'",
        lambda tmp: download_dataset("digits", tmp))

    def from_mirror(tmp: Path, content: Optional[bytes]):
        mirror = tmp / "mirror"
        mirror.mkdir()
        if content is not None:
            for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
                (mirror / f).write_bytes(content)
        return download_dataset("mnist", tmp / "data", splits=["test"], mirrors=[str(mirror)])

    def nothing_in_data(tmp: Path):
        data = tmp / "data"
        assert not data.exists() or not any(data.iterdir()), sorted(data.iterdir())

    bad("download_dataset/mirror-wrong-checksum", r"checksum mismatch.*t10k-images",
        lambda tmp: from_mirror(tmp, b"not mnist"), after=nothing_in_data)
    bad("download_dataset/mirror-empty", r"could not download mnist file t10k-images",
        lambda tmp: from_mirror(tmp, None), after=nothing_in_data)
    bad("download_dataset/split=val", r"split", lambda tmp: download_dataset("mnist", tmp, splits=["val"]))
    bad("ensure_files/split=val", r"split", lambda tmp: ensure_files("mnist", tmp, "val"))

    ds = digits(40)
    bad("TensorImageDataset/images=3d", r"images.*shape", lambda tmp: TensorImageDataset(torch.zeros(2, 8, 8),
                                                                                         torch.zeros(2), ["a"]))
    bad("TensorImageDataset/labels-n-mismatch", r"labels.*shape", lambda tmp: TensorImageDataset(torch.zeros(2, 1, 8, 8),
                                                                                                torch.zeros(3), ["a"]))
    bad("subset/n=-1", r"\bn\b", lambda tmp: ds.subset(-1))
    bad("subset/n=0", r"\bn\b", lambda tmp: ds.subset(0))
    bad("subset/indices-out-of-range", r"indices", lambda tmp: ds.subset(indices=[0, 1000]))
    bad("split_validation/fraction=0", r"\bfraction\b", lambda tmp: split_validation(ds, 0.0))
    bad("split_validation/fraction=nan", r"\bfraction\b", lambda tmp: split_validation(ds, NAN))
    bad("split_validation/fraction=1.5", r"\bfraction\b", lambda tmp: split_validation(ds, 1.5))


_data_cases()


# --------------------------------------------------------------------------- specs and the experiment runner

def _spec_cases():
    from advlab.eval.specs import load_spec
    from advlab.papers import reproduce, resolve_spec

    def spec_file(tmp: Path, text, name: str = "s.yaml") -> Path:
        p = tmp / name
        if isinstance(text, bytes):
            p.write_bytes(text)
        else:
            p.write_text(text)
        return p

    bad("load_spec/bad-yaml", r"bad experiment spec", lambda tmp: load_spec("a: [1, 2\nb: }"))
    bad("load_spec/tabs", r"bad experiment spec", lambda tmp: load_spec("a:\n\t- 1"))
    bad("load_spec/list", r"YAML mapping", lambda tmp: load_spec("- 1\n- 2\n"))
    bad("load_spec/scalar", r"YAML mapping", lambda tmp: load_spec("42"))
    bad("load_spec/empty", r"YAML mapping", lambda tmp: load_spec(""))
    bad("load_spec/python-object-tag", r"bad experiment spec",
        lambda tmp: load_spec("a: !!python/object/apply:os.system ['true']"))
    bad("load_spec/bad-yaml-file", r"bad experiment spec", lambda tmp: load_spec(spec_file(tmp, "x: [")))
    bad("load_spec/binary-file", r"s\.yaml", lambda tmp: load_spec(spec_file(tmp, b"\xff\xfe\x00garbage\x80")))
    bad("resolve_spec/unknown-name", r"unknown reproduction 'nope'.*valid names", lambda tmp: resolve_spec("nope"))
    bad("resolve_spec/missing-yaml", r"spec file not found.*gone\.yaml", lambda tmp: resolve_spec(str(tmp / "gone.yaml")))
    bad("resolve_spec/yaml-is-a-list", r"YAML mapping", lambda tmp: resolve_spec(str(spec_file(tmp, "- a\n"))))
    bad("resolve_spec/quick-not-a-mapping", r"quick",
        lambda tmp: resolve_spec(str(spec_file(tmp, "quick: 5\n")), quick=True))
    bad("resolve_spec/runner-in-user-spec", r"spec key 'runner' \('nope'\)",
        lambda tmp: reproduce(str(spec_file(tmp, "runner: nope\n")), tmp / "out"), after=absent("out"))

    # the generic experiment runner (advlab reproduce my.yaml): wrong types are found before any work
    base = ("dataset: {name: digits, n: 4}\nmodel: {name: lenet5, train: {epochs: 1}}\n"
            "attacks:\n  - {kind: fgsm, params: {eps: 0.1}}\n")
    wrong = {
        "seed=text": ("seed: abc\n" + base, r"seed"),
        "batch_size=0": ("batch_size: 0\n" + base, r"batch_size"),
        "dataset=list": (base.replace("dataset: {name: digits, n: 4}", "dataset: [digits]"), r"dataset.*mapping"),
        "dataset-no-name": (base.replace("name: digits, ", ""), r"dataset.*name"),
        "dataset-unknown": (base.replace("digits", "imagenet"), r"unknown dataset 'imagenet'"),
        "dataset-n=0": (base.replace("n: 4", "n: 0"), r"\bn\b"),
        "dataset-n=text": (base.replace("n: 4", "n: four"), r"\bn\b"),
        "model=text": (base.replace("model: {name: lenet5, train: {epochs: 1}}", "model: lenet5"), r"model.*mapping"),
        "model-empty": (base.replace("model: {name: lenet5, train: {epochs: 1}}", "model: {}"), r"model.*checkpoint"),
        "model-unknown": (base.replace("lenet5", "lenet6"), r"unknown model 'lenet6'"),
        "model-train=list": (base.replace("train: {epochs: 1}", "train: [1]"), r"train.*mapping"),
        "model-train-epochs=text": (base.replace("epochs: 1", "epochs: one"), r"\bepochs\b"),
        "model-checkpoint-missing": (base.replace("name: lenet5, train: {epochs: 1}", "checkpoint: gone.pt"),
                                     r"checkpoint not found.*gone\.pt"),
        "attacks=mapping": (base.replace("  - {kind: fgsm, params: {eps: 0.1}}", "  kind: fgsm"),
                            r"'attacks' must be a list"),
        "attacks=number": (base.replace("\n  - {kind: fgsm, params: {eps: 0.1}}", " 5"), r"'attacks' must be a list"),
        "attacks-empty": (base.replace("\n  - {kind: fgsm, params: {eps: 0.1}}", " []"), r"\bspec has no attacks\b"),
        "attack=text": (base.replace("{kind: fgsm, params: {eps: 0.1}}", "fgsm"), r"attacks\[0\].*mapping"),
        "attack-no-kind": (base.replace("kind: fgsm, ", ""), r"attacks\[0\].*kind"),
        "attack-unknown-kind": (base.replace("fgsm", "fgsm2"), r"unknown attack 'fgsm2'"),
        "attack-params=list": (base.replace("{eps: 0.1}", "[0.1]"), r"params.*mapping"),
        "attack-unknown-param": (base.replace("eps: 0.1", "epsilon: 0.1"), r"does not take 'epsilon'"),
        "attack-eps=-1": (base.replace("eps: 0.1", "eps: -1"), r"attacks\[0\].*\beps\b"),
        "attack-eps=text": (base.replace("eps: 0.1", "eps: big"), r"attacks\[0\].*\beps\b"),
        "attack-threat-unknown": (base.replace("kind: fgsm,", "kind: fgsm, threat: grey,"), r"threat"),
        "attack-source-unknown": (base.replace("kind: fgsm,", "kind: fgsm, source: oracle,"), r"source 'oracle'"),
        "duplicate-attack-names": (base + "  - {kind: fgsm}\n", r"two attacks are named"),
        "defense=text": (base + "defense: msvdd\n", r"defense.*mapping"),
        "defense-no-name": (base + "defense: {params: {}}\n", r"defense.*name"),
        "defense-unknown": (base + "defense: {name: nope}\n", r"unknown defense 'nope'"),
        "defense-params=list": (base + "defense: {name: msvdd, params: [1]}\n", r"params.*mapping"),
        "defense-val_fraction=2": (base + "defense: {name: msvdd, val_fraction: 2}\n", r"\bval_fraction\b"),
        "reported=list": (base + "reported: [0.1]\n", r"reported.*mapping"),
    }
    for key, (text, needle) in wrong.items():
        bad(f"experiment/{key}", needle,
            lambda tmp, t=text: reproduce(str(spec_file(tmp, t)), tmp / "out"), after=absent("out"))


_spec_cases()


# --------------------------------------------------------------------------- the catalogue, run

@pytest.mark.parametrize("cid", catalogue_params(CASES))
def test_bad_input(cid, tmp_path):
    check_api_case(CASES[cid], tmp_path, leftovers, one_line=False)


# --------------------------------------------------------------------------- hypothesis: drawn bad inputs

FUZZ = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_NAMES = None


def _attack_names():
    global _NAMES
    if _NAMES is None:
        from advlab.attacks.registry import ATTACKS

        _NAMES = sorted(ATTACKS)
    return _NAMES


def _raises(fn, needle: str):
    import re

    with pytest.raises(AdvlabError) as info:
        fn()
    assert re.search(needle, str(info.value), re.IGNORECASE), str(info.value)


HYPOTHESIS["hyp/attack-bad-shape"] = "any attack, an image batch of 0-3 or 5-6 dimensions"


@FUZZ
@given(name=st.sampled_from(sorted(__import__("advlab.attacks.registry", fromlist=["ATTACKS"]).ATTACKS)),
       shape=st.lists(st.integers(1, 4), min_size=0, max_size=6).filter(lambda s: len(s) != 4))
def test_hyp_attack_bad_shape(name, shape):
    from advlab.attacks import build_attack

    x = torch.rand(*shape) if shape else torch.tensor(0.5)
    _raises(lambda: build_attack(name, MODEL)(x, Y), r"\bx\b.*shape")


HYPOTHESIS["hyp/attack-bad-pixel"] = "any attack, one pixel set to NaN, +-inf or a value outside [0, 1]"


@FUZZ
@given(name=st.sampled_from(sorted(__import__("advlab.attacks.registry", fromlist=["ATTACKS"]).ATTACKS)),
       pos=st.integers(0, X.numel() - 1),
       value=st.one_of(st.just(NAN), st.just(INF), st.just(-INF), st.floats(1.0001, 1e30),
                       st.floats(-1e30, -1e-4)))
def test_hyp_attack_bad_pixel(name, pos, value):
    from advlab.attacks import build_attack

    _raises(lambda: build_attack(name, MODEL)(_with(X, pos, value), Y), r"\bx\b.*(nan|infinite|\[0, 1\])")


HYPOTHESIS["hyp/attack-bad-labels"] = "any attack, labels of the wrong length, dtype or range"


@FUZZ
@given(name=st.sampled_from(sorted(__import__("advlab.attacks.registry", fromlist=["ATTACKS"]).ATTACKS)),
       n=st.integers(0, 8), kind=st.sampled_from(["length", "float", "range"]),
       value=st.one_of(st.integers(5, 10 ** 6), st.integers(-10 ** 6, -1)))
def test_hyp_attack_bad_labels(name, n, kind, value):
    from advlab.attacks import build_attack

    if kind == "length":
        y = torch.zeros(n if n != 4 else 5, dtype=torch.long)
    elif kind == "float":
        y = Y.float() + 0.5
    else:
        y = _with(Y, n % 4, value)
    _raises(lambda: build_attack(name, MODEL)(X, y), r"\by\b")


HYPOTHESIS["hyp/attack-bad-budget"] = "attacks with eps/steps, drawn negative, NaN, infinite or fractional values"


@FUZZ
@given(data=st.data())
def test_hyp_attack_bad_budget(data):
    from advlab.attacks.registry import attack_parameters, build_attack

    name = data.draw(st.sampled_from([n for n in _attack_names() if "eps" in attack_parameters(n)]))
    param = data.draw(st.sampled_from(["eps", "steps"] if "steps" in attack_parameters(name) else ["eps"]))
    if param == "eps":
        v = data.draw(st.one_of(st.floats(max_value=-1e-9, allow_nan=False), st.just(NAN), st.just(INF)))
    else:
        v = data.draw(st.one_of(st.integers(max_value=0), st.floats(0.01, 0.99), st.just(NAN), st.just(INF)))
    _raises(lambda: build_attack(name, MODEL, **{param: v}), rf"\b{param}\b")


HYPOTHESIS["hyp/similarity-shape-mismatch"] = "ssim, ms_ssim, cw_ssim, mse on two batches of different shapes"


@FUZZ
@given(fn=st.sampled_from(["ssim", "ms_ssim", "cw_ssim", "mse"]),
       a=st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(8, 12), st.integers(8, 12)),
       b=st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(8, 12), st.integers(8, 12)))
def test_hyp_similarity_shape_mismatch(fn, a, b):
    from advlab import metrics

    if a == b:
        b = (b[0] + 1,) + b[1:]
    _raises(lambda: getattr(metrics, fn)(torch.rand(*a), torch.rand(*b)), r"same shape")


HYPOTHESIS["hyp/read-idx-random-bytes"] = "read_idx on random bytes, raw and gzip-named"


@FUZZ
@given(raw=st.binary(max_size=64), gz=st.booleans())
def test_hyp_read_idx_random_bytes(raw, gz, tmp_path_factory):
    from advlab.data import read_idx

    p = tmp_path_factory.mktemp("idx") / ("f.gz" if gz else "f-ubyte")
    p.write_bytes(raw)
    try:
        out = read_idx(p)
    except AdvlabError as e:
        assert p.name in str(e)
    else:  # a valid IDX file by chance: then it parsed exactly
        assert isinstance(out, np.ndarray)


HYPOTHESIS["hyp/checkpoint-random-bytes"] = "load_checkpoint on random bytes and on a checkpoint cut anywhere"


@FUZZ
@given(raw=st.binary(max_size=128), cut=st.floats(0.0, 0.999))
def test_hyp_checkpoint_random_bytes(raw, cut, tmp_path_factory):
    from advlab.train import load_checkpoint

    d = tmp_path_factory.mktemp("ckpt")
    p = d / "junk.pt"
    p.write_bytes(raw)
    _raises(lambda: load_checkpoint(p), r"junk\.pt")
    full = _checkpoint_bytes()
    p.write_bytes(full[: int(cut * len(full))])
    _raises(lambda: load_checkpoint(p), r"junk\.pt")


_CKPT: list = []


def _checkpoint_bytes() -> bytes:
    if not _CKPT:
        from advlab.train import save_checkpoint

        buf = Path(__import__("tempfile").mkdtemp()) / "m.pt"
        save_checkpoint(_zoo(), buf)
        _CKPT.append(buf.read_bytes())
    return _CKPT[0]


HYPOTHESIS["hyp/spec-random-yaml"] = "load_spec on random text: a mapping or a clear error, never a YAML traceback"


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("ab:-[]{}'\"!&*#|>\n\t 01.,")), max_size=40))
def test_hyp_spec_random_yaml(text):
    from advlab.eval.specs import load_spec

    try:
        out = load_spec(text)
    except AdvlabError as e:
        assert "spec" in str(e)
    else:
        assert isinstance(out, dict)


HYPOTHESIS["hyp/number-checks"] = "the shared number checks fed drawn non-finite, text, None or bool values"


@FUZZ
@given(v=st.one_of(st.just(NAN), st.just(INF), st.just(-INF), st.floats(max_value=-1e-6), st.text(max_size=4),
                   st.none(), st.booleans()))
def test_hyp_number_checks(v):
    from advlab._util import check_nonneg, check_positive, check_positive_int

    for fn in (check_nonneg, check_positive, check_positive_int):
        _raises(lambda: fn(v, "arg"), r"\barg\b")


def test_fuzz_catalogue_is_well_formed():
    """Every case has an id of the form "<entry point>/<bad input>" and a non-empty needle."""
    for cid, c in CASES.items():
        assert "/" in cid and c.match, cid
