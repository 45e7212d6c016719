"""The served model's request and answer: a DataFrame of images in, a DataFrame of results out.

Input, one image per row, exactly one of:

- ``image``: the image file's bytes (PNG, JPEG, TIFF, ... as on disk). MLflow's scoring server
  decodes the base64 text a JSON request carries for this ``binary`` column; base64 text given
  in process, or through the ``inputs`` format (which the server does not decode), is decoded
  here.
- ``path``: an image file on the server, read only inside the folders named when the model was
  loaded (``FBFT_SERVE_PATHS``, off by default: a server's files are not a client's to probe).
  A relative path is taken inside the first folder.

Images are decoded by :mod:`fbft.data.images`, as in studies and ``fbft predict``. Output per
row: ``path`` (when the input has that column), ``score``, ``decision`` (score > the calibrated
image threshold, when the model has one) and, with the param ``maps: true``, ``height`` and
``width`` (the image's), ``anomaly_map`` (block maxima: see :func:`fbft.serve.regions.reduce_map`),
``map_scale`` (its block side in image pixels), ``components`` and ``n_components`` (the mask
``map > pixel threshold``: see :func:`fbft.serve.regions.components`; None without a threshold).
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fbft.data.images import decode_image, read_image
from fbft.serve.regions import components, reduce_map

if TYPE_CHECKING:
    import pandas as pd

    from fbft.detectors.base import BaseDetector
    from fbft.serve.thresholds import Thresholds

SERVE_PATHS_ENV = "FBFT_SERVE_PATHS"
MAP_SIZE = 256  # default longest side of a served map (0: full resolution)
_BASE64 = re.compile(rb"[A-Za-z0-9+/=\s]+")


class ServingInputError(ValueError):
    """A request the model cannot answer (the client's to fix): one line, no traceback."""


def served_folders(value: str | None = None) -> tuple[Path, ...]:
    """The folders ``path`` inputs may name: ``FBFT_SERVE_PATHS`` (folders separated by
    ``os.pathsep``), read when the model loads; empty = path input off."""
    value = os.environ.get(SERVE_PATHS_ENV, "") if value is None else value
    folders = []
    for entry in filter(None, value.split(os.pathsep)):
        folder = Path(entry).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"{SERVE_PATHS_ENV}={value}: {entry!r} is not a folder; name existing folders "
                f"separated by {os.pathsep!r}, or unset it to refuse path input"
            )
        folders.append(Path(os.path.realpath(folder)))
    return tuple(folders)


def confine(raw: object, folders: Sequence[Path], row: int) -> Path:
    """The file ``raw`` names, when it lies inside ``folders`` (links resolved). The answer
    for a path outside them never depends on whether that path exists."""
    if not folders:
        raise ServingInputError(
            "path input is off: this server reads no files of its own; send the image file's "
            "bytes base64-encoded in an 'image' column, or serve the model with "
            f"{SERVE_PATHS_ENV}=/folder to read images from that folder"
        )
    if not isinstance(raw, str) or not raw or "\0" in raw:
        raise ServingInputError(f"row {row}: 'path' must be a file path (text); got {raw!r}")
    real = Path(os.path.realpath(folders[0] / Path(raw).expanduser()))
    if not any(real.is_relative_to(folder) for folder in folders):
        raise ServingInputError(
            f"row {row}: path {raw!r} is outside the folders this server reads "
            f"({SERVE_PATHS_ENV}); send a path inside them or the image's bytes"
        )
    return real


