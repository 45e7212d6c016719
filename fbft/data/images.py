"""Image and mask files decoded as a viewer shows them: EXIF orientation applied, 16-bit and
float pixels scaled to 8 bits, anything else (unknown modes, decompression bombs, FIFOs) a
one-line :class:`CorruptImageError` naming the file. Studies and ``fbft predict`` both decode
through here."""

from __future__ import annotations

import contextlib
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from fbft.data.errors import CorruptImageError, DatasetNotFoundError

# Modes Pillow converts to RGB as a viewer shows them (alpha dropped, palettes and CMYK mapped).
_EIGHT_BIT = frozenset(
    {"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr"}
)
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@contextlib.contextmanager
def _open(path: str | Path, what: str = "image") -> Iterator[Image.Image]:
    """Open an image file lazily (header only). Anything that is not a regular file (a FIFO
    cannot block the reader), cannot be identified or is a decompression bomb raises
    :class:`CorruptImageError` naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise DatasetNotFoundError(f"{what} file not found: {path}") from err
    except OSError as err:
        raise CorruptImageError(f"cannot read {what} file {path}: {err.strerror}") from err
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptImageError(f"{what} file {path} is not a regular file (a FIFO or device?)")
        os.set_blocking(fd, True)
        with _identify(handle, path, what) as img:
            yield img


@contextlib.contextmanager
def _identify(handle: BinaryIO, name: str | Path, what: str) -> Iterator[Image.Image]:
    """Pillow's lazy open of ``handle`` with its errors as one-line :class:`CorruptImageError`
    naming ``name`` (a file, or what a caller calls bytes it was sent)."""
    try:
        img = Image.open(handle)
    except Image.DecompressionBombError as err:
        raise CorruptImageError(
            f"{what} file {name} has too many pixels to decode safely ({_first_line(err)})"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        unknown = isinstance(err, UnidentifiedImageError) and isinstance(handle, io.BytesIO)
        detail = "not an image format Pillow reads" if unknown else _first_line(err)
        raise CorruptImageError(f"cannot read {what} file {name}: {detail}") from err
    with img:
        yield img


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag, read from the header (a PNG's eXIf chunk counts when it comes
    before the pixels, so the size never needs a decode); a damaged EXIF block counts as none."""
    if img.format == "TIFF":  # Pillow reports the upright size and turns the pixels itself
        return 1
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except (OSError, ValueError, TypeError, SyntaxError):
        return 1


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file as a viewer shows it (EXIF orientation applied), read
    from its header without decoding the pixels."""
    with _open(path) as img:
        width, height = img.size
        turned = _orientation(img) in (5, 6, 7, 8)
    return (width, height) if turned else (height, width)


def _decoded(img: Image.Image, path: str | Path, what: str) -> Image.Image:
    """Pixels loaded and turned upright (EXIF orientation), as a viewer shows them."""
    stated = _orientation(img)
    try:
        img.load()  # Pillow turns some formats (TIFF) upright itself, dropping the tag
        method = _TRANSPOSE.get(stated) if _orientation(img) == stated else None
        return img.transpose(method) if method is not None else img
    except Image.DecompressionBombError as err:
        raise CorruptImageError(f"{what} file {path} has too many pixels ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise CorruptImageError(f"cannot decode {what} file {path}: {_first_line(err)}") from err


def _to_uint8(values: np.ndarray, mode: str, path: str | Path) -> np.ndarray:
    """8 bits of 16-bit or float pixels, as a viewer shows them: integers by the container's
    bit depth (v / 257 for 16 bits), floats in [0, 1] times 255, other floats stretched from the
    image's own min to its max."""
    if mode == "F":
        if not np.isfinite(values).all():
            raise CorruptImageError(f"image file {path} holds NaN or infinite pixels")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0 or hi > 1:
            values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        return np.rint(values * 255).astype(np.uint8)
    if values.min() < 0 or values.max() > 65535:
        raise CorruptImageError(
            f"image file {path} holds 32-bit integer pixels beyond 16 bits; save it as 8- or "
            "16-bit PNG/TIFF"
        )
    return np.rint(values / 257).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an HxWx3 uint8 RGB array as a viewer shows it: EXIF orientation
    applied; grayscale, palette, CMYK and RGBA converted (alpha dropped); 16-bit and float
    pixels scaled to 8 bits (see :func:`_to_uint8`, docs/datasets.md). Other pixel modes raise
    :class:`CorruptImageError` naming the file."""
    with _open(path) as img:
        return _rgb(img, path)


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """:func:`read_image` of a file's bytes held in memory (an upload, a request body): the same
    rules and errors, ``name`` standing for the file in every message."""
    with _identify(io.BytesIO(data), name, "image") as img:
        return _rgb(img, name)


def _rgb(img: Image.Image, path: str | Path) -> np.ndarray:
    """An opened image's pixels as HxWx3 uint8 RGB (see :func:`read_image`)."""
    upright = _decoded(img, path, "image")
    mode = upright.mode
    try:
        if mode in _EIGHT_BIT:
            return np.asarray(upright.convert("RGB"), dtype=np.uint8)
        if mode in _SIXTEEN_BIT or mode in ("I", "F"):
            gray = _to_uint8(np.asarray(upright, dtype=np.float64), mode, path)
            return np.repeat(gray[..., None], 3, axis=2)
    except (OSError, ValueError) as err:
        raise CorruptImageError(f"cannot decode image file {path}: {_first_line(err)}") from err
    raise CorruptImageError(
        f"image file {path} has pixel mode {mode!r}, which fbft does not read; save it as an "
        "8- or 16-bit grayscale or RGB PNG"
    )


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a mask file to an HxW bool array: every non-zero pixel (any channel) is anomalous.

    Multi-class masks (pixel value = defect-class id, as in VisA) are binarised the same way;
    an alpha channel is ignored; EXIF orientation is applied, as for images.
    """
    with _open(path, "mask") as img:
        upright = _decoded(img, path, "mask")
        try:
            values = np.asarray(upright)
        except (OSError, ValueError) as err:
            raise CorruptImageError(f"cannot decode mask file {path}: {_first_line(err)}") from err
        if upright.mode in ("LA", "RGBA", "La", "RGBa", "PA"):
            values = values[..., :-1]
    mask = values != 0
    return mask.any(axis=-1) if mask.ndim == 3 else mask
