"""Black-box substitute training (Papernot et al. 2017): the attacker only sees an oracle's labels,
trains a substitute on them and grows its query set by Jacobian-based augmentation; attacks
crafted on the substitute then transfer to the oracle.

>>> sub, queries = jacobian_substitute(oracle, seeds, num_classes=10, rounds=6, lam=0.1)
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from ..models import build_model
from ..train import fit, predict

__all__ = ["jacobian_substitute"]


def jacobian_substitute(oracle, seeds: torch.Tensor, num_classes: int, rounds: int = 6, lam: float = 0.1,
                        epochs: int = 10, lr: float = 3e-3, seed: int = 0, model: str = "model-e",
                        log=lambda m: None):
    """Papernot et al. (2017) substitute training: label the ``seeds`` by the ``oracle``'s
    predictions, train a fresh substitute ``model`` on them, and between rounds add
    ``x + lam * sign(d z_label / dx)`` for every point (the set doubles each round). Returns the
    substitute and the number of oracle queries.

    ``oracle``: the model whose labels are copied (its ``predict`` or argmax); ``seeds``: images in
    [0, 1]; ``num_classes``: the substitute's output size; ``rounds``, ``lam``: the augmentation;
    ``epochs``, ``lr``: the substitute's training per round; ``seed``: its initial weights and batch
    order; ``model``: a zoo name; ``log``: a callable for one progress line."""
    x = seeds.clone()
    sub = None
    queries = 0
    for r in range(rounds):
        labels = predict(oracle, x).cpu()
        queries += x.shape[0]
        sub = build_model(model, num_classes, tuple(x.shape[1:]), mean=0.5, std=0.5, seed=seed + r)
        fit(sub, TensorDataset(x, labels), epochs=epochs, lr=lr, batch_size=min(64, x.shape[0]), seed=seed + r,
            progress=False, desc="substitute")
        sub.eval()
        if r == rounds - 1:
            break
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(sub(xg).gather(1, labels[:, None]).sum(), xg)
        x = torch.cat([x, (x + lam * g.sign()).clamp(0.0, 1.0)])
    log(f"  Jacobian substitute: {rounds} rounds, {x.shape[0]} points, {queries} oracle queries")
    return sub, queries
