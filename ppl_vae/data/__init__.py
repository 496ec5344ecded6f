"""Data sets: loaded by name or path (:mod:`.datasets`: ``load_dataset``); the :class:`Dataset`
type and its seeded splits (:mod:`.splits`); the named sets (:mod:`.mnist`: MNIST and its
variants, static binarized MNIST; :mod:`.small`: Frey Faces, the digits, circles) and users' own
files and arrays (:mod:`.own_data`); binarization, dequantization and the checks against a
likelihood (:mod:`.prepare`); the readers of the files they come in and their downloads
(:mod:`.readers`, :mod:`.images`); the generated circles (:mod:`.circles`).

May import: ``core``.
"""

from .datasets import BINARIZE, DATASETS, Dataset, dataset_from_array, load_dataset  # noqa: F401
from .readers import resolve_data_dir  # noqa: F401
