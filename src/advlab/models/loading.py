"""One model loader for every command, spec and the Python API: :func:`load_model`.

>>> from advlab.models import load_model
>>> model = load_model("model.pt2")                                   # torch.export program
>>> model = load_model("model.ts")                                    # TorchScript archive
>>> model = load_model("my_models:lenet", weights="lenet.safetensors")  # your code + weights
>>> model = load_model("lenet.pt")                                    # an advlab checkpoint
>>> model = load_model("resnet.pt2", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])

The format is told from the file's content (zip members, the safetensors header), never only
from its suffix. Nothing from the file runs as Python:

- advlab checkpoints (:func:`advlab.train.save_checkpoint`) and other advlab files whose format
  tag a higher layer registered (:func:`register_format`: :mod:`advlab.defenses` registers the
  saved defenses when it is imported) are read with ``torch.load(..., weights_only=True)``;
- a **torch.export** program (``torch.export.save``) is vetted before ``torch.export.load`` sees
  it: that loader unpickles some members without ``weights_only`` (its sample inputs, pickled
  weights, opaque constants), so every member that is not a JSON document or a raw tensor payload
  must load weights-only, and compiled (AOTInductor) code is refused;
- a **TorchScript** archive (``torch.jit.save``) is read by TorchScript's own loader, whose code
  is TorchScript, not Python;
- ``"package.module:factory"`` imports *your* module (from the working directory or
  ``sys.path``) and calls ``factory()``; its ``weights`` are a state dict read weights-only, or a
  ``.safetensors`` file (read here: a JSON header and raw little-endian buffers);
- a plain pickle (``torch.save(model)``) is refused with the three safe ways to save a model.

Then the model is fitted to what the attacks expect: ``mean``/``std`` wrap it in advlab's
:class:`~advlab.nn.Normalize` (attacks stay in [0, 1] pixel space); a model returning a tuple, a
dict with ``"logits"`` or an object with ``.logits`` (Hugging Face style) is unwrapped, and
``num_classes`` is checked against the output (:func:`fit_model`, run as soon as the input shape
is known).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .._util import AdvlabError, check_device, check_positive_int, restore_train_modes, train_modes
from ..nn import Normalize

__all__ = ["load_model", "load_model_info", "LoadedModel", "fit_model", "read_weights", "read_safetensors",
           "sniff_format", "register_format", "read_checkpoint", "build_from_spec", "CHECKPOINT_FORMAT",
           "SAFE_FORMATS"]

#: the format tag of :func:`advlab.train.save_checkpoint`'s files
CHECKPOINT_FORMAT = "advlab-checkpoint-1"

#: the three safe ways to save a model, with the one-liner for each
SAFE_FORMATS = ("torch.export: torch.export.save(torch.export.export(model.eval(), (x,)), 'model.pt2'); "
                "TorchScript: torch.jit.trace(model.eval(), x).save('model.ts'); "
                "your code + weights: torch.save(model.state_dict(), 'weights.pt'), then "
                "--model your_module:factory --weights weights.pt")

#: advlab format tag -> loader(path, device) -> nn.Module, for the advlab files the layers above
#: models write (saved defenses); see :func:`register_format`
FORMATS: Dict[str, Callable[..., nn.Module]] = {}

_FACTORY = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


def register_format(tag: str, loader: Callable[..., nn.Module]) -> None:
    """Let :func:`load_model` open advlab files tagged ``tag`` with ``loader(path, device=None)``
    (how :mod:`advlab.defenses`, above this layer, makes saved defenses loadable here)."""
    FORMATS[tag] = loader


# --------------------------------------------------------------------------- reading files safely

def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _quiet():
    """Silence torch's warnings and log records while a foreign file is opened (the TorchScript
    weights_only warning, torch.export's fallback warnings): errors become one AdvlabError line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(previous)


def _plain_pickle(path, what: str = "model file") -> AdvlabError:
    return AdvlabError(f"{path} is a plain pickle (e.g. torch.save(model)); loading it would run code from the "
                       f"file, which advlab never does. Save the model in a safe format instead: {SAFE_FORMATS}")


