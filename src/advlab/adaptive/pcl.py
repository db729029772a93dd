"""Attacks that know PCL (Mustafa et al. 2019): the registry's attacks on the joint loss
CE + sum_l L_PC with the prototypes known (the paper's Table 3 "adaptive white-box" setting), and
on eq. 6's nearest-prototype rule (minus the prototype distances as logits).

The scores they differentiate, :class:`~advlab.defenses.pcl.JointLossScores` with
:func:`~advlab.defenses.pcl.joint_objective` and :class:`~advlab.defenses.pcl.PrototypeScores`,
live with the defense (Algorithm 1's adversarial training crafts on the joint loss); here they
become attacks."""

from __future__ import annotations

from ..attacks import build_attack
from ..defenses.pcl import JointLossScores, PCLDefense, PrototypeScores, joint_objective

__all__ = ["joint_loss_attack", "prototype_attack"]


def joint_loss_attack(name: str, defense: PCLDefense, **params):
    """The registry's attack ``name`` ascending the per-sample joint loss CE + sum_l L_PC of
    ``defense``. Only attacks that use no argmax of their model's output (FGSM, BIM, MIM, PGD with
    one restart); judge the adversarials with ``defense.predict``."""
    return build_attack(name, JointLossScores(defense), loss=joint_objective(defense), **params)


def prototype_attack(name: str, defense: PCLDefense, **params):
    """The registry's attack ``name`` on eq. 6 (:class:`PrototypeScores`: minus the distances to
    the prototypes of the last supervised layer); judge with ``defense.predict(x, rule="prototype")``."""
    return build_attack(name, PrototypeScores(defense), **params)
