"""Attacks that know the defense: BPDA and EoT wrappers (and the automatic BPDA path), the
full-knowledge M-SVDD-D attack, the adaptive and gray-box I-defender attacks."""

from .bpda import BPDA, EoT, StraightThrough, auto_bpda, find_gradient_killers, straight_through
from .idefender import IDefenderAdaptive, IDefenderGrayBox
from .msvdd import MSVDDFullKnowledge

__all__ = ["BPDA", "EoT", "StraightThrough", "straight_through", "auto_bpda", "find_gradient_killers",
           "MSVDDFullKnowledge", "IDefenderAdaptive", "IDefenderGrayBox"]
