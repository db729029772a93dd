"""advlab.adaptive"""

from .msvdd import MSVDDFullKnowledge

__all__ = ["MSVDDFullKnowledge"]
