"""What the commands and specs evaluate: a model from any source and the test images that fit it.

``advlab attack``, ``advlab evaluate`` and user specs (``model: {source: ...}``) open their model
here: :func:`open_model` is :func:`advlab.models.load_model_info`, one entry point for advlab
checkpoints, torch.export programs, TorchScript and ``module:factory`` + weights, and for saved
defenses once :mod:`advlab.defenses` is imported (it registers their formats; this module sits
below it, so the commands import it).
:func:`load_inputs` adds the data: a named dataset, a ``.npz``/``.npy`` file
(:func:`advlab.data.arrays.load_arrays`) or an image folder read with the model's channels and
size, then checks the model on the first images before any attack runs (:func:`fit_model`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

from .._util import AdvlabError, restore_train_modes, train_modes
from ..data import TensorImageDataset, load_dataset
from ..data.arrays import load_arrays
from ..data.folder import folder_image_shape
from .loading import LoadedModel, fit_model, load_model_info

__all__ = ["open_model", "load_inputs", "Inputs", "parse_options"]

#: the options of :func:`advlab.data.arrays.load_arrays` a command passes on (--dataset-option)
ARRAY_OPTIONS = {"layout", "x_key", "y_key", "scale"}


def open_model(source, weights=None, mean=None, std=None, num_classes: Optional[int] = None,
               device=None) -> LoadedModel:
    """:func:`advlab.models.load_model_info` (saved defenses too, once :mod:`advlab.defenses` is
    imported)."""
    return load_model_info(source, weights, mean=mean, std=std, num_classes=num_classes, device=device)


def parse_options(items: Optional[Sequence[str]], flag: str = "--dataset-option") -> Dict[str, Any]:
    """``["grayscale=true", "size=28,28"]`` -> ``{"grayscale": True, "size": (28, 28)}`` (values
    read as YAML scalars; ``size`` also as ``H,W`` or ``HxW``)."""
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, text = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise AdvlabError(f"{flag} must be KEY=VALUE (e.g. grayscale=true, size=28,28), got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        if key == "size" and isinstance(value, str):
            parts = value.lower().replace("x", ",").split(",")
            try:
                value = tuple(int(p) for p in parts)
            except ValueError:
                raise AdvlabError(f"{flag} size must be H,W or one integer, got {text!r}") from None
        elif key == "size" and isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


@dataclass
class Inputs:
    """A loaded, checked model and its test set."""

    loaded: LoadedModel
    test: TensorImageDataset
    #: the dataset's name (or the data file's / folder's name)
    dataset: str
    #: what was detected on the way (layout, scaling, resizing, unwrapping), for the log and report
    notes: List[str] = field(default_factory=list)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model


def _probe_channels(loaded: LoadedModel, c0: int, h: int, w: int) -> Optional[int]:
    """The channel count (c0 first, then the other of 1/3) the model takes at h x w, or None."""
    model = loaded.model
    dev = next((t.device for t in list(model.parameters()) + list(model.buffers())), torch.device("cpu"))
    for c in (c0, 4 - c0):
        try:
            modes = train_modes(model)
            model.eval()
            try:
                with torch.no_grad():
                    model(torch.zeros(1, c, h, w, device=dev))
            finally:
                restore_train_modes(modes)
            return c
        except Exception:  # noqa: BLE001 - the wrong shape, whatever the model raises
            continue
    return None


def _folder(loaded: LoadedModel, root, split: str, options: Dict[str, Any], notes: List[str]) -> TensorImageDataset:
    opts = dict(options)
    if "grayscale" not in opts or "size" not in opts:
        c0, h0, w0 = folder_image_shape(root)
        if loaded.input_shape is not None:
            c, h, w = loaded.input_shape
        else:
            h, w = opts.get("size") or (h0, w0)
            c = _probe_channels(loaded, c0, h, w) or c0
        if "grayscale" not in opts:
            opts["grayscale"] = c == 1
            if c != c0:
                notes.append(f"{Path(root).name}: {'colour' if c0 == 3 else 'grayscale'} images read as "
                             f"{'grayscale' if c == 1 else 'RGB'} for the model's {c} input channel(s)")
        if "size" not in opts and (h, w) != (h0, w0):
            opts["size"] = (h, w)
            notes.append(f"{Path(root).name}: images resized from {h0}x{w0} to {h}x{w} (the model's input)")
    return load_dataset("folder", root=root, split=split, **opts)


def load_inputs(source, weights=None, dataset: Optional[str] = None, root=None, data=None, labels=None,
                options: Optional[Dict[str, Any]] = None, mean=None, std=None, num_classes: Optional[int] = None,
                device=None, split: str = "test") -> Inputs:
    """The model (:func:`open_model`) and its test images: ``data`` (a ``.npz``/``.npy`` file with
    ``labels``, or an image folder, all of it), else ``dataset`` (default: the one the advlab
    checkpoint names; ``folder`` reads ``root`` with the model's channels and size), with the
    loader's ``options``. The model is checked on the first images and the labels against its
    classes before anything else runs."""
    options = dict(options or {})
    loaded = open_model(source, weights, mean=mean, std=std, num_classes=num_classes, device=device)
    notes: List[str] = []
    if data is not None:
        p = Path(data)
        if p.is_dir():
            test, name = _folder(loaded, p, "all", options, notes), p.name
        else:
            if labels is None and "labels" in options:
                labels = options.pop("labels")
            unknown = sorted(set(options) - ARRAY_OPTIONS)
            if unknown:
                raise AdvlabError(f"--dataset-option {unknown[0]} does not apply to a data file {p.name}; it takes: "
                                  f"{', '.join(sorted(ARRAY_OPTIONS | {'labels'}))}")
            channels = loaded.input_shape[0] if loaded.input_shape else None
            test, found = load_arrays(p, labels=labels, channels=channels, **options)
            notes += found
            name = p.name
    else:
        if labels is not None:
            raise AdvlabError("--labels goes with --data FILE.npy (the images)")
        dataset = dataset or loaded.metadata.get("dataset")
        if not dataset:
            raise AdvlabError("--dataset is required (the checkpoint does not name one); or pass --data FILE.npz, "
                              "FILE.npy with --labels, or an image folder")
        if dataset == "folder":
            test = _folder(loaded, root, split, options, notes)
        else:
            test = load_dataset(dataset, root=root, split=split, **options)
        name = dataset
    if len(test) == 0:
        raise AdvlabError(f"{name} holds no test images")
    fit_model(loaded, test.images[:2], where=f" from {name}")
    classes = loaded.num_classes - (1 if getattr(loaded.model, "reject_column", False) else 0)
    top = int(test.labels.max())
    if top >= classes or int(test.labels.min()) < 0:
        raise AdvlabError(f"labels of {name} go up to {top}, but the model {loaded.source} gives {classes} classes "
                          f"(labels must lie in [0, {classes - 1}])")
    return Inputs(loaded, test, name, loaded.notes + notes)
