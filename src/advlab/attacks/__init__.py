"""Attacks: ``atk = PGD(model, eps=0.3); x_adv = atk(x, y)``."""

from .base import Attack, AttackResult, project, runner_up
from .gradient import FGSM, BIM, MIM, PGD, IterativeL2

__all__ = ["Attack", "AttackResult", "project", "runner_up"]
__all__ += ["FGSM", "BIM", "MIM", "PGD", "IterativeL2"]
from .kanon import KA3, ka3_targets
__all__ += ["KA3", "ka3_targets"]
from .cw import CarliniWagnerL2
from .deepfool import DeepFool
from .lbfgs import LBFGS
from .jsma import JSMA
__all__ += ["CarliniWagnerL2", "DeepFool", "LBFGS", "JSMA"]
from .registry import ATTACKS, attack_class, build_attack
__all__ += ["ATTACKS", "attack_class", "build_attack"]
