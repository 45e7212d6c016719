"""Drawing the synthetic benchmark's images: nominal textures and parts, and defects whose
masks are exactly the pixels they change (see :mod:`fbft.data.synthetic`)."""

from __future__ import annotations

import colorsys
import math

import numpy as np
from scipy import ndimage

from fbft.data.stats import STRUCTURE
from fbft.data.textures import TEXTURES, nominal_image, texture

CATEGORIES = ("brick", "grass", "gravel", "parts")
KINDS = ("color_spot", "scratch", "patch", "blur")
MAX_AREA_FRACTION = 0.03
MIN_CHANGE = {"color_spot": 40, "scratch": 40, "patch": 30, "blur": 20}
_GAP = 2  # pixels kept between two defects so that they never merge into one component


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


def max_area(kind: str, size: int) -> float:
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
        return texture(donor, img.shape[0], rng, shape.shape)[shape]
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
    nominal, anchors = nominal_image(category, size, rng)
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
