"""The Defense contract every advlab defense implements, and the one registry of defenses.

A defense is an ``nn.Module`` (so attacks, ``fit`` and devices work on it unchanged) with:

- ``forward(x)``: the differentiable scores an attacker should use by default, (N, C) or
  (N, C + 1) with a last "adversarial" column. Never a clamped or otherwise gradient-free
  quantity: a white-box attack on ``forward`` must see real gradients, or the number it gives
  is an illusion (advlab's masking checks look for exactly that);
- ``predict(x)``: class indices, or ``advlab.REJECT`` where the defense abstains;
- ``detect(x)`` (optional): a per-sample score, larger meaning "more likely adversarial";
- ``surrogate`` (optional): the undefended model an attacker without access to the defense
  would craft on (transfer threat model);
- ``randomized``: True when ``forward``/``predict`` draw random numbers at test time (the
  evaluation then averages gradients over draws, EoT);
- ``claimed_threat``: the threat model its paper measured it under ("white-box", "transfer",
  "black-box"), which ``advlab compare`` reports beside the adaptive attacker;
- ``fit(model, dataset, ...)`` (classmethod): build the defense from a trained model;
- ``save(path)`` / ``load(path)``: through the one weights-only checkpoint path of
  :mod:`advlab.train` (``weights_only=True``; loading never executes code from the file).

>>> from advlab.defenses import DEFENSES, build_defense
>>> DEFENSES["msvdd"].description
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from .._util import (AdvlabError, check_device, check_images, check_positive_int, model_device,
                     restore_train_modes, train_modes, unknown_name)
from ..models.loading import register_format


class Defense(nn.Module):
    """Base class of the defenses (see the module docstring for the contract)."""

    #: registry name and checkpoint format tag, set by subclasses
    name: str = ""
    format: str = ""
    #: the name used in messages and reports
    title: str = ""
    #: True when the defense draws random numbers at test time
    randomized: bool = False
    #: the threat model the defense's own paper measured it under (``advlab compare``'s "claimed"
    #: column, beside the adaptive attacker): "white-box" (attacks on ``forward``), "transfer"
    #: (crafted on ``surrogate``) or "black-box" (crafted on a substitute trained on the
    #: surrogate's labels, Papernot et al. 2017)
    claimed_threat: str = "white-box"
    #: True when ``forward``'s last column is the "adversarial" class (``predict`` then returns
    #: ``advlab.REJECT`` for it); attacks then aim at "accepted as a wrong class"
    reject_column: bool = False
    # ``surrogate`` (the undefended model an attacker without access to the defense would use) is
    # a submodule set by the defenses that have one: no class attribute here, since it would
    # shadow nn.Module's submodule lookup; read it with ``getattr(defense, "surrogate", None)``

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The differentiable scores an attacker should use by default: (N, C) logits, or (N, C + 1) with a
        last "adversarial" column, for images (N, C, H, W) in [0, 1]. Subclasses must implement it with
        real gradients (never a clamped or gradient-free quantity)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Class indices or ``advlab.REJECT``; by default the argmax of :meth:`forward`."""
        return self._batched(lambda xb: self(xb).argmax(1), x, batch_size)

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample detection score (larger: more likely adversarial). Defenses without a
        detector do not override this."""
        raise AdvlabError(f"{type(self).__name__} has no detector (detect)")

    @property
    def has_detector(self) -> bool:
        """True when the subclass overrides :meth:`detect` (it has a per-sample detection score)."""
        return type(self).detect is not Defense.detect

    def _batched(self, fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        check_images(x, "x")
        batch_size = check_positive_int(batch_size, "batch_size")
        dev = model_device(self)
        was = train_modes(self)
        self.eval()
        try:
            out = [fn(x[i: i + batch_size].to(dev)) for i in range(0, x.shape[0], batch_size)]
        finally:
            restore_train_modes(was)
        return torch.cat(out).to(x.device) if out else torch.empty(0, dtype=torch.long, device=x.device)

    # ------------------------------------------------------------------ persistence
    def config(self) -> Dict[str, Any]:
        """Constructor settings stored with the weights, enough to rebuild the module."""
        return {}

    @classmethod
    def from_config(cls, model: nn.Module, config: Dict[str, Any]) -> "Defense":
        """Rebuild the defense around ``model`` from the settings :meth:`config` returned; the weights are
        loaded afterwards (:meth:`load`). Subclasses whose constructor differs from their config override it."""
        return cls(model, **config)

    def to_state(self) -> Dict[str, Any]:
        """The defense as plain data (:meth:`config`, the weights, the training ``history`` if any):
        what :meth:`save` writes, in memory; :meth:`from_state` rebuilds it on a fresh model."""
        return {"config": self.config(), "state_dict": self.state_dict(),
                "history": copy.deepcopy(getattr(self, "history", None))}

    @classmethod
    def from_state(cls, model: nn.Module, state: Dict[str, Any]) -> "Defense":
        """Rebuild a defense from :meth:`to_state` on ``model`` (an instance of the architecture it
        was fitted on; its weights are replaced by the stored ones)."""
        defense = cls.from_config(model, state.get("config") or {})
        defense.load_state_dict(state["state_dict"])
        if state.get("history") is not None:
            defense.history = state["history"]
        return defense.eval()

    def save(self, path, **metadata) -> Path:
        """Write the defense (weights and :meth:`config`) atomically through the one checkpoint path."""
        from ..train import write_checkpoint

        meta = {"defense": self.name, "config": self.config(),
                "model": copy.deepcopy(getattr(self, "model_spec", None))}
        meta.update(metadata)
        return write_checkpoint(path, self.state_dict(), meta, format=self.format)

    @classmethod
    def load(cls, path, model: Optional[nn.Module] = None, device=None) -> "Defense":
        """Rebuild a saved defense. A zoo model is rebuilt from the file's spec; for another
        architecture pass an (untrained) instance as ``model``. Never executes code from the file."""
        from ..train import build_from_spec, read_checkpoint

        obj = read_checkpoint(path, format=cls.format, what=f"{cls.title or cls.name or cls.__name__} defense")
        meta = obj["metadata"]
        if not isinstance(meta.get("config") or {}, dict):
            raise AdvlabError(f"defense file {path} is corrupt: its config is a {type(meta['config']).__name__}, "
                              "not a mapping")
        if model is None:
            model = build_from_spec(meta.get("model"), path)
        try:
            defense = cls.from_config(model, meta.get("config") or {})
            defense.load_state_dict(obj["state_dict"])
        except (KeyError, TypeError, RuntimeError, AdvlabError) as e:
            raise AdvlabError(f"defense file {path} does not fit the model: {str(e).splitlines()[0]}") from None
        defense.metadata = meta
        if device is not None:
            defense.to(check_device(device))
        return defense.eval()


@dataclass
class DefenseEntry:
    cls: type
    description: str


#: name -> defense class and description; the CLI (``advlab defend NAME``) and specs use it
DEFENSES: Dict[str, DefenseEntry] = {}


def register_defense(name: str, description: str):
    """Class decorator adding a :class:`Defense` subclass to :data:`DEFENSES` under ``name``, with the
    one-line ``description`` the CLI shows; sets ``cls.name``. A class with a ``format`` tag also
    becomes loadable by :func:`advlab.models.load_model` (its :meth:`Defense.load`). Raises
    ``TypeError`` for a class that is not a :class:`Defense`; a registered name is replaced."""
    def deco(cls):
        if not issubclass(cls, Defense):
            raise TypeError(f"{cls.__name__} must subclass advlab.defenses.Defense")
        cls.name = name
        DEFENSES[name] = DefenseEntry(cls, description)
        if cls.format:  # saved defenses open through the one model loader (advlab.models.load_model)
            register_format(cls.format, cls.load)
        return cls
    return deco


def defense_class(name: str) -> type:
    """The :class:`Defense` subclass registered as ``name`` in :data:`DEFENSES`.

    Raises ``AdvlabError`` naming the valid names when ``name`` is not registered."""
    if name not in DEFENSES:
        raise unknown_name("defense", name, DEFENSES)
    return DEFENSES[name].cls


def build_defense(name: str, model: nn.Module, dataset, **params) -> Defense:
    """Fit the defense ``name`` on a trained ``model`` and its training ``dataset`` (images in [0, 1]):
    ``DEFENSES[name].cls.fit(model, dataset, **params)``. Returns the fitted :class:`Defense`; raises
    ``AdvlabError`` naming the valid names for an unknown ``name``."""
    return defense_class(name).fit(model, dataset, **params)