def _well_formed_pickle(path) -> bool:
    """Whether the pickle stream of a file that ``torch.load(weights_only=True)`` refused is
    well formed (its opcodes parse up to a STOP; ``pickletools.genops`` reads them and runs
    nothing): the main ``data.pkl`` member of a zip, else the file's first pickle. A well-formed
    stream that torch refused holds objects whose loading would run code (a plain pickle); one
    that does not parse is a corrupt file, even where its first byte looks like a pickle's."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                if member is None:
                    return False
                data = z.read(member)
        else:
            data = Path(path).read_bytes()
        ops = [op.name for op, _, _ in pickletools.genops(data)]
    except Exception:  # noqa: BLE001 - any parse error: not a pickle stream
        return False
    return len(ops) > 2 and ops[-1] == "STOP"


def _torch_load(path, what: str):
    """``torch.load(path, weights_only=True)``, torch's warnings silenced and its errors as one
    AdvlabError line: a well-formed pickle that the weights-only unpickler refused is named a plain
    pickle (with the safe formats); anything else that fails (a truncated archive, junk whose first
    byte looks like a pickle's) is corrupt."""
    with _quiet():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - corrupt zip, truncated file, refused global
            refused = isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower()
            if refused and _well_formed_pickle(path):
                raise _plain_pickle(path, what) from None
            raise AdvlabError(f"cannot read {what} {path}: corrupt or not a model file ({type(e).__name__}: "
                              f"{_first_line(e)})") from None


def sniff_format(path) -> str:
    """What a file holds, told from its bytes: ``"torch.export"``, ``"torchscript"``,
    ``"torch.save"`` (a zip pickle: state dict, advlab checkpoint or plain pickle),
    ``"pickle"`` (a legacy, non-zip pickle), ``"safetensors"``, ``"zip"`` (another zip archive)
    or ``"unknown"``.

    ``path``: the file (read, never loaded)."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "unknown"
        rel = {n.split("/", 1)[1] if "/" in n else n for n in names}
        if "archive_format" in rel or any(r.startswith("models/") and r.endswith(".json") for r in rel) \
                or "serialized_exported_program.json" in rel:
            return "torch.export"
        if "constants.pkl" in rel or any(r.startswith("code/") for r in rel):
            return "torchscript"
        if "data.pkl" in rel:
            return "torch.save"
        return "zip"
    if len(head) >= 10 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 1 << 28:
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path) -> Dict[str, torch.Tensor]:
    """A ``.safetensors`` file as a dict of CPU tensors (the format: an 8-byte little-endian
    header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, raw little-endian
    buffers). Pure data: nothing in it can run.

    ``path``: the file. Raises ``AdvlabError`` on a corrupt header or buffer."""
    data = Path(path).read_bytes()
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 + n:
            raise ValueError(f"header of {n} bytes in a file of {len(data)}")
        header = json.loads(data[8: 8 + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        buf = memoryview(data)[8 + n:]
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
            if dtype is None:
                raise ValueError(f"tensor {name!r} has an unsupported dtype {info!r:.80}")
            shape = [int(s) for s in info["shape"]]
            start, end = (int(v) for v in info["data_offsets"])
            numel = 1
            for s in shape:
                if s < 0:
                    raise ValueError(f"tensor {name!r} has a negative dimension")
                numel *= s
            size = numel * torch.empty(0, dtype=dtype).element_size()
            if not 0 <= start <= end <= len(buf) or end - start != size:
                raise ValueError(f"tensor {name!r}: data_offsets {[start, end]} do not hold {shape} {info['dtype']}")
            t = torch.frombuffer(bytearray(buf[start:end]), dtype=dtype) if size else torch.empty(0, dtype=dtype)
            if sys.byteorder == "big" and t.element_size() > 1:  # pragma: no cover - big-endian hosts
                t = torch.from_numpy(t.numpy().byteswap())
            out[name] = t.reshape(shape)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RuntimeError) as e:
        raise AdvlabError(f"cannot read safetensors file {path}: corrupt ({_first_line(e)})") from None
    return out


def _tensor_dict(obj) -> Optional[Dict[str, torch.Tensor]]:
    """A name -> tensor mapping, also one nested under state_dict/model/model_state_dict/weights
    (the common ways training scripts save one), else None."""
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "weights"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                         for k, v in inner.items()):
                return dict(inner)
    return None


def read_weights(path, what: str = "weights file") -> Dict[str, torch.Tensor]:
    """The state dict in ``path``: a ``.safetensors`` file, or a ``torch.save``'d state dict (also
    an advlab checkpoint, or one nested under ``state_dict``/``model``) read weights-only.

    ``what``: how the file is named in errors. Raises ``AdvlabError`` for a missing file, a model
    archive (torch.export, TorchScript) or a file that does not load weights-only."""
    path = Path(path)
    if not path.is_file():
        raise AdvlabError(f"{what} not found: {path}")
    fmt = sniff_format(path)
    if fmt == "safetensors":
        return read_safetensors(path)
    if fmt in ("torch.export", "torchscript"):
        raise AdvlabError(f"{what} {path} is a {'torch.export program' if fmt == 'torch.export' else 'TorchScript archive'}"
                          f", which holds the whole model: pass it as the model (--model {path}) without --weights")
    if fmt not in ("torch.save", "pickle"):
        raise AdvlabError(f"cannot read {what} {path}: corrupt or not a weights file (expected a state dict saved with "
                          "torch.save(model.state_dict(), ...) or a .safetensors file)")
    obj = _torch_load(path, what)
    sd = _tensor_dict(obj)
    if sd is None:
        raise AdvlabError(f"{what} {path} holds a {type(obj).__name__}, not a state dict (parameter names mapped to "
                          "tensors; save one with torch.save(model.state_dict(), path))")
    return sd


def read_checkpoint(path, format: Optional[str] = None, what: str = "checkpoint") -> dict:
    """Load an advlab checkpoint file safely (``weights_only=True``: loading never executes code
    from the file) and check its layout, and its ``format`` tag when given."""
    path = Path(path)
    if not path.is_file():
        raise AdvlabError(f"{what} not found: {path}")
    return _check_checkpoint(_torch_load(path, what), path, format, what)


def _check_checkpoint(obj, path, format: Optional[str], what: str) -> dict:
    if not isinstance(obj, dict) or "state_dict" not in obj or "metadata" not in obj:
        raise AdvlabError(f"{path} is not an advlab {what} (no state_dict/metadata)")
    if not isinstance(obj["metadata"], dict):
        raise AdvlabError(f"{path} is not an advlab {what}: its metadata is a {type(obj['metadata']).__name__}, "
                          "not a mapping")
    sd = obj["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise AdvlabError(f"{path} is not an advlab {what}: its state_dict must map parameter names to tensors")
    if format is not None and obj.get("format") != format:
        raise AdvlabError(f"{path} is not an advlab {what} file (format {format!r} expected, found "
                          f"{obj.get('format')!r})")
    return obj


def build_from_spec(spec: Optional[Dict], path) -> nn.Module:
    """Rebuild a zoo model from the spec stored in a checkpoint's metadata."""
    if not spec:
        raise AdvlabError(f"{path} has no model spec (not a zoo model); pass model= (an untrained instance of the "
                          "architecture) to fill")
    from .zoo import build_model

    if not isinstance(spec, dict) or not {"name", "num_classes", "in_shape"} <= set(spec) \
            or not isinstance(spec.get("kwargs", {}), dict):
        raise AdvlabError(f"{path}: the model spec in its metadata must be a mapping with name, num_classes and "
                          f"in_shape (and optional kwargs), got {spec!r:.200}")
    return build_model(spec["name"], spec["num_classes"], spec["in_shape"], spec.get("mean"), spec.get("std"),
                       **spec.get("kwargs", {}))


