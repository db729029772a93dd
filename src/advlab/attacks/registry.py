"""The one attack registry: the names the CLI, the experiment specs and the benchmarks use.

>>> from advlab.attacks import ATTACKS, build_attack
>>> atk = build_attack("pgd", model, eps=0.3, steps=40)
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Tuple

from torch import nn

from .._util import AdvlabError, unknown_name
from .apgd import APGD
from .cw import CarliniWagnerL2
from .deepfool import DeepFool
from .fab import FAB
from .gradient import BIM, FGSM, MIM, PGD, IterativeL2
from .jsma import JSMA
from .kanon import KA3
from .lbfgs import LBFGS
from .square import Square

#: the attack classes the registry's names refer to (all exported by advlab.attacks)
_CLASSES = {cls.__name__: cls for cls in (FGSM, BIM, MIM, PGD, IterativeL2, CarliniWagnerL2, DeepFool, LBFGS, JSMA, KA3,
                                          APGD, Square, FAB)}

#: name -> (class name in advlab.attacks, fixed keyword arguments)
ATTACKS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "fgsm": ("FGSM", {}),
    "bim": ("BIM", {}),
    "mim": ("MIM", {}),
    "pgd": ("PGD", {"norm": "inf"}),
    "pgd-l2": ("PGD", {"norm": "2"}),
    "l2": ("IterativeL2", {}),
    "cw": ("CarliniWagnerL2", {}),
    "deepfool": ("DeepFool", {}),
    "lbfgs": ("LBFGS", {}),
    "jsma": ("JSMA", {}),
    "ka3": ("KA3", {}),
    "apgd": ("APGD", {"norm": "inf", "loss": "ce"}),
    "apgd-l2": ("APGD", {"norm": "2", "loss": "ce"}),
    "apgd-dlr": ("APGD", {"norm": "inf", "loss": "dlr"}),
    "apgd-t": ("APGD", {"norm": "inf", "loss": "dlr-targeted"}),
    "square": ("Square", {"norm": "inf"}),
    "square-l2": ("Square", {"norm": "2"}),
    "fab": ("FAB", {"norm": "inf"}),
    "fab-l2": ("FAB", {"norm": "2"}),
}


def attack_class(name: str) -> Tuple[type, Dict[str, Any]]:
    """(class, fixed keyword arguments) of the registered attack ``name`` (:data:`ATTACKS`), e.g.
    ``("PGD", {"norm": "2"})`` resolved to the class for ``"pgd-l2"``. Raises ``AdvlabError`` naming
    the valid names for an unknown one."""
    if name not in ATTACKS:
        raise unknown_name("attack", name, ATTACKS)
    cls_name, fixed = ATTACKS[name]
    return _CLASSES[cls_name], dict(fixed)


def attack_parameters(name: str) -> set:
    cls, _ = attack_class(name)
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")}


def build_attack(name: str, model: nn.Module, **params):
    """Build a registered attack with ``params`` (an explicit None is passed on: e.g. K-A3's
    ``similarity=None``); a parameter the attack does not take is an error naming the ones it
    does.

    ``name``: a key of :data:`ATTACKS` (an unknown one is an error naming the valid ones);
    ``model``: the ``nn.Module`` to attack; ``eps`` and the other budgets in pixel units of the [0, 1]
    scale. Returns the attack instance."""
    cls, kwargs = attack_class(name)
    accepted = attack_parameters(name)
    for k, v in params.items():
        if k not in accepted:
            raise AdvlabError(f"attack {name!r} does not take {k!r}; it takes: {', '.join(sorted(accepted))}")
        if k == "similarity" and str(v).lower() == "none":
            v = None
        kwargs[k] = v
    return cls(model, **kwargs)
