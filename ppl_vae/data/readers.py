"""Data files: where they live, how they are downloaded, and how each format is read.

Data directory: ``--data-dir``, else ``$PPL_VAE_DATA``, else ``$XDG_CACHE_HOME/ppl_vae``
(``~/.cache/ppl_vae``). Downloads go there, over https, each checked against its MD5 before it
is given its name. Readers: binarized MNIST's ``.amat`` text, MNIST's IDX, Frey Faces' ``.mat``, and a user's
``.npy``/``.npz`` (never unpickled; a header that declares more than the file holds is refused
before anything is allocated). Every malformed file is one :class:`~ppl_vae.core.errors.DataError` line.
The loaders (:mod:`.mnist`, :mod:`.small`, :mod:`.own_data`) turn what these return into datasets.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import socket
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError

BINARIZED_MNIST_URL = (
    "https://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{}.amat"
)
# MD5 of each .amat file as served (the same values are published with other loaders of it)
BINARIZED_MNIST_MD5 = {
    "train": "db28b1a6ae0fe70cbd3da91acf46e477",
    "valid": "bf37822a04e94123630de6a7dfd9c9ef",
    "test": "14e41ae11040adba6ab8cb291eda0dd8",
}


# MNIST (torchvision's MNIST/raw/ layout): MD5 of each *decompressed* IDX file, the content to check
# (a .gz made elsewhere differs in its bytes, not in what it holds); ../shared/data/README.md
MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# Frey Faces: S. Roweis' frey_rawface.mat (variable ff, 560 × 1965, one column per frame); the MD5
# is of the decoded array, (1965, 560) uint8 in C order: one row per frame of 28 × 20 pixels
FREY_FACES_URL = "https://cs.nyu.edu/~roweis/data/frey_rawface.mat"
FREY_FACES_MD5 = "687b39ec28b56c183474c235686975cf"
FREY_FACES_SHAPE = (1965, 28, 20)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir``, else ``$PPL_VAE_DATA``, else the per-user cache directory."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("PPL_VAE_DATA"):
        return Path(os.environ["PPL_VAE_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "ppl_vae"


@contextmanager
def _socket_timeout(seconds: float):
    """A stalled server fails a download after ``seconds`` instead of hanging (torchvision's
    ``download_url`` sets no timeout of its own)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


class DownloadFailed(OSError):
    """A download that did not complete, or whose MD5 did not match; the message says why."""


def download(url: str, dest: Path, md5: str | None, timeout: float = 30.0, check=None) -> None:
    """Fetch ``url`` into ``dest`` with torchvision's ``download_url``, checked against ``md5``
    (of the file) or by ``check(path)`` (of its content: raises :class:`DataError` when wrong).
    The download lands in ``dest.part`` and is renamed only once it passes, so a cut or
    corrupt download never looks like a local copy.

    :raises DownloadFailed: no connection, a cut transfer, or a wrong MD5 or content."""
    from torchvision.datasets.utils import download_url

    part = dest.with_name(dest.name + ".part")
    try:
        with _socket_timeout(timeout):
            download_url(url, str(dest.parent), filename=part.name, md5=md5)
        if check is not None:
            check(part)
    except DataError as e:
        part.unlink(missing_ok=True)
        raise DownloadFailed(f"its content is not the expected one: {e}") from e
    except (OSError, RuntimeError, http.client.HTTPException) as e:
        part.unlink(missing_ok=True)
        # torchvision reports a wrong checksum as RuntimeError("File not found or corrupted.")
        raise DownloadFailed("its MD5 check failed" if "corrupted" in str(e) else e.__class__.__name__) from e
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)


# --------------------------------------------------------------------------- readers


