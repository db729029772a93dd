"""``advlab reproduce pcl``: the MNIST / Fashion-MNIST half of the PCL paper (Mustafa et al. 2019)
— Table 2 (white-box and black-box, rows Softmax / PCL / PCL+AdvTrain-FGSM / PCL+AdvTrain-PGD),
Table 3 (attacks on the joint PC+CE loss), Table 9's MNIST columns (eps 0.1 / 0.15), a Table 7-style
layer ablation on cnn6, the section 5.5 checks with the Fig. 4 analogue — and what the paper does
not measure: the adaptive number (per-sample worst case over the paper's attacks, the attacks on the
joint loss, the :func:`advlab.eval.evaluate` battery and margin / DLR attacks with more steps and
restarts), the fraction of inputs with an exactly-zero CE input gradient and the logit norms. The
paper's numbers live in ``specs/pcl.yaml``; this module holds the protocol and the table layout.

Protocol (written into every report):

- cnn6 (Table 1) is first trained with cross-entropy for the CE warm-up (T') of Algorithm 1; PCL
  continues from it with CE + L_PC on the GAP, FC 512 and FC 64 features (prototypes: own SGD, lr
  0.5, initialised at the class means of the warmed-up features; model: the spec's optimiser, lr
  x0.1 at 2/3 and 5/6 of the PC phase). The Softmax row is PCL's equal-budget softmax twin: the
  same warm-up continued for the same PC-phase epochs on the same data, in the same batch order,
  with the same optimiser and learning-rate decay, on cross-entropy only — so "PCL keeps the clean
  accuracy of its softmax twin" compares two models that differ only in the loss. The two AdvTrain
  rows continue from the trained PCL model with clean and adversarial examples 1:1 per batch, eps ~
  U[0.1, 0.5] per batch, crafted on the joint loss by FGSM or by PGD (10 steps of eps/10, random
  start) — the paper trains them for the whole PC phase; we fine-tune (scale);
- every number is an accuracy (%) over the same ``n`` test images (drawn by a seeded permutation,
  not filtered on correctness), judged by the model's own decision (argmax of the logits), except
  the eq. 6 columns, judged by the nearest-prototype rule;
- white-box, paper protocol: FGSM, BIM, MIM (decay 1), PGD (random start) at L-inf eps 0.3 with 10
  iterations of eps/10, on the cross-entropy of the logits; C&W L2 with c = 10 (one constant, no
  binary search, as the paper's "c = 10"; Adam in tanh space with the spec's steps and lr) on a
  subset, unbounded in norm; its success rate on the Softmax row says whether it converged;
- black-box: the same attacks crafted on an independently trained model of another architecture
  (the paper's VGG-19 is out of reach on this machine; LeNet-5 with its own seed stands in) and
  fed to each model;
- Table 3: the same four attacks ascending the joint loss CE + sum_l L_PC (prototypes known);
- adaptive: per sample, the worst case over the paper-protocol L-inf attacks, the joint-loss
  attacks, the :func:`advlab.eval.evaluate` battery (APGD-CE, APGD-T with the DLR loss, Square)
  and APGD-DLR / PGD with the margin loss, more steps and restarts; each later attack runs on the
  images every earlier one failed on. It is therefore never above the paper-protocol number;
- eq. 6 (nearest prototype of the FC 64 features): clean accuracy on the test set, and robust
  accuracy at eps 0.3 judged by eq. 6 — the Table 2 adversarials (crafted on the logits), PGD-10
  on the prototype scores (minus the distances, as logits) and, on the survivors, the battery and
  PGD-margin on the prototype scores; per-sample worst case;
- Table 9, the accuracy-vs-eps sweep and the layer ablation use one per-sample worst case on a
  smaller subset: FGSM, BIM, MIM, PGD-10, then the :func:`advlab.eval.evaluate` battery (APGD-CE,
  APGD-T, Square) and PGD-margin on the survivors; at a larger eps it also counts the adversarials
  found at a smaller one on the same image (they lie inside the larger ball);
- C&W is reported on its own (an L2 attack without a budget: another threat model) and is not
  part of the L-inf worst cases;
- departures from the paper's equations, stated here because every number below depends on them:
  (a) the PCL row follows Algorithm 1: one cross-entropy on the final logits plus L_PC on every
  supervised layer. Eq. 8 puts a cross-entropy *and* L_PC on every auxiliary branch; that reading is
  the "PCL (eq. 8)" row (auxiliary branches on GAP and FC 512, each a linear G_phi to 64 features with
  L_PC on them and a linear CE head; FC 64, which the final classifier reads, keeps eq. 7), trained
  from the same warm-up at the same budget. (b) In the Algorithm 1 row G_phi of eq. 9 is the identity:
  L_PC acts on the GAP / FC 512 / FC 64 features themselves, as in the authors' released code (Fig. 2
  shows a learned map per branch: the eq. 8 row has one). (c) The prototypes take their SGD step with
  the gradient of the batch the model just stepped on, at the prototype values that batch saw (the
  step is applied when the next batch starts, or at the end of the epoch). This is the released code's
  order, model step then prototype step, so it is not a departure from the code. (d) The PC phase is
  far shorter than the paper's (see the cuts). The training-budget curve below measures what a longer
  phase does to the paper-protocol and adaptive numbers, against the softmax twin trained as long.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..adaptive.pcl import joint_loss_attack, prototype_attack
from ..attacks import build_attack
from ..data import shared_data_root, load_train_test
from ..defenses.advtrain import madry_fit
from ..defenses.pcl import PCLDefense, PrototypeScores, pc_milestones, softmax_twin
from ..models import build_model
from ..train import accuracy, fit, predict, resolve_device
from ..eval.checks import attack_checks, eps_sweep_check, zero_gradient_fraction
from ..eval.evaluate import evaluate as run_battery
from ..eval.report import Report, pct, with_paper
from ..eval.runner import AttackRun, Chain, adversarial_result, pick_images, survivor_chain, worst_case
from ..eval.stages import stage

PAPER_ATTACKS = ("FGSM", "BIM", "MIM", "PGD")
T2_COLS = ["No Attack", "FGSM", "BIM", "C&W", "MIM", "PGD", "BB FGSM", "BB BIM", "BB C&W", "BB MIM", "BB PGD"]
#: the results' stable keys -> the column names of Table 2, Table 3 and the ablation (used at render time only)
COLUMNS = {"layers": "layers with L_PC", "clean": "No Attack", "fgsm": "FGSM", "bim": "BIM", "mim": "MIM", "pgd": "PGD",
           "cw": "C&W", "bb_fgsm": "BB FGSM", "bb_bim": "BB BIM", "bb_mim": "BB MIM", "bb_pgd": "BB PGD",
           "bb_cw": "BB C&W", "paper_protocol_worst": "paper-protocol worst", "adaptive": "adaptive",
           "zero_ce_grad_pct": "zero CE grad %", "logit_norm": "logit norm"}
#: the same for the paper-number-vs-adaptive table (``feature_norms`` become one "|f| layer" column each)
HEADLINE = {"model": "model", "clean": "clean (test set)", "pgd": "PGD-10 (paper protocol)",
            "paper_protocol_worst": "paper-protocol worst", "adaptive": "adaptive (worst case)",
            "zero_ce_grad_pct": "zero CE grad %", "zero_margin_grad_pct": "zero margin grad %",
            "logit_norm": "logit norm", "max_softmax": "max softmax", "logit_gap": "logit gap",
            "battery_flags": "battery flags", "eq6_clean": "eq. 6 clean %", "eq6_pgd_logits": "eq. 6 PGD-10 (logits) %",
            "eq6_pgd_prototype": "eq. 6 PGD-10 (prototype scores) %", "eq6_adaptive": "eq. 6 adaptive %"}
#: the sweep's curves -> their labels in the figure
CURVES = {"fgsm": "FGSM", "pgd": "PGD-10 (paper)", "adaptive": "adaptive (paper attacks + battery + PGD-margin)"}
BATTERY_STAGE = "+ battery (APGD-CE, APGD-T, FAB-T, Square)"
#: the row of the PCL model trained in eq. 8's reading (auxiliary branches with their own CE)
EQ8_ROW = "PCL (eq. 8)"
#: our Table 2 rows -> the paper's
PAPER_ROWS = {"Softmax": "Softmax", "PCL": "Ours", EQ8_ROW: "Ours", "PCL + AdvTrain FGSM": "Ours + AdvTrain FGSM",
              "PCL + AdvTrain PGD": "Ours + AdvTrain PGD"}
#: the budget curve's readings -> their labels
CURVE_READINGS = {"algorithm1": "PCL (Algorithm 1)", "eq8": "PCL (eq. 8)", "softmax": "softmax twin (CE only)"}


def _key(attack: str) -> str:
    return attack.lower().replace("c&w", "cw")


def _render(row: Dict[str, Any], names: Dict[str, str]) -> Dict[str, Any]:
    out = {names.get(k, k): v for k, v in row.items() if k != "feature_norms"}
    out.update({f"|f| {n}": v for n, v in row.get("feature_norms", {}).items()})
    return out



def _f(v: Optional[float]) -> float:
    return float("nan") if v is None else float(v)


def _log(spec):
    return (lambda msg: None) if spec.get("quiet") else (lambda msg: print(msg, flush=True))


# --------------------------------------------------------------------------- attacks
def paper_attack(name: str, model, eps: float, seed: int, steps: int = 10, build=None):
    """The paper's attack ``name`` at ``eps``: FGSM, or BIM / MIM / PGD with ``steps`` steps of
    eps/steps, on the CE of ``model``'s logits; with ``build`` (:func:`advlab.adaptive.pcl.joint_loss_attack`
    or :func:`~advlab.adaptive.pcl.prototype_attack`) on that PCL defense's joint loss or eq. 6."""
    kind = name.lower()
    kw = {"eps": eps} if kind == "fgsm" else {"eps": eps, "alpha": eps / steps, "steps": steps,
                                              **({"seed": seed} if kind == "pgd" else {})}
    return build_attack(kind, model, loss="ce", **kw) if build is None else build(kind, model, **kw)