def image_bytes(value: object, row: int) -> bytes:
    """The image file's bytes of an ``image`` cell: bytes as sent, or base64 text decoded."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not _BASE64.fullmatch(data):  # image files hold bytes base64 never has
            return data
    elif isinstance(value, str):
        data = value.encode("utf-8")
    else:
        raise ServingInputError(
            f"row {row}: 'image' must be an image file's bytes, base64-encoded; got "
            f"{type(value).__name__}"
        )
    try:
        return base64.b64decode(re.sub(rb"\s", b"", data), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ServingInputError(
            f"row {row}: 'image' is neither an image file's bytes nor base64 text of them ({err})"
        ) from None


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def sources(frame: Any, folders: Sequence[Path]) -> list[tuple[str, object]]:
    """("image" | "path", cell) per row, every row checked before any image is decoded."""
    columns = list(getattr(frame, "columns", ()))
    if "image" not in columns and "path" not in columns:
        raise ServingInputError(
            "the input needs a column 'image' (image file bytes, base64-encoded in JSON) or "
            f"'path' (image files on the server, inside {SERVE_PATHS_ENV}); got columns "
            f"{[str(c) for c in columns]}"
        )
    found = []
    for row in range(len(frame)):
        given = {
            name: frame[name].iloc[row]
            for name in ("image", "path")
            if name in columns and not _missing(frame[name].iloc[row])
        }
        if len(given) != 1:
            which = "both 'image' and 'path'" if given else "neither 'image' nor 'path'"
            raise ServingInputError(f"row {row}: give one image per row; got {which}")
        ((kind, value),) = given.items()
        found.append((kind, confine(value, folders, row) if kind == "path" else value))
    return found


def read_params(params: Mapping[str, Any] | None) -> tuple[bool, int]:
    """(maps, map_size) of the predict params, checked."""
    params = dict(params or {})
    maps, size = params.get("maps", False), params.get("map_size", MAP_SIZE)
    if not isinstance(maps, (bool, np.bool_)):
        raise ServingInputError(f"param 'maps' must be true or false; got {maps!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise ServingInputError(
            f"param 'map_size' must be 0 (full resolution) or a positive integer; got {size!r}"
        )
    return bool(maps), int(size)


def _images(found: list[tuple[str, object]]) -> Iterator[np.ndarray]:
    for row, (kind, value) in enumerate(found):
        if kind == "path":
            yield read_image(value)
        else:
            yield decode_image(image_bytes(value, row), name=f"sent in row {row} ('image')")


def score_frame(
    detector: BaseDetector,
    frame: pd.DataFrame,
    thresholds: Thresholds | None = None,
    params: Mapping[str, Any] | None = None,
    folders: Sequence[Path] = (),
    batch_size: int = 16,
) -> pd.DataFrame:
    """The answer to one request (see the module doc); images decoded one batch at a time."""
    import pandas as pd

    with_maps, map_size = read_params(params)
    found = sources(frame, folders)
    images = _images(found)
    rows: list[dict[str, Any]] = []
    while batch := [image for _, image in zip(range(batch_size), images, strict=False)]:
        maps, scores = detector.predict(batch)
        for anomaly_map, score in zip(maps, scores, strict=True):
            rows.append(_answer(anomaly_map, float(score), thresholds, with_maps, map_size))
    out = pd.DataFrame(rows, columns=_columns(thresholds, with_maps))
    if "path" in getattr(frame, "columns", ()):
        out.insert(0, "path", [str(v) if k == "path" else None for k, v in found])
    return out


def _columns(thresholds: Thresholds | None, with_maps: bool) -> list[str]:
    names = ["score"] + (["decision"] if thresholds is not None else [])
    if with_maps:
        names += ["height", "width", "anomaly_map", "map_scale", "components", "n_components"]
    return names


def _answer(
    anomaly_map: np.ndarray,
    score: float,
    thresholds: Thresholds | None,
    with_maps: bool,
    map_size: int,
) -> dict[str, Any]:
    answer: dict[str, Any] = {"score": score}
    if thresholds is not None:
        answer["decision"] = score > thresholds.image
    if with_maps:
        reduced, scale = reduce_map(anomaly_map, map_size)
        found, count = (
            components(anomaly_map, thresholds.pixel) if thresholds is not None else (None, None)
        )
        answer |= {
            "height": int(anomaly_map.shape[0]),
            "width": int(anomaly_map.shape[1]),
            "anomaly_map": reduced.tolist(),
            "map_scale": scale,
            "components": found,
            "n_components": count,
        }
    return answer
