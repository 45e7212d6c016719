"""The synthetic "tiny defects" benchmark: a licence-free MVTec-layout dataset made from scratch.

Three texture categories are built from CC0 textures that scikit-image ships (`gravel`,
`brick`, `grass`) and one object category (`parts`) is drawn from simple shaded shapes.
Test images hold 1-3 defects of one kind (`color_spot`, `scratch`, `patch`, `blur`) whose
areas are spread log-uniformly from 1 pixel to 3% of the image; each mask is exactly the set
of pixels that differ from the defect-free image. Everything is seeded: the same arguments give
byte-identical files. `fbft synth ROOT` is the command-line front end.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import logging
import math
import os
import shutil
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
from PIL import Image
from scipy import ndimage

from fbft.data.common import DatasetError
from fbft.data.stats import STRUCTURE

logger = logging.getLogger(__name__)

GENERATOR = "fbft.data.synthetic"
VERSION = "1"
TEXTURES: dict[str, dict[str, Any]] = {
    "brick": {
        "source": "skimage.data.brick()",
        "origin": "CC0Textures 'Bricks25' (https://cc0textures.com/view.php?tex=Bricks25)",
        "licence": "CC0 1.0",
        "tint": (0.92, 0.62, 0.50),
    },
    "grass": {
        "source": "skimage.data.grass()",
        "origin": "DeviantArt 'Grass-01' by linolafett "
        "(https://www.deviantart.com/linolafett/art/Grass-01-434853879)",
        "licence": "CC0 1.0",
        "tint": (0.62, 0.85, 0.45),
    },
    "gravel": {
        "source": "skimage.data.gravel()",
        "origin": "CC0Textures 'Gravel04' (https://cc0textures.com/view.php?tex=Gravel04)",
        "licence": "CC0 1.0",
        "tint": (0.88, 0.84, 0.78),
    },
}
CATEGORIES = ("brick", "grass", "gravel", "parts")
KINDS = ("color_spot", "scratch", "patch", "blur")
MAX_AREA_FRACTION = 0.03
DEFECTS_PER_IMAGE = ((1, 2, 3), (0.6, 0.25, 0.15))
MIN_CHANGE = {"color_spot": 40, "scratch": 40, "patch": 30, "blur": 20}
MIN_IMAGE_SIZE = 64
BBOX_FORMAT = "[x0, y0, x1, y1] in pixels, x1 and y1 exclusive"
_GAP = 2  # pixels kept between two defects so that they never merge into one component
_BEVEL = 0.006  # darkened rim of a part, as a share of the image side


class SyntheticRootError(DatasetError, FileExistsError):
    """The target folder holds something other than this exact synthetic dataset."""


@dataclass(frozen=True)
class _Task:
    """One image to render: where it goes, its random stream and its defects (kind, area)."""

    category: str
    relpath: str
    key: tuple[int, ...]
    defects: tuple[tuple[str, int], ...] = ()

    @property
    def mask_relpath(self) -> str:
        folder, name = self.relpath.rsplit("/test/", 1)
        kind, file = name.split("/")
        return f"{folder}/ground_truth/{kind}/{Path(file).stem}_mask.png"


# ----------------------------------------------------------------------------- nominal images


@cache
def _texture_source(name: str) -> np.ndarray:
    """The scikit-image texture as float32 in [0, 1]."""
    return getattr(skimage.data, name)().astype(np.float32) / 255.0


def _texture(name: str, size: int, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A rotated/scaled/flipped view of the reflect-tiled texture, lit and tinted (HxWx3, 0-255)."""
    tex = _texture_source(name)
    step = rng.uniform(0.55, 0.95) * tex.shape[0] / size  # texture pixels per output pixel
    if step > 1:
        tex = ndimage.gaussian_filter(tex, 0.5 * step)
    angle = rng.uniform(0, 2 * math.pi)
    flip = rng.choice((-1.0, 1.0))
    matrix = step * np.array(
        [[math.cos(angle), -math.sin(angle) * flip], [math.sin(angle), math.cos(angle) * flip]]
    )
    centre_out = (np.array(shape) - 1) / 2
    centre_in = rng.uniform(0, 2 * tex.shape[0], 2)
    grey = ndimage.affine_transform(
        tex,
        matrix,
        offset=centre_in - matrix @ centre_out,
        output_shape=shape,
        order=1,
        mode="mirror",
    )
    grey = (grey - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.06, 0.06)
    tint = np.asarray(TEXTURES[name]["tint"], np.float32) * (1 + rng.normal(0, 0.03, 3))
    return (grey * _illumination(shape, rng, 0.12))[..., None] * (tint * 255).astype(np.float32)