# --------------------------------------------------------------------------- adapters

class ExportedProgram(nn.Module):
    """A ``torch.export`` program as an ordinary module: ``train()``/``eval()`` only set the flag
    (the graph is frozen in the mode it was exported in, and refuses both), and a program exported
    with a fixed batch size runs in chunks of that size (the last one padded)."""

    def __init__(self, program: nn.Module, batch: Optional[int] = None):
        super().__init__()
        self.program = program
        self.batch = batch
        #: how the logits were found in the program's output (None: it returns them)
        self.unwrapped: Optional[str] = None

    def train(self, mode: bool = True) -> "ExportedProgram":
        self.training = mode
        return self

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        logits, how = _logits(self.program(x))
        self.unwrapped = how
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.batch
        if b is None or x.shape[0] == b:
            return self._run(x)
        outs = []
        for i in range(0, x.shape[0], b):
            chunk = x[i: i + b]
            k = chunk.shape[0]
            if k < b:
                chunk = torch.cat([chunk, chunk[-1:].expand(b - k, *chunk.shape[1:])])
            outs.append(self._run(chunk)[:k])
        return torch.cat(outs)


def _logits(out) -> Tuple[Any, Optional[str]]:
    """``(logits, how)``: the output itself (how None), or the tensor inside a tuple/list, a dict's
    ``"logits"`` or an object's ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out, None
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits, "its output's .logits"
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"], "its output's 'logits' entry"
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], f"the first element of its output {type(out).__name__}"
    return out, None


class Logits(nn.Module):
    """Unwraps a model's output to its logits (first tuple element, ``.logits``, ``["logits"]``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.model(x))[0]


