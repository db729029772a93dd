"""Attacks that know the defense: BPDA and EoT wrappers (and the automatic BPDA path), the
full-knowledge M-SVDD-D attack, the attacks on PCL's joint loss and eq. 6, the adaptive and
gray-box I-defender attacks, the decision scores of a defense that rejects (attack it through
``predict``) and the smoothed-table BPDA of element-wise layers, and black-box substitute
training (Papernot et al.'s Jacobian augmentation)."""

from .bpda import BPDA, EoT, StraightThrough, auto_bpda, find_gradient_killers, straight_through
from .decision import AcceptedScores, can_reject, lookup_approx
from .idefender import IDefenderAdaptive, IDefenderGrayBox
from .msvdd import MSVDDFullKnowledge
from .pcl import joint_loss_attack, prototype_attack
from .substitute import jacobian_substitute
from .aware import defense_aware_attacks

__all__ = ["BPDA", "EoT", "StraightThrough", "straight_through", "auto_bpda", "find_gradient_killers",
           "AcceptedScores", "can_reject", "lookup_approx",
           "MSVDDFullKnowledge", "joint_loss_attack", "prototype_attack", "IDefenderAdaptive", "IDefenderGrayBox",
           "jacobian_substitute", "defense_aware_attacks"]