def _batched_attack(atk, x, y, batch_size: int) -> torch.Tensor:
    return torch.cat([atk(x[i: i + batch_size], y[i: i + batch_size]) for i in range(0, x.shape[0], batch_size)]) \
        if x.shape[0] else x.clone()


def _run(atk, x, y, judge, batch_size):
    return adversarial_result(x, y, _batched_attack(atk, x, y, batch_size), judge)


def _link(name: str, make, batch_size: int) -> AttackRun:
    """A chain link that builds its attack when it runs and calls it batch by batch."""
    return AttackRun(name, lambda xs, ys: _batched_attack(make(), xs, ys, batch_size))


def _after_paper_attacks(model, eps: float, seed: int, bs: int, steps: int, square_queries: int, margin_steps: int,
                         restarts: int = 1, dlr: bool = False, checks: bool = False,
                         kept: Optional[list] = None) -> List[AttackRun]:
    """The links a chain runs on the paper attacks' survivors: the :func:`advlab.eval.evaluate`
    battery (APGD-CE, APGD-T, FAB-T, Square; appended to ``kept``), with ``dlr`` APGD-DLR, then
    PGD-margin with ``margin_steps`` steps."""
    def battery(xs, ys):
        bat = run_battery(model, xs, ys, norm="inf", eps=eps, seed=seed, steps=steps, square_queries=square_queries,
                          batch_size=bs, checks=checks, progress=False)
        if kept is not None:
            kept.append(bat)
        return bat.x_adv

    runs = [AttackRun(BATTERY_STAGE, battery)]
    if dlr:
        runs.append(_link("APGD-DLR", lambda: build_attack("apgd-dlr", model, eps=eps, steps=steps, restarts=restarts,
                                                           seed=seed), bs))
    runs.append(_link("+ APGD-DLR, PGD-margin (restarts)" if dlr else "+ PGD-margin",
                      lambda: build_attack("pgd", model, eps=eps, alpha=2.5 * eps / margin_steps, steps=margin_steps,
                                           loss="margin", restarts=restarts, seed=seed + 1), bs))
    return runs


def _stages(chain: Chain, start) -> Dict[str, float]:
    """Robust accuracy after each link as this report counts it: the float32 share of all images
    that no attack so far gave a wrong class (``Chain.stages`` also asks for a correct clean
    prediction and averages in float64, so its numbers differ in the last bits)."""
    alive = start.adv_pred == start.labels
    out = {}
    for name in chain.stages:
        if name in chain.results:
            r = chain.results[name]
            alive[chain.ran_on[name][r.adv_pred != r.labels]] = False
        out[name] = float(alive.float().mean())
    return out


# --------------------------------------------------------------------------- measurements
@torch.no_grad()
def logit_stats(model, x: torch.Tensor) -> Dict[str, Any]:
    """Mean L2 norm of the logits, mean top-1 softmax probability, mean gap top1 - top2 logit, and
    (for a PCL defense) the mean feature norm of each supervised layer."""
    model.eval()
    if isinstance(model, PCLDefense):
        feats = model.features(x)
        z = feats["logits"]
    else:
        z = model(x)
        feats = {}
    top = z.topk(2, dim=1).values
    out: Dict[str, Any] = {"logit_norm": float(z.norm(dim=1).mean()),
                           "max_softmax": float(F.softmax(z.double(), 1).amax(1).mean()),
                           "logit_gap": float((top[:, 0] - top[:, 1]).mean())}
    if getattr(model, "layers", None):
        out["feature_norms"] = {n: float(feats[n].norm(dim=1).mean()) for n in model.layers}
    return out


def white_box(model, x, y, eps: float, spec, seed: int, log, joint: bool = False, prefix: str = "") -> Dict[str, Any]:
    """The paper's four L-inf attacks (CE on the logits, or with ``joint`` the PCL defense
    ``model``'s joint loss), each on every image."""
    bs = int(spec.get("batch_size", 256))
    judge = lambda xb: predict(model, xb)  # noqa: E731
    res = {}
    for name in PAPER_ATTACKS:
        t0 = time.perf_counter()
        res[name] = _run(paper_attack(name, model, eps, seed, build=joint_loss_attack if joint else None), x, y,
                         judge, bs)
        res[name].seconds = time.perf_counter() - t0
    log(f"    {prefix}white-box eps {eps:g}" + (" (joint loss)" if joint else "") + ": "
        + ", ".join(f"{k} {100 * r.robust_accuracy:.1f}" for k, r in res.items()))
    return res


def adaptive(model, x, y, eps: float, spec, seed: int, log, earlier: List):
    """The adaptive number: one survivor chain from the worst case of ``earlier`` (attacks run on
    every image): the battery, APGD-DLR and PGD-margin with restarts; returns (the chain's worst
    case, its cumulative robust accuracies, the battery's result or None)."""
    ad = spec.get("adaptive", {})
    bs = int(spec.get("batch_size", 256))
    start, kept = worst_case(earlier), []
    runs = _after_paper_attacks(model, eps, seed, bs, int(ad.get("steps", 100)), int(ad.get("square_queries", 1000)),
                                int(ad.get("margin_steps", 100)), int(ad.get("restarts", 1)), dlr=True,
                                checks=bool(ad.get("checks", True)), kept=kept)
    chain = survivor_chain(runs, x, y, lambda xb: predict(model, xb), start=start, batch_size=bs)
    stages = {"paper-protocol L-inf worst": start.robust_accuracy, **_stages(chain, start)}
    del stages["APGD-DLR"]
    log(f"    adaptive eps {eps:g}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in stages.items())
        + f" (battery {chain.seconds.get(BATTERY_STAGE, 0.0):.0f} s)")
    return chain.worst, stages, (kept[0] if kept else None)


def linf_worst(model, x: torch.Tensor, y: torch.Tensor, eps: float, spec, seed: int, before=None) -> Dict[str, Any]:
    """At L-inf ``eps`` on ``(x, y)``: FGSM, BIM, MIM and PGD-10 (paper protocol, each on every
    image) and the adaptive per-sample worst case: one survivor chain from those four and
    ``before`` (the worst case at a smaller eps: its adversarials lie inside this ball too) through
    the :func:`advlab.eval.evaluate` battery (``spec["linf_battery"]``) and PGD-margin. Returns
    robust accuracies (fractions), the cumulative stages, the ``worst`` case (for a larger eps)
    and the seconds."""
    cfg = spec.get("linf_battery", {})
    bs = int(spec.get("batch_size", 256))
    judge = lambda xb: predict(model, xb)  # noqa: E731
    t0 = time.perf_counter()
    if eps == 0:
        clean = adversarial_result(x, y, x, judge)
        acc = clean.robust_accuracy
        return {**{k: acc for k in PAPER_ATTACKS}, "adaptive": acc, "stages": {}, "worst": clean, "seconds": 0.0}
    res = {k: _run(paper_attack(k, model, eps, seed), x, y, judge, bs) for k in PAPER_ATTACKS}
    start = worst_case(res.values())
    stages = {"paper attacks (FGSM, BIM, MIM, PGD-10)": start.robust_accuracy}
    if before is not None:
        start = worst_case([*res.values(), before])
        stages["+ broken at a smaller eps"] = start.robust_accuracy
    chain = survivor_chain(_after_paper_attacks(model, eps, seed, bs, int(cfg.get("steps", 25)),
                                                int(cfg.get("square_queries", 300)), int(cfg.get("margin_steps", 50))),
                           x, y, judge, start=start, batch_size=bs)
    stages.update(_stages(chain, start))
    return {**{k: r.robust_accuracy for k, r in res.items()}, "adaptive": chain.worst.robust_accuracy,
            "stages": stages, "worst": chain.worst, "seconds": time.perf_counter() - t0}


