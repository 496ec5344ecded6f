"""The identity of a data set, recorded in ``config.json``: so that data replaced under a run
(``fit --resume``, ``evaluate``) are noticed instead of silently trained or evaluated on.

* a ``.npy``/``.npz`` file: its absolute path, size in bytes and a content digest, plus the
  split sizes. The digest is BLAKE2b over the whole file up to :data:`WHOLE` bytes; over larger
  files, of the first and last MiB and :data:`BLOCKS` blocks of 64 KiB spread evenly between
  (fast on any size; a change that misses every sampled block, with the size unchanged, goes
  unnoticed);
* a folder of images: its split sizes and the digest its loader made of the decoded images
  and labels (``Dataset.content_digest``, :func:`ppl_vae.data.own_data.content_digest`): one
  image replaced by another of the same size is noticed, a re-encoded file of the same pixels
  is not; the digest is of the data as read, so it holds whatever the binarization;
* a named data set (``mnist``, ``digits``, ...): its name and split sizes;
* a :class:`~ppl_vae.data.splits.Dataset` passed from Python: its name, split sizes and a
  digest of its tensors as prepared (whatever its loader recorded: the caller may have changed
  them since), and, where its loader made one (a folder's, a ``.npy``/``.npz``'s: the digest the
  two above record), the digest of its source as read (``source_digest``).

Each digest is of one kind, recorded with it (``kind``): ``source``, of the file or folder as
read, the digest a run resumed or evaluated by its ``--dataset`` makes again; ``tensors``, of a
Python data set's tensors. :func:`changes` compares digests of the same kind only: a run fitted
on ``load_dataset("folder")`` from Python and resumed by name (the run records the folder's
path) compares the folder's digests; one fitted on ``dataset_from_array(x)`` and resumed by
name, its split sizes. Changes the caller made in Python to a loaded data set's tensors are not
seen by a resume by name, which reads the source again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..core.digests import digest

SPLITS = ("train", "valid", "test")
WHOLE = 64 << 20  # files up to this size are hashed whole
BLOCKS, BLOCK, ENDS = 64, 64 << 10, 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """BLAKE2b of a file: the whole of it up to :data:`WHOLE` bytes, else sampled blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= WHOLE:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return h.hexdigest()
        step = (size - 2 * ENDS - BLOCK) // BLOCKS
        starts = [0, *(ENDS + i * step for i in range(BLOCKS)), size - ENDS]
        for start in starts:
            f.seek(start)
            h.update(f.read(ENDS if start in (0, size - ENDS) else BLOCK))
    return h.hexdigest()


def tensor_digest(tensors) -> str:
    """:func:`ppl_vae.core.digests.digest` of ``tensors`` in order, each after its dtype and number
    of elements (``"torch.float32|784;"``)."""
    return digest(part for t in tensors for part in (f"{t.dtype}|{t.numel()};", t))


def fingerprint(ds, source: str | None = None) -> dict:
    """The identity of the loaded data set ``ds``: ``source`` is the ``--dataset`` it came from
    (a name, a ``.npy``/``.npz`` path or a folder; None for a data set passed from Python)."""
    fp = {"name": ds.name, "splits": [int(ds.split(s).shape[0]) for s in SPLITS]}
    read = getattr(ds, "content_digest", None)  # of its file or folder as its loader read it
    if source is None:
        fp.update(digest=tensor_digest(ds.split(s) for s in SPLITS), kind="tensors")
        if read is not None:  # what a resume by name (the run records its source) reads again
            fp["source_digest"] = read
    elif source.endswith((".npy", ".npz")) and Path(source).is_file():
        path = Path(source).resolve()
        fp.update(path=str(path), size=path.stat().st_size, digest=file_digest(path), kind="source")
    elif read is not None:  # a folder, as read
        fp.update(digest=read, kind="source")
    return fp


def _digests(fp: dict) -> dict:
    """The digests of a fingerprint by kind (``source``, ``tensors``). A record of an earlier
    version has no ``kind``: with a ``path``, its digest is a file's (``source``); without, a
    Python data set's tensors' (the folder digests of the short time before kinds were recorded
    are read so too: compared with a Python data set's, never with a folder's again)."""
    out, kind = {}, fp.get("kind")
    if "digest" in fp:
        out[kind if isinstance(kind, str) else "source" if "path" in fp else "tensors"] = fp["digest"]
    if "source_digest" in fp:
        out["source"] = fp["source_digest"]
    return out


def changes(saved: dict | None, now: dict, split: str | None = None) -> str | None:
    """What differs between the recorded fingerprint ``saved`` and ``now``, in a few words; None
    when nothing does, or when nothing was recorded (runs of earlier versions). The path alone
    does not count: the same bytes moved elsewhere are the same data. Sizes and digests are
    compared where both have them, digests only of the same kind (a data set passed from Python,
    resumed by its name, has its source's digest compared where its loader made one, else its
    split sizes). ``split``: only that split's size counts (``evaluate``: a run trained
    on part of a named data set is evaluated on its whole test split)."""
    if not isinstance(saved, dict):
        return None
    said = []
    both = lambda key: key in saved and key in now  # noqa: E731
    if both("size") and saved["size"] != now["size"]:
        said.append(f"{saved.get('size')} bytes then, {now.get('size')} now")
    then, now_ = saved.get("splits"), now.get("splits")
    if split is not None and isinstance(then, list) and len(then) == len(SPLITS):
        then, now_ = then[SPLITS.index(split)], now_[SPLITS.index(split)]
    if then != now_:
        show = lambda v: "/".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
        said.append(f"{'train/valid/test' if split is None else split} {show(then)} then, {show(now_)} now")
    then_d, now_d = _digests(saved), _digests(now)
    if not said and any(then_d[k] != now_d[k] for k in then_d.keys() & now_d.keys()):
        said.append("the same size, other content")
    return "; ".join(said) or None
