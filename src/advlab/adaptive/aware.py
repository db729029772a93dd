"""The defense-aware attacks advlab has, per defense: what an adaptive evaluation adds to the
generic :func:`advlab.eval.evaluate` battery when it knows which defense it faces.

>>> from advlab.adaptive.aware import defense_aware_attacks
>>> for name, attack in defense_aware_attacks(defense, norm="inf", eps=0.3, steps=50, seed=0):
...     x_adv = attack(x, y)          # judge with defense.predict

- M-SVDD-D: :class:`~advlab.adaptive.MSVDDFullKnowledge` (the unique-verifier loss through
  BPDA of the ReLU / clamp, three target classes);
- I-defender: :class:`~advlab.adaptive.IDefenderAdaptive` (margin plus the likelihood hinge
  above the target class's threshold, three targets);
- PCL: PGD on the joint loss CE + sum_l L_PC (:func:`~advlab.adaptive.joint_loss_attack`) and
  PGD on eq. 6's prototype scores (:func:`~advlab.adaptive.prototype_attack`);
- any other defense (a user's own, adversarial training, none): nothing beyond the battery,
  unless the defense itself offers ``adaptive_attacks(norm=, eps=, steps=, seed=)`` returning
  ``[(name, attack), ...]`` (an attack is any callable ``(x, y) -> x_adv``), which is used as it is.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

from torch import nn

from .._util import AdvlabError, check_nonneg, check_positive_int
from ..attacks.geometry import check_norm
from ..defenses.idefender import IDefender
from ..defenses.msvdd import MSVDDDefense
from ..defenses.pcl import PCLDefense
from .idefender import IDefenderAdaptive
from .msvdd import MSVDDFullKnowledge
from .pcl import joint_loss_attack, prototype_attack

__all__ = ["defense_aware_attacks"]


def defense_aware_attacks(defense: nn.Module, norm: str = "inf", eps: float = 0.3, steps: int = 50,
                          seed: int = 0) -> List[Tuple[str, Callable]]:
    """``[(name, attack), ...]``: the attacks that know ``defense`` (see the module docstring), at
    radius ``eps`` (pixel units on [0, 1]) in the ``norm`` ("inf" or "2") ball, ``steps``
    iterations each, seeded by ``seed``. Each attack returns adversarials to be judged by
    ``defense.predict``. An empty list for a defense advlab has no specific attack for. Raises
    :class:`~advlab.AdvlabError` on a bad ``norm``, ``eps`` or ``steps``, or when the defense's own
    ``adaptive_attacks`` does not return a list of (name, callable) pairs."""
    norm = check_norm(norm)
    eps = check_nonneg(float(eps), "eps")
    steps = check_positive_int(steps, "steps")
    alpha = 2.5 * eps / steps
    if isinstance(defense, MSVDDDefense):
        return [(f"M-SVDD-D full-knowledge ({steps} steps, 3 targets)",
                 MSVDDFullKnowledge(defense, eps=eps, norm=norm, steps=steps, targets=3, seed=seed))]
    if isinstance(defense, IDefender):
        return [(f"I-defender likelihood hinge ({steps} steps, 3 targets)",
                 IDefenderAdaptive(defense, eps=eps, norm=norm, steps=steps, targets=3, seed=seed))]
    if isinstance(defense, PCLDefense):
        return [(f"PGD on the joint loss CE + L_PC ({steps} steps)",
                 joint_loss_attack("pgd", defense, eps=eps, norm=norm, alpha=alpha, steps=steps, seed=seed)),
                (f"PGD on eq. 6's prototype scores ({steps} steps)",
                 prototype_attack("pgd", defense, eps=eps, norm=norm, alpha=alpha, steps=steps, seed=seed + 1))]
    own = getattr(defense, "adaptive_attacks", None)
    if own is None:
        return []
    out = own(norm=norm, eps=eps, steps=steps, seed=seed)
    if not isinstance(out, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and callable(p[1]) for p in out):
        raise AdvlabError(f"{type(defense).__name__}.adaptive_attacks must return a list of (name, attack) pairs, "
                          f"got {out!r}")
    return [(str(n), a) for n, a in out]
