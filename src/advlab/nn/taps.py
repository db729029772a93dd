"""Read intermediate activations of any ``nn.Module`` by layer name, with forward hooks."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Sequence

import torch
from torch import nn

from .._util import AdvlabError


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (as in ``model.named_modules()``), with a clear error."""
    modules = dict(model.named_modules())
    if name not in modules:
        valid = [n for n in modules if n]
        raise AdvlabError(f"model has no layer named {name!r}; layers: {', '.join(valid)}")
    return modules[name]


def last_linear_name(model: nn.Module) -> str:
    """Name of the last ``nn.Linear`` registered in ``model`` (the usual classification head)."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    if name is None:
        raise AdvlabError("model has no nn.Linear layer; name the head layer explicitly")
    return name


@contextlib.contextmanager
def taps(model: nn.Module, names: Sequence[str], inputs: bool = False, detach: bool = False
         ) -> Iterator[Dict[str, torch.Tensor]]:
    """Capture the outputs (or, with ``inputs=True``, the first positional inputs) of the named
    layers during forward passes inside the ``with`` block.

    >>> with taps(model, ["fc1", "fc2"]) as feats:
    ...     logits = model(x)
    >>> feats["fc1"].shape

    The dict holds the activations of the most recent forward pass. Gradients flow through them
    unless ``detach=True``.

    ``names``: layer names as in ``model.named_modules()`` (an unknown one is an error naming
    the valid ones).
    """
    if isinstance(names, str):
        names = [names]
    store: Dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(key: str):
        def hook(module, args, output):
            t = args[0] if inputs else output
            store[key] = t.detach() if detach else t
        return hook

    try:
        for n in names:
            handles.append(find_module(model, n).register_forward_hook(make_hook(n)))
        yield store
    finally:
        for h in handles:
            h.remove()
