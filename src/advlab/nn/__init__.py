"""Small shared building blocks: Normalize, feature taps by layer name."""

from .normalize import Normalize
from .taps import taps, find_module, last_linear_name
from .svdd import SVDDLayer

__all__ = ["Normalize", "taps", "find_module", "last_linear_name", "SVDDLayer"]