def read_amat(path: Path) -> torch.Tensor:
    """A binarized-MNIST ``.amat`` (or ``.amat.gz``) file: one image per line, 784 values
    ``0``/``1`` separated by spaces. Returns ``(N, 784)`` float32."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    try:
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 2 * 784)  # fixed-width fast path
        if not (rows[:, 1::2] <= 32).all():  # separators are spaces / newline
            raise ValueError
        arr = rows[:, 0::2] - ord("0")  # (N, 784)
    except ValueError:
        arr = np.loadtxt(raw.decode().splitlines(), dtype=np.float32, ndmin=2)
    if arr.ndim != 2 or arr.shape[1] != 784 or arr.shape[0] == 0 or not np.isin(arr, (0, 1)).all():
        raise DataError(f"{path} is not a binarized-MNIST .amat file (expected lines of 784 values 0/1)")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def read_idx(path: Path, md5: str | None = None) -> np.ndarray:
    """An IDX file (MNIST's format), optionally gzip-compressed, as a NumPy array; ``md5``: the
    expected MD5 of the decompressed bytes (a mismatch is one :class:`DataError` line)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # a cut or corrupt .gz
        raise DataError(
            f"cannot read {path} ({e.__class__.__name__}); the file is truncated or damaged"
        ) from None
    if md5 is not None and hashlib.md5(raw).hexdigest() != md5:
        raise DataError(
            f"{path}: its content's MD5 is {hashlib.md5(raw).hexdigest()}, not the original's {md5}; the file is "
            f"damaged or another data set: delete it (it is downloaded again when online) or replace it"
        )
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or len(raw) < 4 + 4 * raw[3]:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (MNIST's format)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if math.prod(shape) != len(raw) - (4 + 4 * ndim):
        raise DataError(
            f"{path}: its IDX header declares shape {shape} ({math.prod(shape):,} bytes) but "
            f"{len(raw) - (4 + 4 * ndim):,} bytes follow it; the file is truncated or damaged"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find(root: Path, names: list[str]) -> Path | None:
    """The first of ``root/name`` or ``root/name.gz`` that exists, for each name in turn."""
    for n in names:
        for cand in (root / n, root / (n + ".gz")):
            if cand.exists():
                return cand
    return None


# --------------------------------------------------------------------------- user arrays


def read_array_file(path: Path) -> np.ndarray:
    """The image array of :func:`read_arrays` (without its labels)."""
    return read_arrays(path)[0]


def read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The image array of a user's ``.npy`` / ``.npz`` and its labels (checked by the caller: values
    in [0, 1], shape ``(N, H, W)``, ``(N, C, H, W)``, ``(N, H, W, C)`` or ``(N, D)``). From a
    ``.npz``: the array named ``x``, ``images``, ``data`` or ``arr_0``, else its only numeric array
    with ≥ 2 dimensions; labels: its array named ``labels`` or ``y`` (None without one, and for a
    ``.npy``). Pickled objects are never loaded (``allow_pickle=False``); headers are checked
    against the file size first (:func:`check_array_headers`). Anything unreadable is one
    :class:`DataError` line."""
    unreadable = (ValueError, OSError, EOFError, zipfile.BadZipFile)
    try:
        check_array_headers(path)
        obj = np.load(path, allow_pickle=False)
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{path} is too large to load into memory") from None
    except unreadable as e:
        why = (
            "another format, or pickled Python objects, which ppl_vae never loads"
            if "pickle" in str(e).lower()
            else f"{e.__class__.__name__}: {str(e).splitlines()[0][:120] if str(e) else 'unreadable'}"
        )
        raise DataError(
            f"cannot read {path} as a NumPy .npy/.npz file of numbers ({why}); save the images "
            f"with numpy.save / numpy.savez"
        ) from None
    if not isinstance(obj, np.lib.npyio.NpzFile):
        return obj, None
    with obj:
        arrays = {}
        for k in obj.files:
            try:
                arrays[k] = obj[k]
            except unreadable:  # an object array or a damaged member: not usable
                pass
            except MemoryError:
                raise DataError(f"{path}: array {k!r} is too large to load into memory") from None
    labels = arrays.get("labels")  # class labels; a "y" only when it is one integer per image (else a
    if labels is None and "y" in arrays:  # regression target or one-hot array, ignored as before)
        y = arrays["y"]
        labels = y if y.ndim == 1 and y.dtype.kind in "iu" else None
    usable = [k for k, a in arrays.items() if a.ndim >= 2 and a.dtype.kind in "fiub"]
    pref = [k for k in ("x", "images", "data", "arr_0") if k in usable]
    if pref or len(usable) == 1:
        return arrays[(pref or usable)[0]], labels
    found = (
        f"several candidates ({', '.join(usable)}) and none named x or images"
        if usable
        else f"arrays: {', '.join(obj.files) or 'none'}"
    )
    raise DataError(
        f"{path} holds no usable image array ({found}); save one numeric array of shape (N, H, W) "
        f"or (N, D) named 'x' or 'images'"
    )


def _header_bytes(f, total: int, where: str) -> None:
    """Read the ``.npy`` header at ``f``'s position and refuse (:class:`DataError`) an array that
    needs more than the ``total`` bytes of its file (or zip member): a lying header would
    otherwise make NumPy allocate what it declares before reading a byte."""
    start = f.tell()
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):  # 3.0 (UTF-8 field names): no public reader; np.load checks it
        return
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    if dtype.hasobject:  # pickled objects: np.load(allow_pickle=False) refuses them
        return
    need, have = math.prod(shape) * dtype.itemsize, total - (f.tell() - start)
    if need > have:
        raise DataError(
            f"{where}: its header declares an array of shape {shape} and dtype {dtype} "
            f"({need:,} bytes) but only {max(have, 0):,} bytes follow it; the file is truncated or "
            f"damaged: save the images again with numpy.save / numpy.savez"
        )


def check_array_headers(path: Path) -> None:
    """Check the header of a ``.npy`` file, or of every ``.npy`` member of a ``.npz`` archive,
    against the bytes that hold it (see :func:`_header_bytes`). Unreadable files raise what NumPy
    or ``zipfile`` raise."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            _header_bytes(f, os.fstat(f.fileno()).st_size, str(path))
        return
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if info.filename.endswith(".npy"):
                with z.open(info) as f:
                    _header_bytes(f, info.file_size, f"{path} (array {info.filename[:-4]!r})")


# --------------------------------------------------------------------------- Frey Faces


def check_frey_faces(arr: np.ndarray, path: Path) -> np.ndarray:
    """``arr`` as the frames ``(1965, 28, 20)`` uint8, checked against :data:`FREY_FACES_MD5` (of
    the ``(1965, 560)`` C-order bytes); anything else is one :class:`DataError` line."""
    if arr.dtype != np.uint8 or arr.size != math.prod(FREY_FACES_SHAPE):
        raise DataError(
            f"{path} holds an array of shape {arr.shape} and dtype {arr.dtype}, not the Frey Faces "
            f"({FREY_FACES_SHAPE[0]} frames of {FREY_FACES_SHAPE[1]} × {FREY_FACES_SHAPE[2]} uint8)"
        )
    frames = np.ascontiguousarray(arr.reshape(FREY_FACES_SHAPE[0], -1))  # (1965, 560)
    digest = hashlib.md5(frames.tobytes()).hexdigest()
    if digest != FREY_FACES_MD5:
        raise DataError(
            f"{path}: the frames' MD5 is {digest}, not the original's {FREY_FACES_MD5}; the file is "
            f"damaged or other data: delete it (it is downloaded again when online) or replace it"
        )
    return frames.reshape(FREY_FACES_SHAPE)


def read_frey_faces(path: Path) -> np.ndarray:
    """The Frey Faces ``(1965, 28, 20)`` uint8 from ``frey_faces.npy`` (one frame per row) or the
    original ``frey_rawface.mat`` (variable ``ff``, 560 × 1965: one frame per column, read with
    ``scipy.io.loadmat``), checked by :func:`check_frey_faces`."""
    if ".mat" in path.suffixes:  # (also frey_rawface.mat.part, a download being checked)
        import scipy.io

        try:
            ff = scipy.io.loadmat(str(path))["ff"]  # (560, 1965)
        except (ValueError, OSError, KeyError, TypeError, NotImplementedError) as e:
            raise DataError(
                f"cannot read {path} as MATLAB's frey_rawface.mat with a variable ff ({e.__class__.__name__})"
            ) from None
        return check_frey_faces(np.ascontiguousarray(ff.T), path)  # (1965, 560)
    try:
        check_array_headers(path)
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"cannot read {path} as a NumPy .npy file ({e.__class__.__name__})") from None
    return check_frey_faces(arr, path)
