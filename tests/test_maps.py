"""Each fbft.core.maps function against a slow, obvious implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fbft.core import maps


def test_pad_to_square_centres_and_replicates_edges():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(5, 8, 3), dtype=np.uint8)
    square, (top, left) = maps.pad_to_square(image)
    assert square.shape == (8, 8, 3) and (top, left) == (1, 0)
    for y in range(8):
        for x in range(8):
            src_y = min(max(y - top, 0), 4)
            assert (square[y, x] == image[src_y, x]).all()
    tall = rng.integers(0, 256, size=(9, 4, 3), dtype=np.uint8)
    square, (top, left) = maps.pad_to_square(tall)
    assert square.shape == (9, 9, 3) and (top, left) == (0, 2)
    assert (square[:, :2] == tall[:, :1]).all() and (square[:, 7:] == tall[:, 3:]).all()


def test_as_rgb_replicates_grayscale_and_rejects_bad_input():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = maps.as_rgb(gray)
    assert rgb.shape == (3, 4, 3) and (rgb[..., 2] == gray).all()
    with pytest.raises(ValueError, match="uint8"):
        maps.as_rgb(np.zeros((3, 4, 3), np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        maps.as_rgb(np.zeros((3, 4, 4), np.uint8))


def test_preprocess_normalises_a_constant_image():
    image = np.full((10, 6, 3), 128, np.uint8)
    x = maps.preprocess(image, 28, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.shape == (3, 28, 28)
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.25), atol=1e-6)


def test_discrepancy_and_fusion_per_token():
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
    l2 = maps.discrepancy(torch.tensor(pred), torch.tensor(target), "l2").numpy()
    cos = maps.discrepancy(torch.tensor(pred), torch.tensor(target), "cosine").numpy()
    for b in range(2):
        for n in range(5):
            p, t = pred[b, n], target[b, n]
            unit = p / np.linalg.norm(p) - t / np.linalg.norm(t)
            assert l2[b, n] == pytest.approx(np.sqrt((unit**2).sum()))
            assert cos[b, n] == pytest.approx(1 - p @ t / np.linalg.norm(p) / np.linalg.norm(t))
    dj, dk = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    assert maps.fuse(dj, dk, "product").tolist() == [3.0, 10.0]
    assert maps.fuse(dj, dk, "sum").tolist() == [4.0, 7.0]
    assert maps.fuse(dj, dk, "j").tolist() == [1.0, 2.0]
    assert maps.fuse(dj, dk, "k").tolist() == [3.0, 5.0]
    with pytest.raises(ValueError, match="fusion"):
        maps.fuse(dj, dk, "max")


def slow_bilinear(grid: np.ndarray, side: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), border-clamped."""
    g = grid.shape[0]
    out = np.zeros((side, side))
    scale = g / side
    for y in range(side):
        for x in range(side):
            sy = max((y + 0.5) * scale - 0.5, 0.0)
            sx = max((x + 0.5) * scale - 0.5, 0.0)
            y0, x0 = min(int(sy), g - 1), min(int(sx), g - 1)
            y1, x1 = min(y0 + 1, g - 1), min(x0 + 1, g - 1)
            wy, wx = sy - y0, sx - x0
            top = grid[y0, x0] * (1 - wx) + grid[y0, x1] * wx
            bottom = grid[y1, x0] * (1 - wx) + grid[y1, x1] * wx
            out[y, x] = top * (1 - wy) + bottom * wy
    return out


def slow_box(image: np.ndarray, side: int) -> np.ndarray:
    """Mean over a side×side window centred on each pixel, zeros outside."""
    r = side // 2
    h, w = image.shape
    out = np.zeros_like(image)
    for y in range(h):
        for x in range(w):
            total = 0.0
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    if 0 <= y + dy < h and 0 <= x + dx < w:
                        total += image[y + dy, x + dx]
            out[y, x] = total / side**2
    return out


def slow_pipeline(grid: np.ndarray, height: int, width: int, blur: bool) -> np.ndarray:
    side = max(height, width)
    square = slow_bilinear(grid, side)
    if blur:
        for box, passes in ((5, 5), (7, 3)):
            for _ in range(passes):
                square = slow_box(square, box)
    top, left = (side - height) // 2, (side - width) // 2
    return square[top : top + height, left : left + width]


@pytest.mark.parametrize(("height", "width"), [(13, 9), (8, 15), (12, 12)])
@pytest.mark.parametrize("blur", ["official", "none"])
def test_map_is_upsampled_blurred_and_cropped_like_the_official_steps(height, width, blur):
    rng = np.random.default_rng(3)
    grid = rng.random((4, 4))
    ours = maps.anomaly_map(torch.tensor(grid), height, width, blur).numpy()
    assert ours.shape == (height, width) and ours.dtype == np.float32
    expected = slow_pipeline(grid, height, width, blur == "official")
    assert np.allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_maps_keep_the_original_size_and_reject_unknown_blur():
    patch = torch.rand(4, 4)
    assert maps.anomaly_map(patch, 130, 90).shape == (130, 90)
    assert maps.anomaly_map(patch, 7, 30).shape == (7, 30)
    with pytest.raises(ValueError, match="blur"):
        maps.anomaly_map(patch, 7, 30, "gaussian")


def test_image_score_is_mean_of_top_share():
    rng = np.random.default_rng(4)
    m = rng.random((50, 60))  # 3000 px -> top 3
    expected = np.sort(m.ravel())[-3:].mean()
    assert maps.image_score(m) == pytest.approx(expected)
    assert maps.image_score(torch.tensor(m)) == pytest.approx(expected)
    small = rng.random((10, 10))  # int(0.1) = 0 -> at least one value: the max
    assert maps.image_score(small) == pytest.approx(small.max())