# --------------------------------------------------------------------------- the loader

@dataclass
class LoadedModel:
    """What :func:`load_model_info` loaded: the ``model`` (in eval mode) and how: its ``format``, the
    ``source`` and ``weights`` paths, the advlab file's ``metadata``, the loader's ``notes``
    (unwrapping, normalisation), the ``input_shape`` (C, H, W) and ``num_classes`` when known."""

    model: nn.Module
    #: "advlab checkpoint", "advlab <tag>", "torch.export", "TorchScript" or "factory"
    format: str
    source: str
    weights: Optional[str] = None
    #: the advlab file's metadata (dataset, accuracy...); empty for foreign formats
    metadata: Dict[str, Any] = field(default_factory=dict)
    #: what the loader did to fit the model (unwrapping, normalisation, chunking), for the log and report
    notes: List[str] = field(default_factory=list)
    #: (C, H, W) when the file says (torch.export programs, zoo checkpoints), else None
    input_shape: Optional[Tuple[int, ...]] = None
    num_classes: Optional[int] = None
    fitted: bool = False

    def describe(self) -> str:
        """One line for logs and reports: the format, the source and the weights file if any."""
        w = f" with weights {self.weights}" if self.weights else ""
        return f"{self.format} {self.source}{w}"

    def to_dict(self) -> Dict[str, Any]:
        """The loading record as plain JSON-ready data (source, format, weights, notes, input shape,
        number of classes, checkpoint metadata without the training history)."""
        return {"source": self.source, "format": self.format, "weights": self.weights, "notes": list(self.notes),
                "input_shape": list(self.input_shape) if self.input_shape else None,
                "num_classes": self.num_classes,
                "metadata": {k: v for k, v in self.metadata.items() if k != "history"}}


def _channels(values, name: str) -> List[float]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return [float(values)]
    if isinstance(values, str):
        try:
            return [float(v) for v in values.replace(" ", "").split(",") if v]
        except ValueError:
            raise AdvlabError(f"{name} must be numbers separated by commas (one per channel), got {values!r}") from None
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise AdvlabError(f"{name} must be a number or one number per channel, got {values!r}") from None


def load_model(source, weights=None, mean=None, std=None, num_classes: Optional[int] = None,
               input_shape=None, device=None) -> nn.Module:
    """Load a classifier from ``source`` (see the module docstring) and fit it for attacks: the
    model, in eval mode. :func:`load_model_info` gives the same with how it was loaded.

    The parameters are :func:`load_model_info`'s (``weights``, ``mean``/``std``, ``num_classes``,
    ``input_shape``; ``device``: where the model goes, default the CPU). Never
    unpickles code: a plain ``torch.save(model)`` is refused with ``AdvlabError``."""
    return load_model_info(source, weights, mean=mean, std=std, num_classes=num_classes, input_shape=input_shape,
                           device=device).model


