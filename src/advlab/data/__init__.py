"""Datasets as tensors in [0, 1], NCHW.

>>> from advlab.data import load_dataset, list_datasets
>>> ds = load_dataset("digits", split="train")        # embedded, no download
>>> ds = load_dataset("mnist", root="data/mnist", split="test")
>>> ds = load_dataset("cifar10", root="data/cifar10", download=True)   # checked download
>>> ds = load_dataset("folder", root="my_images", size=(32, 32))       # root/<class>/*.png
>>> ds.images.shape, ds.labels.dtype, ds.num_classes

Names: digits, mnist, fashion-mnist, cifar10, svhn, folder. Files already in ``root`` are read
as they are; only downloads are checked against the official SHA-256/MD5.
"""

from .core import (DATASETS, TensorImageDataset, dataset_info, dataset_tensors, list_datasets, load_dataset,
                   register_dataset, shared_data_root, shared_folder, split_validation, load_train_test)
from .download import SOURCES, default_root, download_file, verify_file
from .idx import read_idx
from .prepare import download_dataset

__all__ = ["TensorImageDataset", "load_dataset", "list_datasets", "dataset_info", "register_dataset",
           "read_idx", "DATASETS", "SOURCES", "default_root", "download_dataset", "download_file",
           "verify_file", "dataset_tensors", "split_validation", "shared_data_root", "shared_folder", "load_train_test"]
