"""Model zoo: plain ``nn.Module`` classifiers, one registry.

>>> from advlab.models import build_model, list_models
>>> model = build_model("lenet5", num_classes=10, in_shape=(1, 28, 28))

Every zoo model maps images in [0, 1] to logits and carries a ``Normalize`` as its first layer.
Zoo models also expose ``head_name`` (the final linear layer) and ``hidden_layers`` (the
post-activation outputs of the hidden fully connected layers, for I-defender) and, where the
papers need them, ``feature_layers`` (PCL's feature points).
"""

from .zoo import build_model, list_models, model_info, count_parameters, MODELS

__all__ = ["build_model", "list_models", "model_info", "count_parameters", "MODELS"]