def load_model_info(source, weights=None, mean=None, std=None, num_classes: Optional[int] = None,
                    input_shape=None, device=None) -> LoadedModel:
    """:func:`load_model`, returning a :class:`LoadedModel` (model, format, metadata, notes).

    ``source``: a file (advlab checkpoint or saved defense, torch.export ``.pt2``, TorchScript) or
    ``"package.module:factory"``; ``weights``: the factory's state dict (weights-only ``torch.save``
    or ``.safetensors``); ``mean``/``std``: per-channel values of the normalisation the model
    expects (it is wrapped in :class:`advlab.nn.Normalize`); ``num_classes``: checked against the
    output; ``input_shape``: (C, H, W) to check the model on now (else it is checked as soon as
    the file says its input shape, or by :func:`fit_model` on the data).

    ``device``: where the model goes (default: the CPU). Raises ``AdvlabError`` on a missing,
    corrupt or refused file, or a model that does not fit the checks."""
    if num_classes is not None:
        num_classes = check_positive_int(num_classes, "num_classes", 2)
    dev = check_device(device, "device") if device is not None else None
    if (mean is None) != (std is None):
        raise AdvlabError("mean and std go together: pass both (one value per channel, or one for all)")
    text = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(text, str) or not text:
        raise AdvlabError(f"model source must be a file path or 'package.module:factory', got {source!r}")
    path = Path(text)
    if path.is_file():
        if weights is not None:
            fmt = sniff_format(path)
            if fmt in ("torch.export", "torchscript", "torch.save", "pickle"):
                raise AdvlabError(f"weights {weights} go with a factory source (--model package.module:factory); "
                                  f"the model file {path} brings its own")
        loaded = _load_file(path, dev)
    elif _FACTORY.fullmatch(text):
        loaded = _load_factory(text, weights)
    elif path.is_dir():
        raise AdvlabError(f"checkpoint not found: {path} is a folder; --model takes a model file (advlab checkpoint, "
                          "torch.export .pt2, TorchScript) or package.module:factory")
    else:
        raise AdvlabError(f"checkpoint not found: {path} (--model takes a model file: advlab checkpoint, torch.export "
                          ".pt2, TorchScript; or package.module:factory)")
    if mean is not None:
        if loaded.format.startswith("advlab"):
            raise AdvlabError(f"mean/std: {path} is an advlab model, which normalises its input itself (its Normalize "
                              "layer); drop --mean/--std")
        m, s = _channels(mean, "mean"), _channels(std, "std")
        loaded.model = nn.Sequential(OrderedDict(normalize=Normalize(m, s), model=loaded.model))
        loaded.notes.append(f"inputs normalised inside the model: mean {m}, std {s} (attacks stay in [0, 1] pixels)")
    loaded.num_classes = num_classes
    if dev is not None:
        loaded.model.to(dev)
    loaded.model.eval()
    shape = tuple(input_shape) if input_shape is not None else loaded.input_shape
    if shape is not None:
        if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
            raise AdvlabError(f"input_shape must be (C, H, W) with positive integers, got {input_shape!r}")
        fit_model(loaded, torch.zeros(2, *shape))
    return loaded


def _load_file(path: Path, dev) -> LoadedModel:
    fmt = sniff_format(path)
    if fmt == "torch.export":
        return _load_export(path, dev)
    if fmt == "torchscript":
        with _quiet():
            try:
                model = torch.jit.load(str(path), map_location=dev or "cpu")
            except Exception as e:  # noqa: BLE001
                raise AdvlabError(f"cannot read TorchScript archive {path}: corrupt ({type(e).__name__}: "
                                  f"{_first_line(e)})") from None
        return LoadedModel(model, "TorchScript", str(path))
    if fmt == "safetensors":
        raise AdvlabError(f"{path} is a safetensors file: weights without the architecture; pass --model "
                          f"package.module:factory --weights {path}")
    if fmt not in ("torch.save", "pickle"):
        raise AdvlabError(f"cannot read checkpoint {path}: corrupt or not a model file (not an advlab checkpoint, "
                          f"torch.export program, TorchScript archive or state dict)")
    obj = _torch_load(path, "checkpoint")
    if isinstance(obj, dict) and isinstance(obj.get("format"), str) and "state_dict" in obj and "metadata" in obj:
        tag = obj["format"]
        obj = _check_checkpoint(obj, path, None, "checkpoint")
        meta = obj["metadata"]
        if tag == CHECKPOINT_FORMAT:
            model = build_from_spec(meta.get("model"), path)
            try:
                model.load_state_dict(obj["state_dict"])
            except RuntimeError as e:
                raise AdvlabError(f"checkpoint {path} does not fit the model: {_first_line(e)}") from None
            spec = meta.get("model") or {}
            shape = tuple(int(v) for v in spec["in_shape"]) if spec.get("in_shape") else None
            return LoadedModel(model.to(dev or "cpu"), "advlab checkpoint", str(path), metadata=meta, input_shape=shape)
        if tag in FORMATS:
            model = FORMATS[tag](path, device=dev)
            spec = meta.get("model") or {}
            shape = tuple(int(v) for v in spec["in_shape"]) if isinstance(spec, dict) and spec.get("in_shape") else None
            return LoadedModel(model, f"advlab {tag}", str(path), metadata=meta, input_shape=shape)
        raise AdvlabError(f"{path} is an advlab file of format {tag!r}, which this loader does not know (saved defenses "
                          "load once advlab.defenses is imported; the commands do that)")
    if _tensor_dict(obj) is not None:
        raise AdvlabError(f"{path} holds only weights (a state dict), not the architecture: pass --model "
                          f"package.module:factory --weights {path} (Python: load_model('package.module:factory', "
                          f"weights='{path}'))")
    raise AdvlabError(f"{path} is not an advlab checkpoint (no state_dict/metadata) and not a model: it holds a "
                      f"{type(obj).__name__}. Save the model in a safe format: {SAFE_FORMATS}")