def linf_grid(models: Dict[str, Any], needs: Dict[str, List[float]], x, y, spec, seed, log) -> Dict[str, Dict]:
    """:func:`linf_worst` for each model at each of its eps in ``needs``, in ascending eps (so the
    worst case at an eps counts what broke at the smaller ones, whatever table asked first).
    Returns {model: {eps: result}}."""
    out: Dict[str, Dict[float, Dict[str, Any]]] = {}
    for name, grid in needs.items():
        out[name] = {}
        before = None
        for e in sorted({float(v) for v in grid}):
            r = linf_worst(models[name], x, y, e, spec, seed, before)
            out[name][e] = r
            before = r["worst"]
        log(f"    {name}: " + ", ".join(f"eps {e:g} PGD-10 {100 * r['PGD']:.0f} / adaptive {100 * r['adaptive']:.0f}"
                                      f" ({r['seconds']:.0f} s)" for e, r in out[name].items()))
    return out


def eq6_robust(model: PCLDefense, x: torch.Tensor, y: torch.Tensor, eps: float, spec, seed: int,
               transfer: Dict[str, torch.Tensor]) -> Dict[str, Optional[float]]:
    """Robust accuracy under eq. 6 (nearest prototype) at L-inf ``eps``: the adversarials of
    ``transfer`` (crafted on the logits or the joint loss) judged by eq. 6, PGD-10 on the prototype
    scores (:class:`PrototypeScores`), then one survivor chain from all of them through the
    :func:`advlab.eval.evaluate` battery and PGD-margin on the prototype scores
    (``spec["adaptive"]`` settings)."""
    ad = spec.get("adaptive", {})
    bs = int(spec.get("batch_size", 256))
    j6 = lambda xb: model.predict(xb, rule="prototype")  # noqa: E731
    moved = {k: adversarial_result(x, y, v, j6) for k, v in transfer.items()}
    pgd = _run(paper_attack("PGD", model, eps, seed, build=prototype_attack), x, y, j6, bs)
    runs = _after_paper_attacks(PrototypeScores(model), eps, seed, bs, int(ad.get("steps", 100)),
                                int(ad.get("square_queries", 1000)), int(ad.get("margin_steps", 100)))
    chain = survivor_chain(runs, x, y, j6, start=worst_case([*moved.values(), pgd]), batch_size=bs)
    return {"eq6_pgd_logits": pct(moved["PGD"].robust_accuracy) if "PGD" in moved else None,
            "eq6_pgd_prototype": pct(pgd.robust_accuracy), "eq6_adaptive": pct(chain.worst.robust_accuracy)}


# --------------------------------------------------------------------------- one dataset
def _data(exp, data_root, seed: int):
    return load_train_test(exp["dataset"], data_root, exp.get("folder"), exp.get("train_subset"),
                           exp.get("test_subset"), seed)


def _train_cfg(exp, spec) -> Dict[str, Any]:
    return dict(spec.get("train", {}), **exp.get("train", {}))


def warmed_up(exp, spec, train, seed: int, dev):
    """The CE warm-up (T' of Algorithm 1) as its own resumable stage: every PCL model, the softmax
    twin and the budget curve continue from it. Returns (model, seconds it took to train)."""
    tr = _train_cfg(exp, spec)
    mean, std = train.channel_stats()

    def work():
        t0 = time.perf_counter()
        warm = build_model("cnn6", train.num_classes, train.in_shape, mean=mean, std=std, seed=seed).to(dev)
        fit(warm, train, epochs=int(tr["warmup_epochs"]), lr=float(tr["lr"]), batch_size=int(tr["batch_size"]),
            optimizer=str(tr.get("optimizer", "sgd")), weight_decay=float(tr.get("weight_decay", 1e-4)), seed=seed,
            progress=False, desc="CE warm-up")
        return {"state_dict": warm.state_dict(), "seconds": time.perf_counter() - t0}

    st = stage(f"{exp['name']}/CE warm-up", work)
    warm = build_model("cnn6", train.num_classes, train.in_shape, mean=mean, std=std, seed=seed).to(dev)
    warm.load_state_dict(st["state_dict"])
    return warm.eval(), float(st["seconds"])


def fit_pcl(warm, train, spec, tr, pc_epochs: int, seed: int, reading: str = "algorithm1",
            layers=None) -> PCLDefense:
    """PCL continued from the CE warm-up ``warm`` for ``pc_epochs`` (the spec's optimiser, lr,
    batch, weight decay and loss preset) in the given ``reading`` of the loss."""
    return PCLDefense.fit(warm, train, layers=layers, warmup_epochs=0, pc_epochs=pc_epochs, lr=float(tr["lr"]),
                          batch_size=int(tr["batch_size"]), weight_decay=float(tr.get("weight_decay", 1e-4)),
                          optimizer=str(tr.get("optimizer", "sgd")), preset=spec.get("preset", "paper"), seed=seed,
                          progress=False, reading=reading, branch_dim=int(spec.get("branch_dim", 64)))


