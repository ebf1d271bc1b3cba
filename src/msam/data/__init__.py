"""Datasets for the mSAM experiments: loading, splitting, label noise, batching, augmentation.

Everything is held in memory (the benchmarks are small: Fashion-MNIST, an MNIST sample,
sklearn digits, CIFAR-10/100, Rotten Tomatoes reviews), so a dataset is a pair of tensors and
batching is deterministic indexing -- a resumed run reproduces the exact batches of an
uninterrupted one.  The noisy-label option reproduces the symmetric label-noise setting of
the SAM paper (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021), which mSAM (Behdin et al., 2023) builds on.

Main entry points: :func:`load_dataset`, :func:`iterate_batches`, :func:`random_crop_flip`,
:func:`add_symmetric_label_noise`.  See ``docs/data.md``.
"""

from .batching import iterate_batches, num_batches, random_crop_flip
from .containers import ArrayDataset, DatasetSplits
from .download import download_file, md5_of_file
from .errors import ChecksumError, DatasetNotFoundError, DownloadError
from .idx import read_idx, write_idx
from .loading import DATASETS, check_available, load_dataset
from .sources import (
    FASHION_MNIST_MD5,
    FASHION_MNIST_URL,
    TEST_SPLIT_SEED,
    download_fashion_mnist,
    find_fashion_mnist,
)
from .splits import add_symmetric_label_noise, group_split, stratified_split

__all__ = [
    "DATASETS",
    "FASHION_MNIST_MD5",
    "FASHION_MNIST_URL",
    "TEST_SPLIT_SEED",
    "ArrayDataset",
    "ChecksumError",
    "DatasetNotFoundError",
    "DatasetSplits",
    "DownloadError",
    "add_symmetric_label_noise",
    "check_available",
    "download_fashion_mnist",
    "download_file",
    "find_fashion_mnist",
    "group_split",
    "iterate_batches",
    "load_dataset",
    "md5_of_file",
    "num_batches",
    "random_crop_flip",
    "read_idx",
    "stratified_split",
    "write_idx",
]
