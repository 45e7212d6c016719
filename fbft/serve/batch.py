"""Batch scoring of image files with a saved detector: the body of `fbft predict`.

Writes ``OUT/scores.csv`` (path, score and, when a threshold is known, decision = score >
threshold), ``OUT/maps/<name>.npy`` (or ``.tiff``: the float32 map at the image's own H×W),
``OUT/maps/<name>.png`` (image | map over the image at full resolution, jet on one colour scale
for every image; outlined in white at the pixel threshold when known) and ``OUT/predict.json``
(thresholds, colour scale). Images stream in batches: a folder of thousands never holds more
than one batch of maps.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from fbft.data.common import IMAGE_EXTENSIONS, DatasetError, image_size, read_image

if TYPE_CHECKING:
    from fbft.detectors.fbft import FBFT
    from fbft.serve.thresholds import Thresholds

MAP_FORMATS = ("npy", "tiff")


class PredictInputError(ValueError):
    """A path given to `fbft predict` is missing, unreadable or holds no image."""


def collect_images(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Image files named directly, plus every image under the named folders (sorted, recursive).

    Duplicates are kept once; each header is read so a bad file fails before any work.
    """
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(
                p
                for p in item.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(item).parts)
            )
            if not files:
                raise PredictInputError(
                    f"folder {str(item)!r} holds no image file "
                    f"({', '.join(sorted(IMAGE_EXTENSIONS))}); pass a folder with images"
                )
            found += files
        elif item.is_file():
            found.append(item)
        else:
            raise PredictInputError(f"no such file or folder: {str(item)!r}")
    unique = list(dict.fromkeys(found))
    for path in unique:
        try:
            image_size(path)
        except DatasetError as err:
            raise PredictInputError(f"{err}; remove it or pass other images") from err
    return unique


def output_names(paths: Sequence[Path]) -> list[str]:
    """File-name-safe names, unique even when folders share file names (``a__000``, ``b__000``).

    A name is the path relative to the inputs' common folder, separators replaced by ``__``; the
    extension stays (``000_png``) only where two files differ by extension alone.
    """
    absolute = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([p.parent for p in absolute])) if absolute else Path()
    stems = [str(p.relative_to(root).with_suffix("")).replace(os.sep, "__") for p in absolute]
    clashes = {s for s in stems if stems.count(s) > 1}
    return [
        f"{s}_{p.suffix.lstrip('.').lower()}" if s in clashes else s
        for s, p in zip(stems, absolute, strict=True)
    ]


def iter_batches(
    model: FBFT, paths: Sequence[Path], batch_size: int = 16
) -> Iterator[list[tuple[Path, np.ndarray, np.ndarray, float]]]:
    """(path, image, map, score) per image, one batch of images in memory at a time."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = [read_image(p) for p in chunk]
        maps, scores = model.predict(images)
        yield list(zip(chunk, images, maps, scores, strict=True))


def colour_scale(
    first_maps: Sequence[np.ndarray], pixel_threshold: float | None
) -> tuple[float, float]:
    """One colour range for the whole run: nominal-ish floor (1% quantile of the first batch)
    to the 99.9% quantile, or, with a pixel threshold, symmetric around it (threshold mid-scale)."""
    from fbft.plots import color_range

    vmin, vmax = color_range(first_maps)
    if pixel_threshold is not None and pixel_threshold > vmin:
        vmax = 2 * pixel_threshold - vmin
    return vmin, vmax


def save_map(anomaly_map: np.ndarray, path: Path) -> None:
    """float32 map as ``.npy`` or a 32-bit float ``.tiff`` (by ``path``'s suffix)."""
    values = np.asarray(anomaly_map, dtype=np.float32)
    if path.suffix == ".npy":
        np.save(path, values)
    else:
        Image.fromarray(values).save(path, format="TIFF")


def predict_images(
    model: FBFT,
    paths: Sequence[Path],
    out: str | os.PathLike[str],
    thresholds: Thresholds | None = None,
    image_threshold: float | None = None,
    map_format: str = "npy",
    batch_size: int = 16,
    overlays: bool = True,
    progress: bool = True,
) -> Path:
    """Score image files (from :func:`collect_images`) into ``out`` (see the module doc).

    ``image_threshold`` overrides ``thresholds.image``; returns the path of scores.csv.
    """
    from tqdm.auto import tqdm

    from fbft.plots import overlay_pixels

    if map_format not in MAP_FORMATS:
        raise PredictInputError(f"--format must be one of {', '.join(MAP_FORMATS)}")
    names = iter(output_names(paths))
    cut = image_threshold if image_threshold is not None else getattr(thresholds, "image", None)
    pixel_cut = getattr(thresholds, "pixel", None)
    out = Path(out)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    clim = None
    bar = tqdm(total=len(paths), desc="predicting", unit="image", disable=not progress)
    with (out / "scores.csv").open("w", newline="") as handle, bar:
        rows = csv.writer(handle)
        rows.writerow(["path", "score"] + (["decision"] if cut is not None else []))
        for batch in iter_batches(model, paths, batch_size):
            if overlays and clim is None:
                clim = colour_scale([amap for _, _, amap, _ in batch], pixel_cut)
            for path, image, amap, score in batch:
                name = next(names)
                rows.writerow([str(path), score] + ([int(score > cut)] if cut is not None else []))
                save_map(amap, out / "maps" / f"{name}.{map_format}")
                if overlays:
                    pixels = overlay_pixels(image, amap, clim, pixel_cut)
                    Image.fromarray(pixels).save(out / "maps" / f"{name}.png", compress_level=1)
            bar.update(len(batch))
    summary = {
        "images": len(paths),
        "image_threshold": cut,
        "thresholds": None if thresholds is None else json.loads(thresholds.to_json()),
        "colour_range": clim,
    }
    (out / "predict.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out / "scores.csv"
