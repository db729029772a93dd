"""Datasets as tensors in [0, 1], NCHW.

>>> from advlab.data import load_dataset, list_datasets
>>> ds = load_dataset("digits", split="train")        # embedded, no download
>>> ds = load_dataset("mnist", root="data/mnist", split="test")
>>> ds.images.shape, ds.labels.dtype, ds.num_classes
"""

from .core import TensorImageDataset, load_dataset, list_datasets, DATASETS
from .idx import read_idx

__all__ = ["TensorImageDataset", "load_dataset", "list_datasets", "read_idx", "DATASETS"]
