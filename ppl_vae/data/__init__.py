"""Data sets: named ones (MNIST and its variants, static binarized MNIST, the digits, circles) and
users' own arrays, split, binarized and checked (:mod:`.datasets`); the readers of the files they
come in and their downloads (:mod:`.readers`); the generated circles (:mod:`.circles`).

May import: ``core``.
"""

from .datasets import BINARIZE, DATASETS, Dataset, dataset_from_array, load_dataset  # noqa: F401
from .readers import resolve_data_dir  # noqa: F401
