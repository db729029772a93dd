"""Attacks: ``atk = PGD(model, eps=0.3); x_adv = atk(x, y)``; by name: ``build_attack("pgd", model)``."""

from .apgd import APGD
from .base import Attack
from .geometry import project
from .logits import best_other, keep_if_adversarial, runner_up
from .result import AttackResult
from .cw import CarliniWagnerL2
from .deepfool import DeepFool
from .fab import FAB
from .gradient import BIM, FGSM, MIM, PGD, IterativeL2
from .jsma import JSMA
from .kanon import KA3, ka3_targets
from .lbfgs import LBFGS
from .registry import ATTACKS, attack_class, build_attack
from .square import Square

__all__ = ["Attack", "AttackResult", "project", "runner_up", "best_other", "keep_if_adversarial",
           "FGSM", "BIM", "MIM", "PGD", "IterativeL2", "KA3", "ka3_targets", "CarliniWagnerL2", "DeepFool", "LBFGS",
           "JSMA", "Square", "APGD", "FAB", "ATTACKS", "attack_class", "build_attack"]
