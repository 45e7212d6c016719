"""The synthetic benchmark's nominal images: CC0 textures from scikit-image, tinted and lit,
and shaded multi-instance parts (see :mod:`fbft.data.synthetic`)."""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np
import skimage.data
from scipy import ndimage

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
_BEVEL = 0.006  # darkened rim of a part, as a share of the image side


@cache
def _texture_source(name: str) -> np.ndarray:
    """The scikit-image texture as float32 in [0, 1]."""
    return getattr(skimage.data, name)().astype(np.float32) / 255.0


def texture(name: str, size: int, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
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


def nominal_image(category: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """A defect-free uint8 image of `category` and the part anchors (empty for textures)."""
    if category == "parts":
        img, anchors = _parts(size, rng)
    else:
        img, anchors = texture(category, size, rng, (size, size)), []
    np.clip(np.rint(img, out=img), 0, 255, out=img)
    return img.astype(np.uint8), anchors


# ----------------------------------------------------------------------------- defect shapes
