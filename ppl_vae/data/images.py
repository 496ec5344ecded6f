"""Folders of image files as a data set, the way torchvision's ``ImageFolder`` reads them: class
subfolders give labels; every image is decoded by Pillow, converted to grey or RGB and, when asked,
resized to one size. Every bad input (an empty folder, a file that is not an image, a truncated
or unreadable image, mixed sizes) is one :class:`~ppl_vae.core.errors.DataError` line naming the
file. :mod:`ppl_vae.data.own_data` turns the array into a data set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import DataError

#: image files a folder may hold (what Pillow reads); anything else but hidden files is refused
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_files(folder: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """The image files of ``folder`` as torchvision's ``ImageFolder`` sees them: with class
    subfolders, every image of subfolder c (sorted by name) is labelled c, else the images in
    ``folder`` itself are unlabelled. Returns ``(files, labels or None, class names)``, sorted.
    Hidden files (``.name``) are skipped; an empty folder, a file that is not an image
    (:data:`IMAGE_EXTENSIONS`), or images beside class subfolders is one :class:`DataError` line."""
    visible = lambda d: sorted(p for p in d.iterdir() if not p.name.startswith("."))  # noqa: E731
    entries = visible(folder)
    classes = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if not p.is_dir()]
    if classes and loose:
        raise DataError(
            f"{folder} holds class subfolders and also files beside them ({loose[0].name}); put every "
            f"image in a class subfolder, or none"
        )
    groups = [(i, visible(c)) for i, c in enumerate(classes)] if classes else [(None, loose)]
    files, labels = [], []
    for label, members in groups:
        for f in members:
            if f.is_dir():
                raise DataError(f"{f} is a folder inside a class folder; class folders hold image files only")
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(
                    f"{f} is not an image file (expected {', '.join(IMAGE_EXTENSIONS)}); remove it "
                    f"from the data folder"
                )
            files.append(f)
            labels.append(label)
    if not files:
        raise DataError(
            f"{folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), directly or in class subfolders"
        )
    return files, (labels if classes else None), [c.name for c in classes]


def read_image(path: Path, channels: int | None, size: tuple[int, int] | None):
    """One image file as a PIL image in mode ``L`` (``channels`` 1) or ``RGB`` (3), resized to
    ``size = (H, W)`` (bilinear) when given; ``channels`` None keeps greyscale images ``L`` and
    makes any other ``RGB`` (alpha dropped). Unreadable or truncated: one :class:`DataError` line."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            mode = {1: "L", 3: "RGB"}.get(channels) or (
                "L" if im.mode in ("1", "L", "LA", "I;16", "I") else "RGB"
            )
            if im.mode in ("I;16", "I") and mode == "L":  # 16-bit greyscale: scale to 8 bits
                im = Image.fromarray(
                    (np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8)
                )
            out = im.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        why = str(e).splitlines()[0][:100] if str(e) else e.__class__.__name__
        raise DataError(
            f"cannot read the image {path} ({why}); the file is damaged or not an image"
        ) from None
    if size is not None and (out.height, out.width) != tuple(size):
        out = out.resize((size[1], size[0]), Image.BILINEAR)
    return out


def read_image_folder(
    folder: Path, channels: int | None = None, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Every image of ``folder`` (:func:`image_files`) as one uint8 array ``(N, C, H, W)``, its
    labels ``(N,)`` (None without class subfolders) and the class names. ``channels``: 1 or 3
    (default: 1 when every image is greyscale, else 3); ``size``: ``(H, W)`` to resize every image
    to, needed when their sizes differ (without it, a second size is one :class:`DataError` line
    naming both files)."""
    files, labels, classes = image_files(folder)
    images = [read_image(f, channels, size) for f in files]
    if channels is None and any(im.mode == "RGB" for im in images):  # one colour image: all in RGB
        images = [im.convert("RGB") for im in images]
    first = images[0]
    for f, im in zip(files, images):
        if im.size != first.size:
            raise DataError(
                f"{f} is {im.height}×{im.width} pixels but {files[0]} is {first.height}×{first.width}: "
                f"pass --image-size H,W to resize every image to one size"
            )
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # (N, H, W) or (N, H, W, 3)
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)  # (N, C, H, W)
    return (
        np.ascontiguousarray(arr),
        (None if labels is None else np.asarray(labels, dtype=np.int64)),
        classes,
    )
