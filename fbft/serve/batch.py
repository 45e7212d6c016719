"""Batch scoring of image files with a saved detector: the body of `fbft predict`.

Writes ``OUT/scores.csv`` (path, score, decision = score > threshold when a threshold is known,
and map: the image's map file), ``OUT/maps/<name>.npy`` (or ``.tiff``: the float32 map at the
image's own H×W), ``OUT/maps/<name>.png`` (image | map over the image at full resolution, jet on
the model's fixed colour scale, calibrated with its thresholds; outlined in white at the pixel
threshold when known; below, the image score and decision, the colour bar and the outline's
meaning) and ``OUT/predict.json`` (thresholds, colour scale and its source). ``<name>`` is
the image's path relative to the inputs' common folder, %-escaped (:func:`output_names`).
Images stream in batches: a folder of thousands never holds more than one batch of maps. A
failed run leaves no output.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import numpy as np
from PIL import Image

from fbft.data.common import IMAGE_EXTENSIONS, DatasetError, image_size, read_image

if TYPE_CHECKING:
    from fbft.detectors.fbft import FBFT
    from fbft.serve.thresholds import Thresholds

MAP_FORMATS = ("npy", "tiff")


class PredictInputError(ValueError):
    """A path given to `fbft predict` is missing, unreadable or holds no image."""


def collect_images(
    inputs: Sequence[str | os.PathLike[str]], exclude: Sequence[str | os.PathLike[str]] = ()
) -> list[Path]:
    """Image files named directly, plus every image under the named folders (sorted, recursive;
    hidden names skipped; a symlinked folder followed once, so links cannot loop; folders in
    ``exclude``, such as the output folder, never read).

    Duplicates are kept once; each header is read so a bad file fails before any work.
    """
    skip = {Path(p).resolve() for p in exclude}
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = _walk(item, skip)
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


def _walk(folder: Path, skip: set[Path]) -> list[Path]:
    """Image files under ``folder``: every real folder visited once (symlinked ones too)."""
    seen: set[tuple[int, int]] = set()
    files = []
    for here, dirs, names in os.walk(folder, followlinks=True):
        st = os.stat(here)
        if (st.st_dev, st.st_ino) in seen or Path(here).resolve() in skip:
            dirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(here) / name
            if (
                not name.startswith(".")
                and path.suffix.lower() in IMAGE_EXTENSIONS
                and path.is_file()
            ):
                files.append(path)
    return sorted(files)


def output_names(paths: Sequence[Path]) -> list[str]:
    """File-name-safe, unique and reversible names: the path relative to the inputs' common
    folder, %-escaped (``/`` -> ``%2F``, ``%`` -> ``%25``; ``urllib.parse.unquote`` gives the
    path back), extension kept (``x.PNG`` and ``x.png`` differ). A name equal to an earlier one
    but for letter case gets ``~2``, ``~3`` (case-insensitive filesystems); a name too long for
    a file system ends in a hash. ``scores.csv`` names each image's map in its ``map`` column.
    """
    absolute = [Path(os.path.abspath(p)) for p in paths]
    root = Path(os.path.commonpath([p.parent for p in absolute])) if absolute else Path()
    names, seen = [], {}
    for path in absolute:
        relative = path.relative_to(root).as_posix()
        name = quote(relative, safe=" !$&'()+,;=@[]^`{}").replace("~", "%7E")
        name = "%2E" + name[1:] if name.startswith(".") else name
        if len(name.encode()) > 200:
            name = f"{name[:150]}~{hashlib.sha256(relative.encode()).hexdigest()[:16]}"
        count = seen[name.casefold()] = seen.get(name.casefold(), 0) + 1
        names.append(name if count == 1 else f"{name}~{count}")
    return names


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
    first_maps: Sequence[np.ndarray],
    thresholds: Thresholds | None,
    given: tuple[float, float] | None = None,
) -> tuple[tuple[float, float], str]:
    """(vmin, vmax) of every overlay of a run and where it comes from: ``given``
    (``--colour-range``), else the model's calibrated scale (the same for every run), else, for
    a model calibrated without one, the first batch's maps (printed: colours then differ between
    runs)."""
    from fbft.plots import color_range

    if given is not None:
        return given, "--colour-range"
    stored = getattr(thresholds, "colour_range", None)
    if stored is not None:
        return stored, "the model's calibration"
    vmin, vmax = color_range(first_maps)
    pixel = getattr(thresholds, "pixel", None)
    if pixel is not None and pixel > vmin:
        vmax = 2 * pixel - vmin
    print(
        f"fbft predict: the model stores no calibrated colour scale; overlays use {vmin:.4g}.."
        f"{vmax:.4g} from the first batch (another run's colours differ: pass --colour-range "
        "LO HI to fix them)",
        file=sys.stderr,
    )
    return (vmin, vmax), "first batch (the model stores no calibrated colour scale)"


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
    overwrite: bool = False,
    colour_range: tuple[float, float] | None = None,
) -> Path:
    """Score image files (from :func:`collect_images`) into ``out`` (see the module doc).

    Everything is written into a temporary folder beside ``out`` and renamed into place at the
    end: a run that fails leaves no half output. ``out`` must be missing or empty, or, with
    ``overwrite``, an earlier output (it is then replaced whole: no stale maps). Returns the
    path of scores.csv; ``image_threshold`` overrides ``thresholds.image``; ``colour_range``
    the model's colour scale (:func:`colour_scale`).
    """
    if map_format not in MAP_FORMATS:
        raise PredictInputError(f"--format must be one of {', '.join(MAP_FORMATS)}")
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(model, paths, work, thresholds, image_threshold, map_format, batch_size,
               overlays, progress, colour_range)  # fmt: skip
        if out.exists() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "out")
            os.replace(work, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out / "scores.csv"


def check_output(out: Path, overwrite: bool) -> None:
    """``--out`` is a new or empty folder, or (``overwrite``) an earlier output of predict."""
    if out.exists() and not out.is_dir():
        raise PredictInputError(f"--out {out} is a file; name a folder for the outputs")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise PredictInputError(
            f"--out {out} is not empty; pass --overwrite to replace an earlier output, or name a "
            "new folder"
        )
    if not (out / "scores.csv").is_file():
        raise PredictInputError(
            f"--out {out} is not an fbft predict output (no scores.csv); --overwrite replaces "
            "only those: name a new folder"
        )


def _write(
    model: FBFT,
    paths: Sequence[Path],
    out: Path,
    thresholds: Thresholds | None,
    image_threshold: float | None,
    map_format: str,
    batch_size: int,
    overlays: bool,
    progress: bool,
    colour_range: tuple[float, float] | None,
) -> None:
    from tqdm.auto import tqdm

    from fbft.plots import overlay_pixels

    names = iter(output_names(paths))
    cut = image_threshold if image_threshold is not None else getattr(thresholds, "image", None)
    pixel_cut = getattr(thresholds, "pixel", None)
    (out / "maps").mkdir()
    clim, clim_source = None, None
    # disable=None: no bar when stderr is not a terminal (a log would get a line per update)
    bar = tqdm(
        total=len(paths), desc="predicting", unit="image", disable=None if progress else True
    )
    with (out / "scores.csv").open("w", newline="") as handle, bar:
        rows = csv.writer(handle)
        rows.writerow(["path", "score"] + (["decision"] if cut is not None else []) + ["map"])
        for batch in iter_batches(model, paths, batch_size):
            if overlays and clim is None:
                maps = [amap for _, _, amap, _ in batch]
                clim, clim_source = colour_scale(maps, thresholds, colour_range)
            for path, image, amap, score in batch:
                name = next(names)
                decision = [int(score > cut)] if cut is not None else []
                rows.writerow([str(path), score, *decision, f"maps/{name}.{map_format}"])
                save_map(amap, out / "maps" / f"{name}.{map_format}")
                if overlays:
                    pixels = overlay_pixels(image, amap, clim, pixel_cut, score, cut)
                    Image.fromarray(pixels).save(out / "maps" / f"{name}.png", compress_level=1)
            bar.update(len(batch))
    summary = {
        "images": len(paths),
        "image_threshold": cut,
        "thresholds": None if thresholds is None else json.loads(thresholds.to_json()),
        "colour_range": clim,
        "colour_range_source": clim_source,
    }
    (out / "predict.json").write_text(json.dumps(summary, indent=2) + "\n")