def _illumination(shape: tuple[int, int], rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smooth linear light gradient around 1."""
    gy, gx = rng.uniform(-strength, strength, 2)
    ys = np.linspace(-0.5, 0.5, shape[0], dtype=np.float32)[:, None]
    xs = np.linspace(-0.5, 0.5, shape[1], dtype=np.float32)[None, :]
    return 1 + gy * ys + gx * xs


def _sdf_box(u: np.ndarray, v: np.ndarray, a: float, b: float, r: float) -> np.ndarray:
    """Signed distance to a rectangle of half sizes (a, b) with corner radius r."""
    qx, qy = np.abs(u) - a + r, np.abs(v) - b + r
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - r


def _part(kind: str, s: float, rng: np.random.Generator) -> tuple[float, Any]:
    """Bounding radius and shape function (u, v) -> (signed distance, shading) of one part."""
    bevel = _BEVEL * s
    if kind == "plate":
        a, b = rng.uniform(0.09, 0.15) * s, rng.uniform(0.05, 0.09) * s
        r, hole = rng.uniform(0.2, 0.5) * b, rng.uniform(0.25, 0.45) * b
        holes = ((), (0.5,), (-0.5, 0.5))[rng.integers(3)]

        def shape(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            sdf = _sdf_box(u, v, a, b, r)
            for h in holes:
                sdf = np.maximum(sdf, hole - np.hypot(u - h * a, v))
            return sdf, 0.85 + 0.15 * u / a

        return math.hypot(a, b) + bevel, shape
    if kind == "washer":
        ro = rng.uniform(0.06, 0.11) * s
        ri = rng.uniform(0.35, 0.6) * ro
        light = rng.uniform(0, math.pi)

        def shape(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            rho = np.hypot(u, v)
            sdf = np.abs(rho - (ro + ri) / 2) - (ro - ri) / 2
            return sdf, 0.7 + 0.3 * np.cos(2 * (np.arctan2(v, u) - light))

        return ro + bevel, shape
    half = rng.uniform(0.10, 0.16) * s  # screw: a round slotted head and a threaded shaft
    w = rng.uniform(0.018, 0.03) * s
    head = rng.uniform(1.8, 2.4) * w
    pitch = rng.uniform(0.5, 0.8) * w

    def shape(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hu = u + half - head
        head_sdf = np.hypot(hu, v) - head
        shaft_sdf = _sdf_box(u - head / 2, v, half - head / 2, w, 0.3 * w)
        on_head = head_sdf < shaft_sdf
        slot = (np.abs(v) < 0.15 * head) & (np.abs(hu) < 0.7 * head)
        shade = np.where(
            on_head,
            np.where(slot, 0.4, 0.7 + 0.3 * (1 - np.hypot(hu, v) / head)),
            (0.65 + 0.35 * np.clip(1 - (v / w) ** 2, 0, 1))
            * (0.8 + 0.2 * np.sin(2 * np.pi * (u + 0.4 * v) / pitch)),
        )
        return np.minimum(head_sdf, shaft_sdf), shade

    return half + bevel, shape


def _parts(
    size: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """1-4 shaded parts on a plain background (HxWx3, 0-255) and their (cy, cx, radius)."""
    s = float(size)
    background = np.array([0.80, 0.81, 0.83], np.float32) * rng.uniform(0.93, 1.05)
    img = _illumination((size, size), rng, 0.08)[..., None] * background
    colours = ((0.62, 0.64, 0.67), (0.78, 0.62, 0.32), (0.28, 0.42, 0.72), (0.35, 0.35, 0.37))
    placed: list[tuple[float, float, float]] = []
    for _ in range(rng.integers(1, 5)):
        radius, shape = _part(str(rng.choice(("plate", "washer", "screw"))), s, rng)
        shadow = 0.012 * s
        reach = radius + shadow + 2
        for _attempt in range(50):
            cy, cx = rng.uniform(reach, s - reach, 2)
            if all(math.hypot(cy - py, cx - px) > radius + pr + 0.02 * s for py, px, pr in placed):
                break
        else:
            continue
        y0, y1 = int(cy - reach), min(size, math.ceil(cy + reach) + 1)
        x0, x1 = int(cx - reach), min(size, math.ceil(cx + reach) + 1)
        ys = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
        xs = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
        angle = rng.uniform(0, 2 * math.pi)
        c, si = math.cos(angle), math.sin(angle)
        sdf, shade = shape(c * xs + si * ys, -si * xs + c * ys)
        shadow_sdf, _ = shape(
            c * (xs - shadow) + si * (ys - shadow), -si * (xs - shadow) + c * (ys - shadow)
        )
        bevel = _BEVEL * s
        shade = shade * (1 - 0.25 * np.clip((sdf + bevel) / bevel, 0, 1))
        alpha = np.clip(0.5 - sdf, 0, 1)[..., None]
        shadow_alpha = 0.35 * np.clip(0.5 - shadow_sdf / (0.008 * s), 0, 1)[..., None]
        colour = np.asarray(colours[rng.integers(len(colours))], np.float32) * rng.uniform(0.9, 1.1)
        crop = img[y0:y1, x0:x1] * (1 - shadow_alpha)
        img[y0:y1, x0:x1] = crop * (1 - alpha) + alpha * shade[..., None] * colour
        placed.append((cy, cx, radius))
    return img * 255, placed


def _nominal(category: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """A defect-free uint8 image of `category` and the part anchors (empty for textures)."""
    if category == "parts":
        img, anchors = _parts(size, rng)
    else:
        img, anchors = _texture(category, size, rng, (size, size)), []
    np.clip(np.rint(img, out=img), 0, 255, out=img)
    return img.astype(np.uint8), anchors


# ----------------------------------------------------------------------------- defect shapes


def _crop(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of `mask`, cropped to its bounding box."""
    labels, n = ndimage.label(mask, STRUCTURE)
    if n > 1:
        mask = labels == 1 + int(np.argmax(ndimage.sum_labels(mask, labels, range(1, n + 1))))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _grown(area: int, rng: np.random.Generator) -> np.ndarray:
    """A 4-connected cluster of exactly `area` pixels grown at random (for tiny defects)."""
    pixels = [(0, 0)]
    taken = {(0, 0)}
    steps = ((0, 1), (1, 0), (0, -1), (-1, 0))
    while len(pixels) < area:
        y, x = pixels[rng.integers(len(pixels))]
        dy, dx = steps[rng.integers(4)]
        if (y + dy, x + dx) not in taken:
            taken.add((y + dy, x + dx))
            pixels.append((y + dy, x + dx))
    ys, xs = np.array(pixels).T
    mask = np.zeros((np.ptp(ys) + 1, np.ptp(xs) + 1), bool)
    mask[ys - ys.min(), xs - xs.min()] = True
    return mask


def _blob(area: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth, elongated, wavy blob of about `area` pixels."""
    if area < 12:
        return _grown(area, rng)
    amps = rng.uniform(0, 0.15, 3)
    phases = rng.uniform(0, 2 * math.pi, 3)
    stretch = rng.uniform(0.6, 1.6)
    r0 = math.sqrt(area / math.pi / (1 + float(np.sum(amps**2)) / 2))
    reach = math.ceil(r0 * (1 + amps.sum()) * max(stretch, 1 / stretch)) + 1
    ys, xs = np.mgrid[-reach : reach + 1, -reach : reach + 1].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    u = (math.cos(angle) * xs + math.sin(angle) * ys) / stretch
    v = (-math.sin(angle) * xs + math.cos(angle) * ys) * stretch
    theta = np.arctan2(v, u)
    radius = r0 * (
        1 + sum(a * np.cos(k * theta + p) for k, a, p in zip((2, 3, 4), amps, phases, strict=True))
    )
    return _crop(np.hypot(u, v) <= radius)


def _rectangle(area: int, rng: np.random.Generator) -> np.ndarray:
    """An axis-aligned rectangle of about `area` pixels (aspect ratio 1:2 to 2:1)."""
    height = max(1, round(math.sqrt(area * rng.uniform(0.5, 2.0))))
    return np.ones((height, max(1, round(area / height))), bool)


def _scratch(area: int, rng: np.random.Generator, max_length: float) -> np.ndarray:
    """A thin curve 1-3 px wide of about `area` pixels (a straight 1-px line for tiny ones).

    Curves longer than `max_length` are made wider instead (still at most 3 px for the
    areas `_max_area` allows).
    """
    if area < 12:
        angle = rng.uniform(-math.pi / 4, math.pi / 4)
        ys = np.rint(np.arange(area) * math.tan(angle)).astype(int)
        xs = np.arange(area)
        mask = np.zeros((np.ptp(ys) + 1, area), bool)
        mask[ys - ys.min(), xs] = True
        return mask if rng.random() < 0.5 else mask.T
    width = max(int(rng.integers(1, 4)), math.ceil(area / max_length))
    length = area / width
    t = np.arange(0, length, 0.7)
    heading = (
        rng.uniform(0, 2 * math.pi)
        + rng.uniform(-1.5, 1.5) * t / length
        + rng.uniform(0, 0.4) * np.sin(rng.uniform(2, 6) * math.pi * t / length)
    )
    ys = np.rint(np.cumsum(0.7 * np.sin(heading))).astype(int)
    xs = np.rint(np.cumsum(0.7 * np.cos(heading))).astype(int)
    mask = np.zeros((np.ptp(ys) + 1 + 2 * width, np.ptp(xs) + 1 + 2 * width), bool)
    mask[ys - ys.min() + width, xs - xs.min() + width] = True
    return _crop(ndimage.binary_dilation(mask, np.ones((width, width), bool)))


_SHAPES = {"color_spot": _blob, "patch": _rectangle, "blur": _blob}
_SCRATCH_LENGTH = 0.7  # longest scratch, as a share of the image side


def _max_area(kind: str, size: int) -> float:
    """Largest area a defect of `kind` gets (scratches are bounded by their length)."""
    limit = MAX_AREA_FRACTION * size * size
    return min(limit, 3 * _SCRATCH_LENGTH * size) if kind == "scratch" else limit


# ----------------------------------------------------------------------------- defect painting


def _place(
    shape: tuple[int, int],
    size: int,
    taken: list[tuple[int, int, int, int]],
    anchors: list[tuple[float, float, float]],
    rng: np.random.Generator,
) -> tuple[int, int]:
    """Top-left corner of a defect box away from earlier defects (on a part if there are any)."""
    h, w = shape
    for attempt in range(100):
        if anchors and attempt < 80:
            cy, cx, r = anchors[rng.integers(len(anchors))]
            dy, dx = rng.uniform(-0.5 * r, 0.5 * r, 2)
            y = int(np.clip(cy + dy - h / 2, 0, size - h))
            x = int(np.clip(cx + dx - w / 2, 0, size - w))
        else:
            y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        if all(
            y + h + _GAP <= ty0 or ty1 + _GAP <= y or x + w + _GAP <= tx0 or tx1 + _GAP <= x
            for ty0, tx0, ty1, tx1 in taken
        ):
            break
    return y, x


def _paint(
    kind: str,
    img: np.ndarray,
    box: tuple[slice, slice],
    shape: np.ndarray,
    category: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """New float values (N x 3) for the pixels of `shape` inside `box` of `img`."""
    current = img[box][shape].astype(np.float32)
    if kind == "color_spot":
        hsv = rng.uniform(), rng.uniform(0.6, 1), rng.uniform(0.4, 0.95)
        colour = np.array(colorsys.hsv_to_rgb(*hsv))
        alpha = rng.uniform(0.6, 0.9)
        return (1 - alpha) * current + alpha * 255 * colour
    if kind == "scratch":
        if rng.random() < 0.5:
            return current * rng.uniform(0.25, 0.45)
        return current + (255 - current) * rng.uniform(0.6, 0.85)
    if kind == "patch":
        donor = str(rng.choice([t for t in TEXTURES if t != category]))
        return _texture(donor, img.shape[0], rng, shape.shape)[shape]
    sigma = rng.uniform(2, 6)  # blur: a blurred, slightly darkened smudge
    pad = math.ceil(3 * sigma)
    ys, xs = box
    y0, x0 = max(ys.start - pad, 0), max(xs.start - pad, 0)
    around = img[y0 : ys.stop + pad, x0 : xs.stop + pad].astype(np.float32)
    blurred = ndimage.gaussian_filter(around, (sigma, sigma, 0))
    inner = blurred[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return inner[shape] * rng.uniform(0.75, 0.9)


def _commit(
    img: np.ndarray,
    nominal: np.ndarray,
    box: tuple[slice, slice],
    shape: np.ndarray,
    new: np.ndarray,
    min_change: int,
) -> None:
    """Write `new` into the `shape` pixels, each differing from the nominal one by >= min_change."""
    old = nominal[box][shape].astype(np.int16)
    new = np.clip(np.rint(new), 0, 255).astype(np.int16)
    weak = np.abs(new - old).max(axis=1) < min_change
    if weak.any():
        push = np.where(old[weak].mean(axis=1, keepdims=True) < 128, min_change, -min_change)
        new[weak] = np.clip(old[weak] + push, 0, 255)
    crop = img[box]
    crop[shape] = new.astype(np.uint8)


def render(
    category: str, size: int, rng: np.random.Generator, defects: tuple[tuple[str, int], ...] = ()
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One image of `category` with `defects` ((kind, target area) pairs).

    Returns the image, its mask (exactly the pixels that differ from the defect-free image) and
    one record per defect: kind, area and bbox (`BBOX_FORMAT`).
    """
    nominal, anchors = _nominal(category, size, rng)
    img = nominal.copy()
    mask = np.zeros((size, size), bool)
    taken: list[tuple[int, int, int, int]] = []
    records = []
    for kind, area in defects:
        shape = (
            _scratch(area, rng, _SCRATCH_LENGTH * size)
            if kind == "scratch"
            else _SHAPES[kind](area, rng)
        )
        y, x = _place(shape.shape, size, taken, anchors, rng)
        h, w = shape.shape
        box = (slice(y, y + h), slice(x, x + w))
        _commit(
            img, nominal, box, shape, _paint(kind, img, box, shape, category, rng), MIN_CHANGE[kind]
        )
        mask[box] |= shape
        taken.append((y, x, y + h, x + w))
        records.append({"kind": kind, "area": int(shape.sum()), "bbox": [x, y, x + w, y + h]})
    return img, mask, records


# ----------------------------------------------------------------------------- dataset writing


def _plan(category: str, size: int, n_train: int, n_test: int, seed: int) -> list[_Task]:
    """Every image of one category: names, random streams and defects with stratified areas."""
    code = zlib.crc32(category.encode())
    rng = np.random.default_rng([seed, code, 2])
    n_good = max(1, n_test // 3)
    kinds = [KINDS[i % len(KINDS)] for i in range(n_test - n_good)]
    counts = rng.choice(DEFECTS_PER_IMAGE[0], size=len(kinds), p=DEFECTS_PER_IMAGE[1])
    owners = [i for i, c in enumerate(counts) for _ in range(c)]
    # log-uniform areas, one per stratum, so that every size range is present; the largest
    # go first, each to a random defect whose kind can be that large
    top = math.log(MAX_AREA_FRACTION * size * size)
    strata = np.exp((np.arange(len(owners)) + rng.random(len(owners))) / len(owners) * top)[::-1]
    free = [int(i) for i in rng.permutation(len(owners))]
    areas = [0] * len(owners)
    for value in strata:
        fits = [i for i in free if value <= _max_area(kinds[owners[i]], size)]
        chosen = fits[0] if fits else free[0]
        free.remove(chosen)
        areas[chosen] = max(1, round(min(value, _max_area(kinds[owners[chosen]], size))))
    tasks = [
        _Task(category, f"{category}/train/good/{i:03d}.png", (seed, code, 0, i))
        for i in range(n_train)
    ]
    tasks += [
        _Task(category, f"{category}/test/good/{i:03d}.png", (seed, code, 1, i))
        for i in range(n_good)
    ]
    per_kind = dict.fromkeys(KINDS, 0)
    for j, kind in enumerate(kinds):
        defects = tuple((kind, areas[d]) for d, owner in enumerate(owners) if owner == j)
        tasks.append(
            _Task(
                category,
                f"{category}/test/{kind}/{per_kind[kind]:03d}.png",
                (seed, code, 1, n_good + j),
                defects,
            )
        )
        per_kind[kind] += 1
    return tasks


def _save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)


def _write(task: _Task, folder: Path, size: int) -> list[dict]:
    """Render one task into `folder`; the defect records of its image."""
    img, mask, records = render(task.category, size, np.random.default_rng(task.key), task.defects)
    _save_png(folder / task.relpath, img)
    if not task.defects:
        return []
    _save_png(folder / task.mask_relpath, mask.astype(np.uint8) * 255)
    return [{"image": task.relpath, "mask": task.mask_relpath, **r} for r in records]


def _reusable(root: Path, params: dict[str, Any]) -> bool:
    """True when `root` already holds this dataset; raise when it holds anything else."""
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            raise SyntheticRootError(
                f"{root} has a manifest.json that is not readable JSON ({err}); refusing to "
                "overwrite it: choose another folder or delete this one"
            ) from err
        if not isinstance(found, dict) or found.get("generator") != GENERATOR:
            raise SyntheticRootError(
                f"{manifest} was not written by {GENERATOR}; refusing to overwrite {root}: "
                "choose another folder"
            )
        if found.get("version") == VERSION and found.get("parameters") == params:
            return True
        raise SyntheticRootError(
            f"{root} holds a synthetic dataset made with other settings (version "
            f"{found.get('version')}, {found.get('parameters')}) than the ones asked for "
            f"(version {VERSION}, {params}); choose another folder or delete {root} to regenerate"
        )
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise SyntheticRootError(
            f"{root} exists and is not a dataset generated by fbft (it has no manifest.json); "
            "refusing to write into it: choose a new or empty folder"
        )
    return False


def generate(
    root: str | os.PathLike[str],
    categories: list[str] | tuple[str, ...] | None = None,
    image_size: int = 1024,
    n_train: int = 60,
    n_test: int = 24,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Write the synthetic benchmark in MVTec AD layout under `root` and return `root`.

    categories: any of `CATEGORIES` (default all). Per category: `n_train` nominal training
    images; `n_test` test images, a third of them nominal (`test/good`), the rest defective in
    one folder per defect kind, with masks `ground_truth/<kind>/NNN_mask.png` (0/255) and a
    `manifest.json` at the root listing every defect. If `root` already holds the same dataset
    it is reused; any other content in `root` raises `SyntheticRootError`. The dataset is built
    in a temporary sibling folder and moved into place at the end; `progress` shows a bar.
    """
    if isinstance(categories, str):
        categories = [categories]
    chosen = sorted(set(CATEGORIES if categories is None else categories))
    unknown = [c for c in chosen if c not in CATEGORIES]
    if unknown or not chosen:
        raise ValueError(f"unknown synthetic categories {unknown}; choose among {list(CATEGORIES)}")
    if image_size < MIN_IMAGE_SIZE or n_train < 1 or n_test < 2 or seed < 0:
        raise ValueError(
            f"need image_size >= {MIN_IMAGE_SIZE}, n_train >= 1, n_test >= 2 (one nominal and one "
            f"defective image) and seed >= 0; got image_size={image_size}, n_train={n_train}, "
            f"n_test={n_test}, seed={seed}"
        )
    root = Path(root).expanduser()
    params = {
        "categories": chosen,
        "image_size": int(image_size),
        "n_train": int(n_train),
        "n_test": int(n_test),
        "seed": int(seed),
    }
    if _reusable(root, params):
        logger.info("reusing the synthetic dataset in %s (same parameters)", root)
        return root
    tasks = [t for c in chosen for t in _plan(c, image_size, n_train, n_test, seed)]
    logger.info(
        "generating %d synthetic images of %dx%d into %s", len(tasks), image_size, image_size, root
    )
    started = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        partial.chmod(0o755)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            written = pool.map(lambda t: _write(t, partial, image_size), tasks)
            if progress:
                from tqdm.auto import tqdm

                label = f"generating {', '.join(chosen)}"
                written = tqdm(written, total=len(tasks), desc=label, unit="image")
            defects = [r for rs in written for r in rs]
        manifest = {
            "generator": GENERATOR,
            "version": VERSION,
            "parameters": params,
            "categories": chosen,
            "defect_kinds": list(KINDS),
            "licence": "Generated by fbft; free of third-party rights except the CC0 texture "
            "sources listed under 'sources'.",
            "sources": {
                c: {k: v for k, v in TEXTURES[c].items() if k != "tint"}
                for c in chosen
                if c in TEXTURES
            },
            "bbox_format": BBOX_FORMAT,
            "images": {"train": len(chosen) * n_train, "test": len(chosen) * n_test},
            "defects": defects,
        }
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.replace(partial, root)
        except OSError:
            if not _reusable(root, params):  # raises unless a concurrent run wrote the same set
                raise
            logger.info("another run wrote the same dataset to %s first; reusing it", root)
            return root
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    logger.info("wrote %s in %.1f s", root, time.perf_counter() - started)
    return root


# ----------------------------------------------------------------------------- command line


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = generate(
            args.root, args.categories, args.image_size, args.n_train, args.n_test, args.seed
        )
    except (DatasetError, ValueError) as err:
        logger.error("fbft synth: error: %s", err)
        return 2
    print(path)
    return 0


def add_synth_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `fbft synth ROOT [--categories ...] [--image-size N] ...`."""
    parser = subparsers.add_parser(
        "synth",
        help="generate the synthetic tiny-defect benchmark (MVTec AD layout)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "root", type=Path, help="folder to create (reused if it holds the same set)"
    )
    parser.add_argument(
        "--categories",
        nargs="+",
        choices=CATEGORIES,
        default=None,
        help="categories to generate (default: all)",
    )
    parser.add_argument(
        "--image-size", type=int, default=1024, help="side in pixels (default 1024)"
    )
    parser.add_argument("--n-train", type=int, default=60, help="training images per category")
    parser.add_argument(
        "--n-test", type=int, default=24, help="test images per category, a third of them nominal"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(func=_run)
    return parser