def train_models(exp, spec, train, seed, dev, log) -> Dict[str, Any]:
    """The CE warm-up, PCL (continued from it), its equal-budget softmax twin (the Softmax row),
    PCL + AdvTrain FGSM / PGD, optionally Madry PGD-AT (from the twin), the ablation's extra
    layer sets, and the independent black-box source."""
    tr = _train_cfg(exp, spec)
    mean, std = train.channel_stats()
    models: Dict[str, Any] = {}
    secs: Dict[str, float] = {}
    opt = str(tr.get("optimizer", "sgd"))
    lr, bsz, wd = float(tr["lr"]), int(tr["batch_size"]), float(tr.get("weight_decay", 1e-4))
    warm, secs["CE warm-up"] = warmed_up(exp, spec, train, seed, dev)
    t0 = time.perf_counter()
    models["Softmax"] = softmax_twin(warm, train, int(tr["pc_epochs"]), lr, bsz, opt, wd, seed)
    secs["Softmax twin (CE, PC-phase epochs)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pcl = fit_pcl(warm, train, spec, tr, int(tr["pc_epochs"]), seed)
    models["PCL"] = pcl
    secs["PCL (PC phase)"] = time.perf_counter() - t0
    if "eq8" in spec.get("readings", ()):
        t0 = time.perf_counter()
        models[EQ8_ROW] = fit_pcl(warm, train, spec, tr, int(tr["pc_epochs"]), seed, reading="eq8")
        secs[f"{EQ8_ROW} (PC phase)"] = time.perf_counter() - t0
    adv_set = train.subset(int(tr["adv_subset"]), seed=seed + 7) if tr.get("adv_subset") else train
    for kind in ("FGSM", "PGD"):
        t0 = time.perf_counter()
        d = copy.deepcopy(pcl)
        d.history = copy.deepcopy(pcl.history)
        d.train_pc(adv_set, int(tr["adv_epochs"]), lr=float(tr.get("adv_lr", lr)), batch_size=bsz, weight_decay=wd,
                   optimizer=opt, adversarial=kind.lower(), adv_eps=tuple(spec.get("adv_eps", (0.1, 0.5))),
                   adv_objective="joint", seed=seed, progress=False, phase="advtrain")
        models[f"PCL + AdvTrain {kind}"] = d
        secs[f"PCL + AdvTrain {kind}"] = time.perf_counter() - t0
    if exp.get("madry", spec.get("madry")):
        mcfg = spec.get("madry_train", {})
        t0 = time.perf_counter()
        m = copy.deepcopy(models["Softmax"])
        madry_fit(m, adv_set, eps=float(mcfg.get("eps", 0.3)), steps=int(mcfg.get("steps", 10)),
                  alpha=float(mcfg.get("alpha", 0.03)), epochs=int(tr["adv_epochs"]) * int(mcfg.get("epoch_factor", 1)),
                  lr=float(tr.get("adv_lr", lr)), batch_size=bsz, optimizer=opt, weight_decay=wd, seed=seed,
                  progress=False)
        models["Madry PGD-AT (CE, from Softmax)"] = m.eval()
        secs["Madry PGD-AT"] = time.perf_counter() - t0
    extra: Dict[str, Any] = {}
    if spec.get("ablation") and exp.get("ablation", False):
        for layers in spec["ablation"]["layer_sets"]:
            layers = list(layers)
            if not layers or layers == list(pcl.layers):
                continue  # the twin and PCL themselves (the same budget)
            t0 = time.perf_counter()
            extra[" + ".join(layers)] = fit_pcl(warm, train, spec, tr, int(tr["pc_epochs"]), seed, layers=layers)
            secs[f"ablation: PCL on {' + '.join(layers)}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bb = spec.get("blackbox_source", {})
    src = build_model(bb.get("model", "lenet5"), train.num_classes, train.in_shape, mean=mean, std=std,
                      seed=seed + 1000).to(dev)
    fit(src, train, epochs=int(bb.get("epochs", 5)), lr=float(bb.get("lr", 3e-3)), batch_size=64,
        schedule="onecycle", seed=seed + 1000, progress=False, desc="black-box source")
    secs["black-box source"] = time.perf_counter() - t0
    log(f"  trained in {sum(secs.values()):.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()))
    return {"models": models, "ablation": extra, "warmup": warm, "source": src.eval(), "seconds": secs,
            "twin": {"epochs": int(tr["pc_epochs"]), "lr_decay_steps": pc_milestones(len(train), int(tr["pc_epochs"]),
                                                                                     bsz),
                     "pcl_lr_decay_steps": list(pcl.history["pc"][0]["lr_decay_steps"])}}


def _cached_models(exp, spec, train, seed, dev, log) -> Dict[str, Any]:
    """:func:`train_models` as a resumable stage (the training is most of an experiment's time):
    plain models are stored as weights, PCL defenses as weights, config and history, and rebuilt
    on fresh zoo models of the same architecture."""
    def pack(m):
        return m.to_state() if isinstance(m, PCLDefense) else {"state_dict": m.state_dict()}

    def work():
        tm = train_models(exp, spec, train, seed, dev, log)
        return {"models": {n: pack(m) for n, m in tm["models"].items()},
                "ablation": {n: pack(m) for n, m in tm["ablation"].items()}, "warmup": pack(tm["warmup"]),
                "source": tm["source"].state_dict(), "seconds": tm["seconds"], "twin": tm["twin"]}

    st = stage(f"{exp['name']}/trained models", work)
    mean, std = train.channel_stats()
    bb = spec.get("blackbox_source", {})

    def fresh(name: str, model_seed: int):
        return build_model(name, train.num_classes, train.in_shape, mean=mean, std=std, seed=model_seed).to(dev)

    def unpack(m):
        if "config" in m:
            return PCLDefense.from_state(fresh("cnn6", seed), m)
        net = fresh("cnn6", seed)
        net.load_state_dict(m["state_dict"])
        return net.eval()

    src = fresh(bb.get("model", "lenet5"), seed + 1000)
    src.load_state_dict(st["source"])
    return {"models": {n: unpack(m) for n, m in st["models"].items()},
            "ablation": {n: unpack(m) for n, m in st["ablation"].items()}, "warmup": unpack(st["warmup"]),
            "source": src.eval(), "seconds": st["seconds"], "twin": st["twin"]}


def run_experiment(exp: Dict[str, Any], spec: Dict[str, Any], data_root, seed: int, device=None,
                   log=print) -> Dict[str, Any]:
    dev = resolve_device(device)
    t_start = time.perf_counter()
    train, test = _data(exp, data_root, seed)
    log(f"{exp['name']}: {len(train)} training images, {len(test)} test images")
    tm = _cached_models(exp, spec, train, seed, dev, log)
    models, src = tm["models"], tm["source"]
    eps = float(spec.get("eps", 0.3))
    bs = int(spec.get("batch_size", 256))
    x, y = pick_images(src, test, int(spec.get("n", 200)), seed=seed)
    n_cw = min(int(spec.get("cw", {}).get("n", 50)), int(x.shape[0]))
    cwp = {k: v for k, v in spec.get("cw", {}).items() if k != "n"}
    out: Dict[str, Any] = {"name": exp["name"], "paper": exp.get("paper"), "n": int(x.shape[0]), "n_cw": n_cw,
                           "n_train": len(train), "n_test": len(test), "seconds": dict(tm["seconds"]),
                           "rows": {}, "table3": {}, "headline": [], "history": {}, "cw": {},
                           "twin": dict(tm["twin"], warmup_clean=pct(accuracy(tm["warmup"], test)))}
    # black-box: crafted once on the source
    t0 = time.perf_counter()
    bb_adv = {k: _batched_attack(paper_attack(k, src, eps, seed), x, y, bs) for k in PAPER_ATTACKS}
    bb_adv["C&W"] = _batched_attack(build_attack("cw", src, **cwp), x[:n_cw], y[:n_cw], bs)
    src_acc = {k: float((predict(src, v) == y[: v.shape[0]]).float().mean()) for k, v in bb_adv.items()}
    out["blackbox_source"] = {"model": spec.get("blackbox_source", {}).get("model", "lenet5"),
                              "clean": accuracy(src, test), "white_box_on_itself": src_acc}
    out["seconds"]["black-box crafting"] = time.perf_counter() - t0
    for mname, model in models.items():
        t0 = time.perf_counter()
        clean = accuracy(model, test)
        log(f"  {mname}: clean {100 * clean:.2f}%")
        judge = lambda xb, m=model: predict(m, xb)  # noqa: E731
        wb = white_box(model, x, y, eps, spec, seed, log)
        cw = adversarial_result(x[:n_cw], y[:n_cw], _batched_attack(build_attack("cw", model, **cwp), x[:n_cw],
                                                                     y[:n_cw], bs), judge)
        ok = cw.clean_pred == cw.labels
        hit = ok & (cw.adv_pred != cw.labels)
        out["cw"][mname] = {"n": n_cw, "clean": pct(float(ok.float().mean())), "robust": pct(cw.robust_accuracy),
                            "success_rate_pct": pct(float(hit.sum()) / int(ok.sum())) if bool(ok.any()) else None,
                            "mean_l2": float(cw.l2[hit].mean()) if bool(hit.any()) else None}
        log(f"    C&W: robust {out['cw'][mname]['robust']:.1f}%, success rate "
            f"{_f(out['cw'][mname]['success_rate_pct']):.1f}% of the correctly classified")
        bbr = {k: adversarial_result(x[: v.shape[0]], y[: v.shape[0]], v, judge) for k, v in bb_adv.items()}
        row = {"clean": pct(clean), **{_key(k): pct(r.robust_accuracy) for k, r in wb.items()},
               "cw": pct(cw.robust_accuracy), **{f"bb_{_key(k)}": pct(r.robust_accuracy) for k, r in bbr.items()}}
        t3: Dict[str, Any] = {}
        if isinstance(model, PCLDefense):
            t3 = white_box(model, x, y, eps, spec, seed, log, joint=True)
            out["table3"][mname] = {k: pct(r.robust_accuracy) for k, r in t3.items()}
        paper_worst = worst_case(list(wb.values())).robust_accuracy
        worst, stages, battery = adaptive(model, x, y, eps, spec, seed, log, list(wb.values()) + list(t3.values()))
        stats = logit_stats(model, x)
        zg = zero_gradient_fraction(model, x, y, loss="ce")
        zg_m = zero_gradient_fraction(model, x, y, loss="margin")
        row.update({"paper_protocol_worst": pct(paper_worst), "adaptive": pct(worst.robust_accuracy)})
        out["rows"][mname] = row
        head = {"model": mname, "clean": row["clean"], "pgd": row["pgd"],
                "paper_protocol_worst": row["paper_protocol_worst"], "adaptive": row["adaptive"],
                "zero_ce_grad_pct": 100 * zg, "zero_margin_grad_pct": 100 * zg_m, **stats,
                "battery_flags": ", ".join(f.name for f in battery.flags) if battery else "-"}
        if isinstance(model, PCLDefense):
            head["eq6_clean"] = pct(float((model.predict(test.images, rule="prototype") == test.labels).float().mean()))
            transfer = {k: r.adversarials for k, r in wb.items()}
            transfer.update({f"joint {k}": r.adversarials for k, r in t3.items()})
            transfer["adaptive worst"] = worst.adversarials
            head.update(eq6_robust(model, x, y, eps, spec, seed, transfer))
            log(f"    eq. 6: clean {head['eq6_clean']:.2f}%, PGD-10 (logits) "
                f"{head['eq6_pgd_logits']:.1f}%, adaptive {head['eq6_adaptive']:.1f}%")
        out["headline"].append(head)
        out.setdefault("stages", {})[mname] = {k: pct(v) for k, v in stages.items()}
        out.setdefault("flags", {})[mname] = [f.to_dict() for f in battery.flags] if battery else []
        out.setdefault("checks", {})[mname] = [f.to_dict() for f in attack_checks(
            {**{k: r.robust_accuracy for k, r in wb.items()},
             **{f"BB {k}": r.robust_accuracy for k, r in bbr.items() if k != "C&W"}},
            single_step=("FGSM",), iterative=("BIM", "MIM", "PGD"),
            black_box=tuple(f"BB {k}" for k in PAPER_ATTACKS), tol=0.02)]
        if isinstance(model, PCLDefense):
            out["history"][mname] = model.history
        out["seconds"][f"evaluate {mname}"] = time.perf_counter() - t0
    # Table 9, the sweep and the ablation: one per-sample worst case (paper attacks + battery +
    # PGD-margin) on a smaller subset, each (model, eps) computed once, in ascending eps
    do9 = bool(spec.get("table9")) and exp.get("table9", True)
    dosw = bool(spec.get("sweep")) and exp.get("sweep", True)
    doab = bool(spec.get("ablation")) and exp.get("ablation", False)
    if do9 or dosw or doab:
        t0 = time.perf_counter()
        n_l = min(int(spec.get("linf_battery", {}).get("n", x.shape[0])), int(x.shape[0]))
        xs, ys = x[:n_l], y[:n_l]
        pool = dict(models)
        needs: Dict[str, List[float]] = {}
        if do9:
            for mname in models:
                needs.setdefault(mname, []).extend(float(e) for e in spec["table9"].get("eps", [0.1, 0.15]))
        if dosw:
            needs.setdefault("PCL", []).extend(float(e) for e in spec["sweep"]["eps"])
        ab_rows = _ablation_models(spec, models, tm["ablation"]) if doab else []
        for label, mname, model in ab_rows:
            pool.setdefault(mname, model)
            needs.setdefault(mname, []).append(eps)
        log(f"  L-inf worst cases (Table 9 / sweep / ablation) on {n_l} images:")
        grid = linf_grid(pool, needs, xs, ys, spec, seed, log)
        out["linf_battery"] = {"n": n_l, "seconds": time.perf_counter() - t0,
                               "stages": {m: {f"{e:g}": {k: pct(v) for k, v in r["stages"].items()}
                                              for e, r in g.items()} for m, g in grid.items()}}
        if do9:
            t1 = time.perf_counter()
            out["table9"] = table9(models, grid, xs, ys, spec, seed, log)
            out["seconds"]["Table 9 (FGSM columns)"] = time.perf_counter() - t1
        if dosw:
            out["sweep"] = sweep(grid["PCL"], spec, n_l)
        if doab:
            out["ablation"] = ablation(ab_rows, grid, test, xs, ys, eps)
        out["seconds"]["Table 9 / sweep / ablation (L-inf worst cases)"] = time.perf_counter() - t0
    out["seconds"]["total"] = time.perf_counter() - t_start
    return out


def table9(models, grid, x, y, spec, seed, log) -> Dict[str, Any]:
    """Table 9 (MNIST): FGSM at 0.1 / 0.2, BIM / MIM / PGD at 0.1 / 0.15 (paper protocol), and the
    adaptive per-sample worst case at 0.1 / 0.15 (:func:`linf_worst`: the paper attacks, then the
    battery and PGD-margin on their survivors)."""
    t9 = spec["table9"]
    bs = int(spec.get("batch_size", 256))
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for mname, model in models.items():
        judge = lambda xb, m=model: predict(m, xb)  # noqa: E731
        col: Dict[str, Optional[float]] = {}
        for e in t9.get("fgsm_eps", [0.1, 0.2]):
            hit = grid[mname].get(float(e))
            col[f"FGSM {e}"] = pct(hit["FGSM"] if hit else
                                    _run(paper_attack("FGSM", model, float(e), seed), x, y, judge, bs).robust_accuracy)
        for e in t9.get("eps", [0.1, 0.15]):
            r = grid[mname][float(e)]
            col.update({f"{k} {e}": pct(r[k]) for k in ("BIM", "MIM", "PGD")})
            col[f"adaptive {e}"] = pct(r["adaptive"])
        out[mname] = col
    return {"n": int(x.shape[0]), "columns": out}


def sweep(res: Dict[float, Dict[str, Any]], spec, n: int) -> Dict[str, Any]:
    """Fig. 4 analogue: accuracy of the PCL model against eps — FGSM, PGD-10 (paper protocol) and
    the adaptive per-sample worst case of :func:`linf_worst` (battery included)."""
    grid = sorted(float(e) for e in spec["sweep"]["eps"])
    curves = {"fgsm": [res[e]["FGSM"] for e in grid], "pgd": [res[e]["PGD"] for e in grid],
              "adaptive": [res[e]["adaptive"] for e in grid]}
    flags = eps_sweep_check(grid, curves["pgd"]) + eps_sweep_check(grid, curves["adaptive"])
    return {"eps": grid, "n": n, "curves": curves, "flags": [fl.to_dict() for fl in flags]}


def _ablation_models(spec, models, extra) -> List[tuple]:
    """(row label, model key, model) for each layer set of the ablation: no layer is the softmax
    twin, all three is the PCL model (the same training budget), the others were trained in
    :func:`train_models`."""
    rows = []
    pcl_layers = list(models["PCL"].layers)
    for layers in spec["ablation"]["layer_sets"]:
        layers = list(layers)
        if not layers:
            rows.append(("None (CE only: the softmax twin)", "Softmax", models["Softmax"]))
        elif layers == pcl_layers:
            rows.append((" + ".join(layers) + " (the PCL model)", "PCL", models["PCL"]))
        else:
            key = " + ".join(layers)
            rows.append((key, f"ablation: {key}", extra[key]))
    return rows


def ablation(rows, grid, test, x, y, eps) -> List[Dict[str, Any]]:
    """Table 7 style: L_PC on different cnn6 layers, the same warm-up and PC-phase budget for every
    row; FGSM, PGD-10 and the adaptive worst case at ``eps``."""
    out = []
    for label, key, model in rows:
        r = grid[key][float(eps)]
        out.append({"layers": label, "clean": pct(accuracy(model, test)), "fgsm": pct(r["FGSM"]),
                    "pgd": pct(r["PGD"]), "adaptive": pct(r["adaptive"]),
                    "zero_ce_grad_pct": 100 * zero_gradient_fraction(model, x, y),
                    "logit_norm": logit_stats(model, x)["logit_norm"]})
    return out


# --------------------------------------------------------------------------- the training-budget curve
def curve_points(spec) -> List[tuple]:
    """The budget curve's (reading, PC-phase epochs) points, in the order :func:`run` computes them."""
    bc = spec.get("budget_curve") or {}
    return [(reading, int(e)) for reading in bc.get("readings", ["algorithm1", "softmax"])
            for e in bc.get("pc_epochs", [2, 4, 8, 16])]


def budget_point(exp, spec, data_root, seed: int, reading: str, epochs: int, device=None, log=print) -> Dict[str, Any]:
    """One point of the training-budget curve, a resumable stage of its own: the CE warm-up
    continued for ``epochs`` PC-phase epochs in ``reading`` ("algorithm1", "eq8", or "softmax": the
    equal-budget softmax twin, CE only), the same data, seed and lr decay (x0.1 at 2/3 and 5/6 of
    the phase) as the Table 2 models; its clean accuracy on the test set and, at each eps of
    ``spec["budget_curve"]["eps"]`` on the first ``n`` attacked images, the paper-protocol PGD-10,
    the worst of the four paper attacks and the adaptive per-sample worst case (:func:`linf_worst`:
    the battery and PGD-margin on the survivors, and what broke at the smaller eps)."""
    def work():
        dev = resolve_device(device)
        bc = spec.get("budget_curve") or {}
        tr = _train_cfg(exp, spec)
        train, test = _data(exp, data_root, seed)
        warm, _ = warmed_up(exp, spec, train, seed, dev)
        t0 = time.perf_counter()
        if reading == "softmax":
            model = softmax_twin(warm, train, epochs, float(tr["lr"]), int(tr["batch_size"]),
                                 str(tr.get("optimizer", "sgd")), float(tr.get("weight_decay", 1e-4)), seed)
        else:
            model = fit_pcl(warm, train, spec, tr, epochs, seed, reading=reading)
        train_s = time.perf_counter() - t0
        x, y = pick_images(warm, test, int(spec.get("n", 200)), seed=seed)
        n = min(int(bc.get("n", 30)), int(x.shape[0]))
        x, y = x[:n], y[:n]
        out: Dict[str, Any] = {"reading": reading, "epochs": epochs, "n": n, "clean": pct(accuracy(model, test)),
                               "train_seconds": train_s, "eps": {}}
        if isinstance(model, PCLDefense):
            out["eq6_clean"] = pct(float((model.predict(test.images, rule="prototype") == test.labels).float().mean()))
        before = None
        t1 = time.perf_counter()
        for e in sorted(float(v) for v in bc.get("eps", [0.1, 0.3])):
            r = linf_worst(model, x, y, e, spec, seed, before)
            before = r["worst"]
            out["eps"][f"{e:g}"] = {"pgd": pct(r["PGD"]), "paper_protocol_worst": pct(min(r[k] for k in PAPER_ATTACKS)),
                                     "adaptive": pct(r["adaptive"])}
        out["attack_seconds"] = time.perf_counter() - t1
        out["zero_ce_grad_pct"] = 100 * zero_gradient_fraction(model, x, y)
        log(f"  budget curve, {CURVE_READINGS[reading]}, {epochs} PC epoch(s): clean {out['clean']:.2f}%, "
            + ", ".join(f"eps {e}: PGD-10 {v['pgd']:.0f} / adaptive {v['adaptive']:.0f}" for e, v in out["eps"].items())
            + f" ({train_s:.0f} s training, {out['attack_seconds']:.0f} s attacks)")
        return out

    return stage(f"{exp['name']}/budget curve/{reading}/{epochs}", work)


def budget_curve(exp, spec, data_root, seed: int, device=None, log=print, points=None) -> Dict[str, Any]:
    """Every point of the budget curve (:func:`budget_point`) for one experiment; ``points``
    (default :func:`curve_points`) picks and orders them (a second process can compute them in
    reverse, sharing the stage cache)."""
    pts = [budget_point(exp, spec, data_root, seed, r, e, device, log) for r, e in (points or curve_points(spec))]
    return {"name": exp["name"], "points": pts}


def _curve_table(curve) -> List[Dict[str, Any]]:
    rows = []
    for p in curve["points"]:
        row = {"model": CURVE_READINGS[p["reading"]], "PC-phase epochs": p["epochs"], "clean %": p["clean"]}
        for e, v in p["eps"].items():
            row.update({f"PGD-10 {e}": v["pgd"], f"paper-protocol worst {e}": v["paper_protocol_worst"],
                        f"adaptive {e}": v["adaptive"]})
        row["zero CE grad %"] = p["zero_ce_grad_pct"]
        row["eq. 6 clean %"] = p.get("eq6_clean")
        row["seconds (train + attacks)"] = p["train_seconds"] + p["attack_seconds"]
        rows.append(row)
    return rows


def _curve_text(curve, paper_pgd: Optional[float]) -> str:
    """What the budget curve supports, generated from its numbers."""
    by: Dict[str, List[Dict[str, Any]]] = {}
    for p in curve["points"]:
        by.setdefault(p["reading"], []).append(p)
    thr = 100 / max(1, curve["points"][0]["n"]) ** 0.5   # twice the binomial standard error at 50%, in points
    lines = [f"**{curve['name']}** ({curve['points'][0]['n']} attacked images per point, so about +-"
             f"{100 * 0.5 / max(1, curve['points'][0]['n']) ** 0.5:.0f} points of binomial error at 50%; a curve "
             f"'rises' or 'falls' when its last point is more than {100 / max(1, curve['points'][0]['n']) ** 0.5:.0f} "
             f"points from its first, else it 'stays flat'):"]
    for reading, pts in by.items():
        pts = sorted(pts, key=lambda q: q["epochs"])
        for e in pts[0]["eps"]:
            pgd = [q["eps"][e]["pgd"] for q in pts]
            ad = [q["eps"][e]["adaptive"] for q in pts]
            def _trend(v):
                return "rises" if v[-1] > v[0] + thr else "falls" if v[-1] < v[0] - thr else "stays flat"

            trend, trend_ad = _trend(pgd), _trend(ad)
            follows = ("the adaptive number follows it" if trend == trend_ad else
                       f"the adaptive number {trend_ad}: the paper-protocol {'gain' if trend == 'rises' else 'change'} "
                       f"is not robustness")
            lines.append(f"- {CURVE_READINGS[reading]}, eps {e}: paper-protocol PGD-10 " + " -> ".join(
                f"{v:.0f}" for v in pgd) + f"% over {', '.join(str(q['epochs']) for q in pts)} PC epochs ({trend}); "
                "adaptive " + " -> ".join(f"{v:.0f}" for v in ad) + "%"
                + f"; {follows}"
                + (f" (paper, PGD-10 at eps 0.3 after 300 epochs: {paper_pgd}%)" if e == "0.3" and
                   reading != "softmax" and paper_pgd is not None else "") + ".")
    zg = max(q["zero_ce_grad_pct"] for q in curve["points"])
    lost = [(q, e) for q in curve["points"] for e, v in q["eps"].items() if v["pgd"] > v["adaptive"] + thr]
    if lost:
        worst = max(lost, key=lambda qe: qe[0]["eps"][qe[1]]["pgd"] - qe[0]["eps"][qe[1]]["adaptive"])
        q, e = worst
        lines.append(f"- Where paper-protocol PGD-10 keeps more than the adaptive number (by over {thr:.0f} points: "
                     f"{len(lost)} of {sum(len(q2['eps']) for q2 in curve['points'])} cells; the widest, "
                     f"{CURVE_READINGS[q['reading']]} after {q['epochs']} epochs at eps {e}: "
                     f"{q['eps'][e]['pgd']:.0f}% vs {q['eps'][e]['adaptive']:.0f}%), the input gradients are not zero "
                     f"(at most {zg:.0f}% of the images have an exactly-zero CE gradient at any point): the model is not "
                     f"saturated; PGD-10's ten steps of eps/10 stop short on a model trained longer, where the "
                     f"battery's APGD and PGD-margin do not.")
    pcl_pts = [q for r, v in by.items() if r != "softmax" for q in v]
    soft = {q["epochs"]: q for q in by.get("softmax", [])}
    if pcl_pts and soft:
        gaps = []
        for q in pcl_pts:
            t = soft.get(q["epochs"])
            if t is not None:
                for e in q["eps"]:
                    gaps.append((q["eps"][e]["pgd"] - t["eps"][e]["pgd"], q["eps"][e]["adaptive"] - t["eps"][e]["adaptive"]))
        if gaps:
            lines.append(f"- Against the softmax twin at the same budget: PCL's paper-protocol PGD-10 is "
                         f"{min(g[0] for g in gaps):+.0f} to {max(g[0] for g in gaps):+.0f} points from the twin's, "
                         f"its adaptive number {min(g[1] for g in gaps):+.0f} to {max(g[1] for g in gaps):+.0f} "
                         f"points (over every PCL point and eps).")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report
def _paper_row(spec, paper_name, row) -> Dict[str, Any]:
    p = spec.get("paper", {}).get("table2", {}).get(paper_name or "", {}).get(row)
    return dict(zip(spec["paper"]["table2_columns"], p)) if p else {}


def _checks_text(r: Dict[str, Any]) -> str:
    lines = [f"**{r['name']}**:"]
    for mname, row in r["rows"].items():
        it = row["fgsm"] is not None and row["pgd"] is not None and row["pgd"] <= row["fgsm"] + 2
        bb = all((row[f"bb_{_key(k)}"] or 0) >= (row[_key(k)] or 0) - 2 for k in PAPER_ATTACKS)
        lines.append(f"- {mname}: iterative (PGD {row['pgd']:.1f}) {'beats' if it else 'does NOT beat'} single-step "
                     f"(FGSM {row['fgsm']:.1f}); black-box {'is not stronger' if bb else 'IS STRONGER'} than white-box; "
                     f"adaptive {row['adaptive']:.1f} vs paper-protocol worst {row['paper_protocol_worst']:.1f}"
                     + (f"; flags: {', '.join(f['name'] for f in r['checks'][mname])}" if r["checks"][mname] else ""))
    if r.get("sweep"):
        c = r["sweep"]["curves"]
        lines.append(f"- PCL accuracy vs eps (n={r['sweep']['n']}): PGD-10 falls from {100 * c['pgd'][0]:.1f}% "
                     f"at eps 0 to {100 * c['pgd'][-1]:.1f}% at eps {r['sweep']['eps'][-1]:g}; adaptive to "
                     f"{100 * c['adaptive'][-1]:.1f}% (" + ", ".join(
                         f"{e:g}: {100 * a:.0f}%" for e, a in zip(r["sweep"]["eps"], c["adaptive"])) + ")"
                     + (f"; flags: {', '.join(f['name'] for f in r['sweep']['flags'])}" if r["sweep"]["flags"] else
                        "; no sweep flag") + ".")
    return "\n".join(lines)


def twin_check(r: Dict[str, Any]) -> str:
    """The issue's clean-accuracy check, explicitly: PCL against its equal-budget softmax twin."""
    p = {h["model"]: h for h in r["headline"]}
    a, b = p["PCL"]["clean"], p["Softmax"]["clean"]
    d = a - b
    within = abs(d) <= 1.0
    return (f"PCL clean {a:.2f}% vs softmax twin {b:.2f}%: within 1 point: {'yes' if within else 'no'} "
            f"(PCL minus twin {d:+.2f} points" + ("; PCL is the higher, so it loses no clean accuracy"
                                                  if not within and d > 0 else "") + ")")


def _cw_text(r: Dict[str, Any], spec) -> str:
    """C&W settings, success rates and whether the attack converged (the Softmax row's rate)."""
    c = dict({"c": 1.0, "steps": 100, "lr": 0.1, "binary_search_steps": 9}, **spec.get("cw", {}))
    cw = r.get("cw", {})
    txt = (f"C&W, {r['name']} ({r['n_cw']} images; c = {c['c']:g}, {c['steps']} Adam steps of lr {c['lr']:g} in "
           f"tanh space, {c['binary_search_steps']} constant(s)): success rate on the images each model classifies "
           f"correctly: " + ", ".join(f"{m} " + ("n/a (none correct)" if v["success_rate_pct"] is None else
                                             f"{v['success_rate_pct']:.0f}%") for m, v in cw.items()))
    soft = cw.get("Softmax")
    if soft is None or soft["success_rate_pct"] is None:
        return txt + "."
    if soft["success_rate_pct"] >= 95:
        return txt + (f". Converged: the undefended Softmax row keeps {soft['robust']:.1f}% (paper 0.2%), so a high "
                      f"C&W number on a PCL row is that model's, not the attack's.")
    return txt + (f". UNDER-CONVERGED: the undefended Softmax row keeps {soft['robust']:.1f}% (paper 0.2%); the C&W "
                  f"column is an upper bound, not a measurement.")


def run(spec: Dict[str, Any], out_dir: Path, data_root: Optional[Path] = None, device=None) -> Report:
    """Run the bundled ``pcl`` reproduction; returns the saved Report."""
    from ..eval.figures import line_chart

    t0 = time.perf_counter()
    data_root = shared_data_root(data_root)
    seed = int(spec.get("seed", 0))
    rep = Report(out_dir, "PCL reproduction (Mustafa et al. 2019: Tables 2, 3, 7, 9, Fig. 4) with the adaptive row",
                 spec=spec, seed=seed)
    log = _log(spec)
    runs: List[Dict[str, Any]] = []
    with rep.use_threads(spec.get("threads")):
        for exp in spec["experiments"]:
            runs.append(stage(exp["name"], lambda: run_experiment(exp, spec, data_root, seed, device, log)))
            rep.time(exp["name"], runs[-1]["seconds"]["total"])
        curves = []
        for exp in spec["experiments"]:
            if spec.get("budget_curve") and exp.get("budget_curve", False):
                curves.append(budget_curve(exp, spec, data_root, seed, device, log))
                rep.time(f"{exp['name']}: budget curve", sum(p["train_seconds"] + p["attack_seconds"]
                                                              for p in curves[-1]["points"]))
    tr = spec["train"]
    ad = spec.get("adaptive", {})
    lb = spec.get("linf_battery", {})
    rep.add_text(__doc__.split("Protocol (written into every report):")[1].strip().join(["Protocol:\n\n", "\n\n"])
                 + f"Scale (the paper: T' = 50 CE epochs + 300 PC epochs on 60k images, batch 256): CE warm-up "
                 f"{tr['warmup_epochs']} epoch(s), PC phase {tr['pc_epochs']} epoch(s), AdvTrain fine-tuning "
                 f"{tr['adv_epochs']} epoch(s) on {tr.get('adv_subset') or 'all'} images, batch {tr['batch_size']}, "
                 f"{tr.get('optimizer', 'sgd')} lr {tr['lr']} (x0.1 at 2/3 and 5/6 of each PC phase); the softmax "
                 f"twin: the warm-up plus {tr['pc_epochs']} CE epoch(s) with the same decay; "
                 + "; ".join(f"{r['name']}: {r['n_train']} training images, {r['n']} attacked test images (C&W: "
                             f"{r['n_cw']}" + (f"; Table 9 / sweep / ablation: {r['linf_battery']['n']}"
                                               if r.get("linf_battery") else "") + ")" for r in runs)
                 + f"; Table 2 adaptive attacks {ad.get('steps')} steps (APGD), {ad.get('margin_steps')} "
                 f"(PGD-margin), {ad.get('restarts', 1)} restart(s), Square {ad.get('square_queries')} queries; "
                 f"Table 9 / sweep / ablation battery {lb.get('steps', 25)} APGD steps, Square "
                 f"{lb.get('square_queries', 300)} queries, PGD-margin {lb.get('margin_steps', 50)} steps; "
                 f"{rep.results['torch_threads']} torch thread(s). Loss preset: {spec.get('preset', 'paper')} "
                 f"(eq. 5: plain L2, pull/push/separation weights 1).")
    if spec.get("cuts"):
        rep.add_text("**Cut to fit the time budget** (stated, not silent):\n\n" + "\n".join(f"- {c}" for c in spec["cuts"]))
    ext = spec.get("paper", {}).get("robustbench")
    rep.add_text("## Clean accuracy: PCL vs its equal-budget softmax twin\n\n" + "\n".join(
        f"- {r['name']}: {twin_check(r)}. (The CE warm-up alone, after {tr['warmup_epochs']} epoch(s): "
        f"{r['twin']['warmup_clean']:.2f}%; twin lr-decay steps {r['twin']['lr_decay_steps']}, PCL's "
        f"{r['twin']['pcl_lr_decay_steps']}.)" for r in runs if r.get("twin")))
    for r in runs:
        rows = []
        for mname, ours in r["rows"].items():
            paper_name = PAPER_ROWS.get(mname)
            rows.append(with_paper({"training": mname, **_render(ours, COLUMNS)}, _paper_row(spec, r["paper"], paper_name),
                                   T2_COLS))
        rep.add_table(f"Table 2, {r['name']} (eps = 0.3, c = 10): accuracy (%)", rows,
                      note=f"Softmax: the equal-budget softmax twin (the CE warm-up continued for the PC phase's "
                           f"epochs on CE only). White-box: the model's own CE gradients (paper protocol). BB: "
                           f"crafted on "
                           f"{r['blackbox_source']['model']} (stand-in for VGG-19; clean "
                           f"{100 * r['blackbox_source']['clean']:.1f}%). C&W on {r['n_cw']} images. 'paper-protocol "
                           f"worst': per-sample worst over the four white-box L-inf attacks; 'adaptive': worst case "
                           f"over those, the joint-loss attacks and the adaptive attacks (L-inf 0.3, white-box). "
                           f"Our Madry row is not in the paper's Table 2. " + _cw_text(r, spec))
        rep.add_table(f"Paper number vs paper-protocol vs adaptive, {r['name']}",
                      [dict(_render(h, HEADLINE), **{"PGD (paper)": _paper_row(spec, r["paper"],
                                                                               PAPER_ROWS.get(h["model"])).get("PGD")})
                       for h in r["headline"]],
                      ["model", "clean (test set)", "PGD (paper)", "PGD-10 (paper protocol)", "paper-protocol worst",
                       "adaptive (worst case)", "zero CE grad %", "zero margin grad %", "logit norm", "max softmax",
                       "logit gap"] + [f"|f| {n}" for n in r["headline"][1].get("feature_norms", {})]
                      + ["eq. 6 clean %", "eq. 6 PGD-10 (logits) %", "eq. 6 PGD-10 (prototype scores) %",
                         "eq. 6 adaptive %", "battery flags"],
                      note="L-inf eps = 0.3. zero CE grad: share of the attacked images whose cross-entropy input "
                           "gradient is exactly 0 in float32 (a saturated softmax); logit norm / max softmax / gap "
                           "(top-1 minus top-2 logit) on the clean attacked images; |f|: mean feature norm of each "
                           "supervised layer; eq. 6: nearest-prototype rule on the FC 64 features: clean on the "
                           "test set; 'PGD-10 (logits)': the Table 2 PGD-10 adversarials judged by eq. 6; 'PGD-10 "
                           "(prototype scores)': PGD-10 on minus the prototype distances; 'adaptive': per-sample "
                           "worst case over every Table 2 / Table 3 L-inf adversarial judged by eq. 6, PGD-10 on "
                           "the prototype scores, then the battery and PGD-margin on them (eps 0.3).")
        rep.add_table(f"Adaptive stages, {r['name']} (cumulative per-sample worst case, %)",
                      [{"model": m, **s} for m, s in r["stages"].items()])
        if r["table3"]:
            p3 = spec.get("paper", {}).get("table3", {}).get(r["paper"] or "", {})
            rows3 = []
            for mname, t3 in r["table3"].items():
                key = PAPER_ROWS.get(mname, "")
                pv = dict(zip(["No Attack", "FGSM", "BIM", "MIM", "PGD"], p3.get(key, [])))
                ce = r["rows"][mname]
                rows3.append({"training": mname, "No Attack": ce["clean"], "No Attack (paper)": pv.get("No Attack"),
                              **{k2: v2 for k in PAPER_ATTACKS for k2, v2 in
                                 ((f"{k} joint", t3[k]), (f"{k} CE", ce[_key(k)]), (f"{k} joint (paper)", pv.get(k)))}})
            rep.add_table(f"Table 3 analogue, {r['name']}: attacks on the joint PC+CE loss (%)", rows3,
                          note="'joint': the attack ascends CE + sum_l L_PC with the prototypes known; 'CE': the "
                               "Table 2 white-box number. The paper's Table 3 has no MNIST block (F-MNIST and "
                               "CIFAR-10 only).")
        if r.get("table9"):
            p9 = spec.get("paper", {}).get("table9", {})
            rows9 = []
            for key in next(iter(r["table9"]["columns"].values())):
                row = {"attack": key}
                for mname, col in r["table9"]["columns"].items():
                    row[mname] = col[key]
                pv = p9.get(key, {})
                row.update({f"{k} (paper)": v for k, v in pv.items()})
                rows9.append(row)
            rep.add_table(f"Table 9 analogue (MNIST columns), {r['name']}: accuracy (%)", rows9,
                          note=f"{r['table9']['n']} images (the first of the Table 2 images). Paper columns: "
                               "Baseline (our Softmax twin), Ours, Ours_f*, Ours_p*. 'adaptive e': per-sample worst "
                               "case over FGSM/BIM/MIM/PGD-10 at e, what broke at a smaller eps, then the "
                               "advlab.eval.evaluate battery (APGD-CE, APGD-T, FAB-T, Square) and PGD-margin on the "
                               "survivors. C&W at c = 0.1 / 1 is cut (time).")
        if r.get("ablation"):
            p7 = spec.get("paper", {}).get("table7", {})
            rep.add_table(f"Table 7-style layer ablation on cnn6, {r['name']} (eps = 0.3, %)",
                          [_render(a, COLUMNS) for a in r["ablation"]],
                          note=f"Every row continues from the same CE warm-up with the same PC-phase budget "
                               f"({tr['pc_epochs']} epoch(s), same data, optimiser and lr decay); 'None' is the "
                               f"softmax twin and the all-three row the PCL model itself. FGSM / PGD-10 / adaptive "
                               f"(as in Table 9) on {r['linf_battery']['n']} images; clean on the test set. Paper "
                               f"(CIFAR-10, ResNet-110, eps 0.03, not comparable in scale): "
                               + "; ".join(f"{k}: {v}" for k, v in p7.items()))
    if ext:
        rep.add_text(f"External reference (RobustBench, CIFAR-10 L-inf 8/255, the authors' released PCL model): "
                     f"reported {ext['reported']}%, AutoAttack {ext['autoattack']}%.")
    for c in curves:
        bc = spec["budget_curve"]
        rep.add_table(f"Training-budget curve, {c['name']}: robust accuracy as the PC phase grows (%)",
                      _curve_table(c),
                      note=f"Every point continues from the same CE warm-up with the Table 2 models' data, seed, "
                           f"optimiser, batch and lr decay (x0.1 at 2/3 and 5/6 of its own PC phase); only the "
                           f"PC-phase length changes. PCL (Algorithm 1): one CE + L_PC on the GAP / FC 512 / FC 64 "
                           f"features; PCL (eq. 8): auxiliary branches with their own CE heads; softmax twin: CE "
                           f"only, the same epochs (the control: what the extra training alone does). L-inf, on "
                           f"the first {c['points'][0]['n']} Table 2 images: PGD-10 and the worst of FGSM / BIM / "
                           f"MIM / PGD-10 (paper protocol, CE on the logits), and the adaptive per-sample worst "
                           f"case (those, what broke at a smaller eps, the advlab.eval.evaluate battery and "
                           f"PGD-margin; battery {spec.get('linf_battery', {}).get('steps', 25)} APGD steps). "
                           f"The paper trains 300 PC epochs on 60k images; our points are "
                           f"{', '.join(str(e) for e in bc.get('pc_epochs', []))} epochs on "
                           f"{next(r['n_train'] for r in runs if r['name'] == c['name'])} images.")
        for e in c["points"][0]["eps"]:
            rep.add_figure(f"budget-curve-{c['name'].lower()}-eps-{e}", line_chart(
                {f"{CURVE_READINGS[rd]}: {lab}": (
                    [q["epochs"] for q in c["points"] if q["reading"] == rd],
                    [q["eps"][e][key] for q in c["points"] if q["reading"] == rd])
                 for rd in dict.fromkeys(q["reading"] for q in c["points"])
                 for key, lab in (("pgd", "PGD-10"), ("adaptive", "adaptive"))},
                title=f"PCL training-budget curve ({c['name']}, L-inf eps {e})", xlabel="PC-phase epochs",
                ylabel="accuracy (%)"),
                f"{c['name']}, L-inf eps {e}: paper-protocol PGD-10 and adaptive robust accuracy against the "
                f"PC-phase length")
        rep.add_text("## What the budget curve supports\n\n" + _curve_text(
            c, _paper_row(spec, next(r["paper"] for r in runs if r["name"] == c["name"]), "Ours").get("PGD")))
    rep.add_text("## Section 5.5 checks\n\n" + "\n\n".join(_checks_text(r) for r in runs))
    sw = [r for r in runs if r.get("sweep")]
    if sw:
        series = {}
        for r in sw:
            for k, v in r["sweep"]["curves"].items():
                series[f"{r['name']}: {CURVES[k]}"] = (r["sweep"]["eps"], [100 * a for a in v])
        rep.add_figure("accuracy-vs-eps", line_chart(series, title="PCL: accuracy vs eps (Fig. 4 analogue)",
                                                     xlabel="L-inf eps", ylabel="accuracy (%)"),
                       "PCL model: accuracy against eps, paper attacks and adaptive worst case (battery included)")
    rep.add_text(_discussion(runs, spec))
    for r in runs:
        rep.results[r["name"]] = r
    if curves:
        rep.results["budget_curve"] = curves
    rep.time("total", time.perf_counter() - t0)
    rep.save()
    return rep


def _discussion(runs, spec) -> str:
    lines = ["## What agrees with the paper and what does not", ""]
    for r in runs:
        p = {h["model"]: h for h in r["headline"]}
        pcl, soft = p.get("PCL", {}), p.get("Softmax", {})
        pp = _paper_row(spec, r["paper"], "Ours")
        lines.append(f"- **{r['name']}**: {twin_check(r)}. PGD-10 at eps 0.3: paper "
                     f"{pp.get('PGD', '-')}%, ours (paper protocol) {_f(pcl.get('pgd')):.1f}%, "
                     f"adaptive {_f(pcl.get('adaptive')):.1f}%. Zero CE gradients on "
                     f"{_f(pcl.get('zero_ce_grad_pct')):.0f}% of the PCL model's inputs (Softmax "
                     f"{_f(soft.get('zero_ce_grad_pct')):.0f}%); mean logit norm "
                     f"{_f(pcl.get('logit_norm')):.3g} (Softmax {_f(soft.get('logit_norm')):.3g}). "
                     f"Eq. 6 (nearest prototype): clean {_f(pcl.get('eq6_clean')):.2f}%, PGD-10 "
                     f"{_f(pcl.get('eq6_pgd_logits')):.1f}% (logit adversarials) / "
                     f"{_f(pcl.get('eq6_pgd_prototype')):.1f}% (on the prototype scores), adaptive "
                     f"{_f(pcl.get('eq6_adaptive')):.1f}% (logits: {_f(pcl.get('adaptive')):.1f}%)"
                     + (": the prototype rule is no more robust than the logits."
                        if _f(pcl.get("eq6_adaptive")) <= _f(pcl.get("adaptive")) + 2 else
                        ": the prototype rule keeps more than the logits under these attacks."))
    eq8 = [r for r in runs if EQ8_ROW in r["rows"]]
    if eq8:
        lines += ["", "Which reading of the loss the paper's numbers used. Algorithm 1 (line 5) writes one "
                  "cross-entropy plus sum_l L_PC; eq. 8 and Fig. 2 put a cross-entropy and L_PC on auxiliary branches "
                  "G_phi. The authors' released code (pcl_training.py, ResNet-110) computes one cross-entropy on the "
                  "final logits and L_PC directly on the 256-d pooled and 1024-d FC features, with no auxiliary map "
                  "and no auxiliary head: the Algorithm 1 reading with G_phi the identity. So the paper's numbers "
                  "most likely come from the Algorithm 1 reading (our PCL row); eq. 8 reads as a description of "
                  "deep supervision in general. Both readings, measured at the same budget:", ""]
        for r in eq8:
            p = {h["model"]: h for h in r["headline"]}
            a, b = p.get("PCL", {}), p.get(EQ8_ROW, {})
            lines.append(f"- **{r['name']}**: clean {_f(a.get('clean')):.2f}% (Algorithm 1) vs {_f(b.get('clean')):.2f}% "
                         f"(eq. 8); PGD-10 at eps 0.3 (paper protocol) {_f(a.get('pgd')):.1f}% vs "
                         f"{_f(b.get('pgd')):.1f}%; adaptive {_f(a.get('adaptive')):.1f}% vs {_f(b.get('adaptive')):.1f}%"
                         + ("; the robust numbers do not depend on the reading"
                            if abs(_f(a.get("adaptive")) - _f(b.get("adaptive"))) <= 5 and
                            abs(_f(a.get("pgd")) - _f(b.get("pgd"))) <= 10 else
                            "; the robust numbers differ by more than the images' binomial error")
                         + (", and neither does clean accuracy (within 1 point)." if abs(_f(a.get("clean")) -
                                                                                      _f(b.get("clean"))) <= 1 else
                            f"; clean accuracy differs by {_f(b.get('clean')) - _f(a.get('clean')):+.2f} points "
                            f"(eq. 8 minus Algorithm 1)."))
    lines += ["", "Inconsistencies inside the paper that bear on the comparison:", ""]
    lines += [f"- {t}" for t in spec.get("paper", {}).get("inconsistencies", [])]
    return "\n".join(lines)