def _vet_export(path: Path) -> None:
    """Refuse a torch.export archive unless every member torch.export.load would unpickle loads
    weights-only (that loader falls back to ``weights_only=False`` for sample inputs and unpickles
    pickled weights and opaque constants) and it holds no compiled code."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            raw = set()
            for info in infos:
                rel = info.filename.split("/", 1)[1] if "/" in info.filename else info.filename
                if rel.startswith("data/aotinductor/") or rel.endswith((".so", ".dll", ".dylib")):
                    raise AdvlabError(f"refusing torch.export archive {path}: it holds compiled code ({info.filename}); "
                                      "save the program with torch.export.save (no AOTInductor package)")
                if rel.endswith("_config.json") and rel.startswith(("data/weights/", "data/constants/")):
                    folder = rel.rsplit("/", 1)[0]
                    cfg = json.loads(z.read(info).decode("utf-8")).get("config", {})
                    for fqn, meta in cfg.items():
                        if not meta.get("use_pickle") and str(meta.get("path_name", "")).startswith(("weight_",
                                                                                                       "tensor_")):
                            raw.add(f"{folder}/{meta['path_name']}")
            for info in infos:
                rel = info.filename.split("/", 1)[1] if "/" in info.filename else info.filename
                if info.is_dir() or rel in raw or rel.endswith(".json") or rel.startswith((".data/", "extra/")) \
                        or rel in ("archive_format", "archive_version", "byteorder", "version", ".format_version",
                                   ".storage_alignment"):
                    continue
                try:
                    with _quiet():
                        torch.load(io.BytesIO(z.read(info)), map_location="cpu", weights_only=True)
                except Exception:  # noqa: BLE001
                    raise AdvlabError(f"refusing torch.export archive {path}: its member {info.filename} is a pickle "
                                      "that does not load weights-only (torch.export.load would run it); export the "
                                      "model again with torch.export.save") from None
    except (zipfile.BadZipFile, OSError, ValueError, AttributeError, KeyError, UnicodeDecodeError) as e:
        raise AdvlabError(f"cannot read torch.export archive {path}: corrupt ({_first_line(e)})") from None


def _load_export(path: Path, dev) -> LoadedModel:
    _vet_export(path)
    with _quiet():
        try:
            program = torch.export.load(str(path))
            module = program.module()
        except Exception as e:  # noqa: BLE001
            raise AdvlabError(f"cannot read torch.export program {path}: corrupt or from another torch version "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    shape, batch = None, None
    users = list(getattr(program.graph_signature, "user_inputs", ()))
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    if len(users) != 1:
        raise AdvlabError(f"torch.export program {path} takes {len(users)} inputs; advlab evaluates image "
                          "classifiers of one input (N, C, H, W)")
    val = placeholders[users[0]].meta.get("val") if users[0] in placeholders else None
    notes = []
    if val is not None and getattr(val, "dim", lambda: 0)() == 4:
        dims = list(val.shape)
        if all(isinstance(d, int) for d in dims[1:]):
            shape = tuple(int(d) for d in dims[1:])
        if isinstance(dims[0], int):
            batch = int(dims[0])
            notes.append(f"the program was exported with a fixed batch of {batch}: advlab runs it in chunks of "
                         f"{batch} (export with dynamic_shapes={{'x': {{0: torch.export.Dim('batch')}}}} to batch freely)")
    model = ExportedProgram(module, batch)
    if dev is not None:
        model.to(dev)
    return LoadedModel(model, "torch.export", str(path), notes=notes, input_shape=shape)


def import_object(spec: str, where: str) -> Any:
    """The object named by ``"package.module:attr.path"``, imported with the working directory
    importable (like ``python -m``); this runs the user's module, as their code needs. ``where``
    names the option in every error (``"--model x:f"``): no such module, the module raising on import,
    a missing attribute."""
    mod_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # like `python -m`: the working directory is importable
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise AdvlabError(f"cannot import {mod_name!r} ({where}): no such module in the working directory "
                              f"{cwd} or on sys.path") from None
        raise AdvlabError(f"importing {mod_name!r} ({where}) failed: {type(e).__name__}: {_first_line(e)}") \
            from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing
        raise AdvlabError(f"importing {mod_name!r} ({where}) failed: {type(e).__name__}: {_first_line(e)}") \
            from None
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AdvlabError(f"module {mod_name!r} has no {attr!r} ({where})")
        obj = getattr(obj, part)
    return obj


def _load_factory(spec: str, weights) -> LoadedModel:
    obj = import_object(spec, f"--model {spec}")
    if isinstance(obj, nn.Module):
        model = obj
    elif callable(obj):
        try:
            model = obj()
        except Exception as e:  # noqa: BLE001 - the user's factory
            raise AdvlabError(f"calling {spec}() raised {type(e).__name__}: {_first_line(e)}") from None
    else:
        raise AdvlabError(f"{spec} is a {type(obj).__name__}, not a callable returning a torch.nn.Module")
    if not isinstance(model, nn.Module):
        raise AdvlabError(f"{spec}() must return a torch.nn.Module, got {type(model).__name__}")
    notes = []
    if weights is not None:
        sd = read_weights(weights)
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # a shape mismatch: torch lists them on the lines after its heading
            lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [_first_line(e)]
            raise AdvlabError(f"weights {weights} do not fit {spec}(): {'; '.join(lines)[:400]}") from None
        if missing or unexpected:
            parts = ([f"missing {len(missing)} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"]
                     if missing else []) + ([f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])}"
                                             f"{', ...' if len(unexpected) > 3 else ''})"] if unexpected else [])
            raise AdvlabError(f"weights {weights} do not fit {spec}(): {'; '.join(parts)} parameter names")
    else:
        notes.append(f"no weights given: {spec}() keeps the parameters it builds")
    return LoadedModel(model, "factory", spec, weights=None if weights is None else str(weights), notes=notes)


def fit_model(loaded: LoadedModel, x: torch.Tensor, where: str = "") -> LoadedModel:
    """Check ``loaded.model`` on the sample images ``x`` (N, C, H, W) before any attack: it must
    take them and give (N, num_classes) logits (``num_classes`` as asked); a tuple or ``.logits``
    output is unwrapped (:class:`Logits`, said in ``notes``). Returns ``loaded``, updated.

    ``where``: text appended to the error message to say where the images came from."""
    model = loaded.model
    dev = next((t.device for t in list(model.parameters()) + list(model.buffers())), torch.device("cpu"))
    what = f"images of shape {tuple(x.shape[1:])}{where}"
    norm = getattr(model, "normalize", None)
    if isinstance(norm, Normalize) and norm.mean.numel() not in (1, x.shape[1]):
        raise AdvlabError(f"mean/std have {norm.mean.numel()} values but the {what} have {x.shape[1]} channel(s)")
    modes = train_modes(model)
    model.eval()
    try:
        with torch.no_grad(), _quiet():
            out = model(x.to(dev))
    except Exception as e:  # noqa: BLE001 - whatever the model raises on the wrong shape
        raise AdvlabError(f"{what} do not fit the model {loaded.source}: {type(e).__name__}: {_first_line(e)}") \
            from None
    finally:
        restore_train_modes(modes)
    logits, how = _logits(out)
    if how is not None and not isinstance(model, Logits):
        loaded.model = Logits(model)
        loaded.notes.append(f"the model's logits are {how}")
    for m in model.modules():
        if isinstance(m, ExportedProgram) and m.unwrapped and not any(m.unwrapped in n for n in loaded.notes):
            loaded.notes.append(f"the program's logits are {m.unwrapped}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        got = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise AdvlabError(f"the model {loaded.source} must give logits of shape (N, num_classes) for {what}, got {got}")
    nc = int(logits.shape[1])
    if loaded.num_classes is not None and nc != loaded.num_classes:
        raise AdvlabError(f"num_classes is {loaded.num_classes} but the model {loaded.source} gives {nc} scores per "
                          "image")
    loaded.num_classes = nc
    loaded.input_shape = tuple(int(v) for v in x.shape[1:])
    loaded.fitted = True
    return loaded
