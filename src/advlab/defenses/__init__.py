"""advlab.defenses"""

from .msvdd import MSVDDDefense

__all__ = ["MSVDDDefense"]
