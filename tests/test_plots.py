"""Figures: fixed colour scales, the zoom inset, titled PRO curves, labelled quartile bars."""

from __future__ import annotations

import numpy as np
import pytest

from fbft import plots
from fbft.metrics import Curves
from fbft.metrics.quartiles import QUARTILES


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    mask = np.zeros((120, 160), bool)
    mask[10:40, 10:40] = True  # big defect
    mask[90:93, 130:133] = True  # small defect: the inset zooms here
    amap = rng.random((120, 160)).astype(np.float32)
    return image, mask, amap


def test_color_range_is_quantiles_of_all_values():
    maps = [np.linspace(0, 1, 1001), np.linspace(1, 2, 1001)]
    vmin, vmax = plots.color_range(maps, low=0.0, high=1.0)
    assert (vmin, vmax) == (0.0, 2.0)
    assert plots.color_range(np.full((4, 4), 3.0))[1] > 3.0  # constant maps get a real range


def test_overlay_uses_the_given_colour_range_and_zooms_into_the_smallest_defect(tmp_path):
    image, mask, amap = _scene()
    fig = plots.overlay_figure(image, mask, amap, "t", vmin=0.2, vmax=0.7)
    map_ax = fig.axes[2]
    assert map_ax.images[-1].get_clim() == (0.2, 0.7)
    (inset,) = map_ax.child_axes
    assert inset.images[-1].get_clim() == (0.2, 0.7)
    x0, x1 = inset.get_xlim()
    assert x0 <= 130 and x1 >= 133 and x1 - x0 == 24  # the 3x3 defect, not the 30x30 one
    path = plots.overlay(image, mask, amap, tmp_path / "o.png", "t", vmin=0.2, vmax=0.7)
    assert path.stat().st_size > 0


def test_overlay_without_defect_or_range_still_draws(tmp_path):
    image, _, amap = _scene()
    fig = plots.overlay_figure(image, np.zeros(amap.shape, bool), amap)
    assert not fig.axes[2].child_axes
    assert fig.axes[2].images[-1].get_clim() == pytest.approx((amap.min(), amap.max()))


def test_pro_curves_title_and_quartile_labels(tmp_path):
    fpr = np.linspace(0, 1, 11)
    curves = Curves(fpr, {q: fpr**0.5 for q in QUARTILES}, fpr, fpr)
    assert plots.pro_title("grid", {"aupro_30": 0.5, "aupro_5": 0.25}) == (
        "grid · AUPRO@30% 0.500 · AUPRO@5% 0.250"
    )
    plots.pro_curves(curves, tmp_path / "pro.png", title="grid", metrics={"aupro_30": 0.5})
    metrics = {f"aupro_{lim}_q{i}": 0.2 * i for lim in ("30", "5") for i in range(1, 5)}
    metrics |= {"aupro_5_q1": 0.0, "aupro_30_q1": float("nan"), "rho_30": 0.1, "rho_5": 0.2}
    plots.quartile_chart(metrics, tmp_path / "q.png", title="grid")
    assert plots.bar_labels([0.0, float("nan"), 0.456]) == ["0.00", "n/a", "0.46"]
    assert (tmp_path / "pro.png").stat().st_size > 0 and (tmp_path / "q.png").stat().st_size > 0
