"""Figures drawn with matplotlib's Agg backend (no screen needed)."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .._util import AdvlabError  # noqa: E402


def _show(ax, img: torch.Tensor, cmap="gray", vmin=0.0, vmax=1.0):
    img = img.detach().float().cpu()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap=cmap, vmin=vmin, vmax=vmax)
    else:
        ax.imshow(img.permute(1, 2, 0).clamp(vmin, vmax).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def example_grid(clean: torch.Tensor, adversarial: Dict[str, torch.Tensor], magnify: float = 10.0, n: int = 6,
                 labels: Optional[Sequence[str]] = None):
    """Rows: clean image, then for each attack its adversarial and perturbation x``magnify``
    (shown around 0.5 gray, as in Fig. 2 of the K-A3 paper). Returns the Figure."""
    n = min(n, clean.shape[0])
    rows = 1 + 2 * len(adversarial)
    fig, axes = plt.subplots(rows, n, figsize=(1.3 * n, 1.3 * rows), squeeze=False)
    for j in range(n):
        _show(axes[0, j], clean[j])
        if labels is not None:
            axes[0, j].set_title(str(labels[j]), fontsize=7)
    axes[0, 0].set_ylabel("clean", fontsize=7)
    for i, (name, adv) in enumerate(adversarial.items()):
        for j in range(n):
            _show(axes[1 + 2 * i, j], adv[j])
            delta = (adv[j] - clean[j]) * magnify * 0.5 + 0.5
            _show(axes[2 + 2 * i, j], delta.clamp(0, 1), cmap="seismic")
        axes[1 + 2 * i, 0].set_ylabel(name, fontsize=7)
        axes[2 + 2 * i, 0].set_ylabel(f"x{magnify:g}", fontsize=7)
    fig.tight_layout()
    return fig


def bar_chart(groups: Dict[str, Sequence[float]], xlabels: Sequence[str], title: str = "", ylabel: str = ""):
    """Grouped bars: one series per key of ``groups`` over the categories ``xlabels``."""
    import numpy as np

    k = max(1, len(groups))
    x = np.arange(len(xlabels))
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(xlabels) * k ** 0.5), 3.2))
    for i, (name, vals) in enumerate(groups.items()):
        ax.bar(x + (i - (k - 1) / 2) * width, list(vals), width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(list(xlabels))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if k > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def line_chart(series: Dict[str, tuple], title: str = "", xlabel: str = "", ylabel: str = ""):
    """One line per key: ``series[name] = (xs, ys)``."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def training_curve(history, title: str = "training"):
    """Loss and accuracy per epoch from a :class:`advlab.train.History`."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ep = history["epoch"]
    ax.plot(ep, history["loss"], marker="o", label="loss")
    ax2 = ax.twinx()
    ax2.plot(ep, history["train_acc"], marker="s", color="tab:green", label="train acc")
    if history["test_acc"]:
        ax2.plot(ep, history["test_acc"], marker="^", color="tab:red", label="test acc")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2.set_ylabel("accuracy")
    ax.set_title(title)
    fig.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    return fig


def roc_figure(curves: Dict[str, tuple], title: str = ""):
    """ROC curves: ``curves[name] = (fpr, tpr)`` (as from :func:`advlab.metrics.detection.roc`),
    with the chance diagonal."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for name, (f, t) in curves.items():
        ax.plot(f, t, label=name)
    ax.plot([0, 1], [0, 1], color="gray", lw=0.5, ls="--")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=9)
    if curves:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def histogram(values: Dict[str, torch.Tensor], xlabel: str = "", title: str = "", bins: int = 80):
    """Overlaid density histograms, one per key (its label gets the number of values)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, v in values.items():
        v = torch.as_tensor(v).detach().cpu().reshape(-1)
        ax.hist(v.numpy(), bins=bins, alpha=0.55, density=True, label=f"{name} (n={v.numel()})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend()
    ax.set_title(title)
    return fig


def rank_pmf_figure(pmfs: Dict[str, Sequence[float]], max_rank: int = 10, title: str = "",
                    K_lines: Sequence[int] = (5, 9)):
    """Fig. 4 of the K-A3 paper: grouped bars of p(j) = P(true label at rank j), j = 1..max_rank,
    one series per attack (``pmfs[name]`` as from :func:`advlab.metrics.rank_pmf`), with dashed
    lines at 1/K for ``K_lines``. Returns a matplotlib Figure."""
    import numpy as np

    if isinstance(max_rank, bool) or int(max_rank) != max_rank or int(max_rank) < 1:
        raise AdvlabError(f"max_rank must be an integer >= 1, got {max_rank}")
    if not pmfs:
        raise AdvlabError("pmfs is empty: give at least one attack's rank pmf")
    max_rank = int(max_rank)
    k = len(pmfs)
    xs = np.arange(1, max_rank + 1)
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(5.5, 0.55 * max_rank * max(1.0, k ** 0.5)), 3.3))
    for i, (name, pmf) in enumerate(pmfs.items()):
        vals = [float(v) for v in list(torch.as_tensor(pmf, dtype=torch.float64).reshape(-1))[:max_rank]]
        vals += [0.0] * (max_rank - len(vals))
        ax.bar(xs + (i - (k - 1) / 2) * width, vals, width, label=name)
    for K in K_lines:
        ax.axhline(1.0 / K, ls="--", lw=0.8, color="gray")
        ax.text(max_rank + 0.45, 1.0 / K, f"1/{K}", fontsize=7, va="center", color="gray")
    ax.set_xticks(xs)
    ax.set_xlabel("rank j of the true label")
    ax.set_ylabel("p(j)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "P(true label at rank j) on the adversarial set")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- one attack


def robustness_curves(curves: Dict[str, Dict[str, tuple]], title: str = "", xlabel: str = "eps",
                      ylabel: str = "robust accuracy (%)"):
    """Robust accuracy against eps, one colour per system: ``curves[system] = {"claimed": (xs, ys),
    "adaptive": (xs, ys)}`` (either may be missing); the claimed threat model's line is dashed,
    the adaptive attacker's solid. Returns the Figure."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, lines) in enumerate(curves.items()):
        c = colors[i % len(colors)]
        for kind, style in (("claimed", "--"), ("adaptive", "-")):
            if kind in lines:
                xs, ys = lines[kind]
                ax.plot(list(xs), list(ys), ls=style, marker="o" if kind == "adaptive" else "x", color=c,
                        label=f"{name} ({kind})")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def scatter_labelled(points: Dict[str, tuple], title: str = "", xlabel: str = "", ylabel: str = ""):
    """One labelled point per key: ``points[name] = (x, y)``. Returns the Figure."""
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    for name, (px, py) in points.items():
        ax.scatter([px], [py], s=30)
        ax.annotate(name, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
