"""Defenses: each a :class:`Defense` (``forward`` scores for attackers, ``predict`` with
``advlab.REJECT``, optional ``detect`` and ``surrogate``, ``fit``, weights-only ``save``/``load``),
registered by name in :data:`DEFENSES`."""

from .base import DEFENSES, Defense, build_defense, defense_class, register_defense
from .advtrain import AdversarialBatches, adversarial_fit, madry_fit
from .idefender import IDefender
from .msvdd import MSVDDDefense
from .pcl import PCLDefense, PrototypeScores
from .vib import VIBDefense

__all__ = ["Defense", "DEFENSES", "register_defense", "defense_class", "build_defense", "MSVDDDefense", "PCLDefense",
           "PrototypeScores", "IDefender", "VIBDefense", "AdversarialBatches", "adversarial_fit", "madry_fit"]
