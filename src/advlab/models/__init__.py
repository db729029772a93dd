"""Model zoo: plain ``nn.Module`` classifiers, one registry; and the one model loader.

>>> from advlab.models import build_model, list_models, load_model
>>> model = build_model("lenet5", num_classes=10, in_shape=(1, 28, 28))
>>> model = load_model("model.pt2")            # or TorchScript, an advlab checkpoint, "pkg.mod:factory"

Every zoo model maps images in [0, 1] to logits and carries a ``Normalize`` as its first layer.
Zoo models also expose ``head_name`` (the final linear layer) and ``hidden_layers`` (the
post-activation outputs of the hidden fully connected layers, for I-defender) and, where the
papers need them, ``feature_layers`` (PCL's feature points). :func:`load_model` reads every
safe format (:mod:`advlab.models.loading`); it never unpickles code.
"""

from .zoo import build_model, list_models, model_info, count_parameters, MODELS
from .loading import (LoadedModel, fit_model, load_model, load_model_info, read_safetensors, read_weights,
                      register_format, sniff_format)

__all__ = ["build_model", "list_models", "model_info", "count_parameters", "MODELS", "load_model",
           "load_model_info", "LoadedModel", "fit_model", "read_weights", "read_safetensors", "register_format",
           "sniff_format"]
