"""Figures a person looks at in MLflow: overlays, PRO curves, quartile charts, study summaries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from scipy import ndimage

from fbft.metrics import Curves

ColourRange = tuple[float, float]


def color_range(
    values: np.ndarray | Sequence[np.ndarray], low: float = 0.01, high: float = 0.999
) -> ColourRange:
    """One colour scale for many maps: the ``low``..``high`` quantiles of nominal pixels.

    A shared scale makes maps comparable (a per-map min..max paints every nominal image as if
    it had a defect). Over 10 M values, every k-th value is used (memory and time bound).
    """
    flat = (
        np.asarray(values, dtype=np.float32).ravel()
        if isinstance(values, np.ndarray)
        else np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in values])
    )
    if flat.size == 0:
        raise ValueError("color_range needs at least one value")
    flat = flat[:: max(1, flat.size // 10_000_000)]
    vmin, vmax = (float(v) for v in np.quantile(flat, [low, high]))
    return vmin, vmax if vmax > vmin else vmin + 1e-6


def heat(ax, image: np.ndarray, anomaly_map: np.ndarray, clim: ColourRange | None):
    """The map over the image in jet at half opacity on ``clim`` (the map's own range if None)."""
    ax.imshow(image)
    vmin, vmax = clim if clim is not None else (None, None)
    return ax.imshow(anomaly_map, cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)


def overlay_figure(
    image: np.ndarray,
    mask: np.ndarray,
    anomaly_map: np.ndarray,
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    inset: bool = True,
) -> Figure:
    """Image | ground truth | anomaly map over the image on the colour range ``vmin..vmax``.

    Boxes mark every defect (tiny ones vanish at figure scale); the map panel zooms into the
    smallest defect in an inset.
    """
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 3)
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(image)
    if mask.any():
        axes[1].contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
    labeled, count = ndimage.label(mask, structure=np.ones((3, 3)))
    boxes = [_box(rows, cols) for rows, cols in ndimage.find_objects(labeled)]
    for corner, side in boxes[:50]:
        for ax in axes[1:]:
            ax.add_patch(Rectangle(corner, side, side, fill=False, ec="yellow", lw=0.8))
    axes[1].set_title(f"ground truth: {count} defect(s), {int(mask.sum())} px")
    clim = None if vmin is None or vmax is None else (vmin, vmax)
    shown = heat(axes[2], image, anomaly_map, clim)
    fig.colorbar(shown, ax=axes[2], fraction=0.046)
    axes[2].set_title("anomaly map")
    if inset and boxes:
        sizes = ndimage.sum_labels(mask, labeled, range(1, count + 1))
        zoom_inset(axes[2], image, anomaly_map, mask, boxes[int(np.argmin(sizes))], clim)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title)
    return fig


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    anomaly_map: np.ndarray,
    path: Path,
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    inset: bool = True,
) -> Path:
    """:func:`overlay_figure` written to ``path``."""
    return save_figure(overlay_figure(image, mask, anomaly_map, title, vmin, vmax, inset), path)


def zoom_inset(ax, image, anomaly_map, mask, box: tuple[tuple[float, float], float], clim):
    """A magnified copy of ``ax``'s map around ``box`` ((x, y) corner, side) in its corner."""
    (x0, y0), side = box
    inner = ax.inset_axes([0.62, 0.62, 0.36, 0.36])
    heat(inner, image, anomaly_map, clim)
    inner.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
    inner.set_xlim(x0, x0 + side)
    inner.set_ylim(y0 + side, y0)
    inner.set_xticks([])
    inner.set_yticks([])
    ax.indicate_inset_zoom(inner, edgecolor="yellow")
    return inner


def overlay_pixels(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    clim: ColourRange,
    pixel_threshold: float | None = None,
    score: float | None = None,
    image_threshold: float | None = None,
) -> np.ndarray:
    """Image | jet map blended over it at full resolution, outlined in white where the map
    passes ``pixel_threshold``, above a legend (the image score and its decision, the colour bar
    of ``clim``, what the outline means): a uint8 RGB array, ~100x faster than a matplotlib
    figure."""
    blend = (0.5 * image + 0.5 * _jet(anomaly_map, clim)).astype(np.uint8)
    if pixel_threshold is not None:
        mask = anomaly_map > pixel_threshold
        blend[mask & ~ndimage.binary_erosion(mask, border_value=1)] = 255
    panels = np.concatenate([image, blend], axis=1)
    legend = legend_strip(max(panels.shape[1], LEGEND_WIDTH), clim, pixel_threshold, score,
                          image_threshold)  # fmt: skip
    out = np.zeros((panels.shape[0] + legend.shape[0], legend.shape[1], 3), dtype=np.uint8)
    out[: panels.shape[0], : panels.shape[1]] = panels
    out[panels.shape[0] :] = legend
    return out


LEGEND_WIDTH, LEGEND_HEIGHT = 520, 60  # px; an overlay narrower than this is padded on the right


def _jet(values: np.ndarray, clim: ColourRange) -> np.ndarray:
    from matplotlib import colormaps

    vmin, vmax = clim
    return colormaps["jet"](np.clip((values - vmin) / (vmax - vmin), 0, 1))[..., :3] * 255


def legend_strip(
    width: int,
    clim: ColourRange,
    pixel_threshold: float | None,
    score: float | None,
    image_threshold: float | None,
) -> np.ndarray:
    """A ``LEGEND_HEIGHT`` x ``width`` strip: score (and decision) and the outline's meaning on
    top, the colour bar of ``clim`` with the pixel threshold marked below."""
    from PIL import Image, ImageDraw, ImageFont

    vmin, vmax = clim
    strip = Image.new("RGB", (width, LEGEND_HEIGHT), "black")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=13)
    if score is not None:
        verdict = ""
        if image_threshold is not None:
            above = score > image_threshold
            verdict = (
                f": {'anomalous, >' if above else 'normal, ≤'} threshold {image_threshold:.4g}"
            )
        draw.text((6, 3), f"image score {score:.4g}{verdict}", fill="white", font=font)
    if pixel_threshold is not None:
        text = f"white outline: pixels > {pixel_threshold:.4g}"
        draw.text((width - 6, 3), text, fill="white", font=font, anchor="ra")
    left, right, top, bottom = 6, width - 6, 22, 38
    bar = _jet(np.linspace(vmin, vmax, right - left)[None, :], clim).astype(np.uint8)
    strip.paste(Image.fromarray(np.repeat(bar, bottom - top, axis=0)), (left, top))
    draw.text((left, bottom + 2), f"{vmin:.4g}", fill="white", font=font, anchor="la")
    draw.text((right, bottom + 2), f"{vmax:.4g}", fill="white", font=font, anchor="ra")
    if pixel_threshold is not None and vmin < pixel_threshold < vmax:
        x = left + round((pixel_threshold - vmin) / (vmax - vmin) * (right - left - 1))
        draw.line([(x, top - 2), (x, bottom + 1)], fill="white", width=2)
        draw.text((x, bottom + 2), f"{pixel_threshold:.4g}", fill="white", font=font, anchor="ma")
    return np.asarray(strip)


def pro_curves(
    curves: Curves,
    path: Path,
    max_fpr: float = 0.3,
    title: str = "",
    metrics: Mapping[str, float] | None = None,
) -> Path:
    """PRO against FPR for the cumulative quartiles Q1..Q4, up to ``max_fpr``; the title names
    the category and, given ``metrics``, its AUPRO@30% and AUPRO@5%."""
    fpr, pros = curves.up_to(max_fpr)
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    for name, pro in pros.items():
        ax.plot(fpr, pro, label=name.upper())
    for limit in (0.05, 0.3):
        if limit <= max_fpr:
            ax.axvline(limit, color="grey", lw=0.6, ls=":")
    ax.set(xlabel="false positive rate", ylabel="per-region overlap", xlim=(0, max_fpr))
    ax.set_ylim(0, 1)
    ax.legend(title="components ≤ quartile")
    ax.set_title(pro_title(title, metrics), fontsize=10)
    return save_figure(fig, path)


def pro_title(title: str, metrics: Mapping[str, float] | None) -> str:
    """``"grid · AUPRO@30% 0.812 · AUPRO@5% 0.403"`` (parts present in ``metrics`` only)."""
    parts = [title] if title else []
    for lim in ("30", "5"):
        if metrics and f"aupro_{lim}" in metrics:
            parts.append(f"AUPRO@{lim}% {metrics[f'aupro_{lim}']:.3f}")
    return " · ".join(parts)


def quartile_chart(metrics: Mapping[str, float], path: Path, title: str = "") -> Path:
    """AUPRO@30% and AUPRO@5% for Q1..Q4 with value labels; ρ in the legend above the axes."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    x = np.arange(4)
    for offset, lim in ((-0.2, "30"), (0.2, "5")):
        values = [float(metrics[f"aupro_{lim}_q{i}"]) for i in range(1, 5)]
        bars = ax.bar(
            x + offset,
            np.nan_to_num(values),
            0.4,
            edgecolor="black",  # a zero bar still shows as a line
            linewidth=0.6,
            label=f"AUPRO@{lim}%  (ρ = {metrics[f'rho_{lim}']:.3f})",
        )
        ax.bar_label(bars, labels=bar_labels(values), padding=2, fontsize=8)
    ax.set_xticks(x, ["Q1", "Q2", "Q3", "Q4"])
    ax.set(ylim=(0, 1.1), ylabel="AUPRO")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def bar_labels(values: Sequence[float]) -> list[str]:
    """Two decimals per bar; ``n/a`` for NaN (a quartile without defects)."""
    return ["n/a" if np.isnan(v) else f"{v:.2f}" for v in values]


def summary(
    rows: Sequence[Mapping[str, float]],
    setting: str,
    metrics: Mapping[str, str],
    path: Path,
    xlabel: str = "",
    protocol: str = "",
) -> Path:
    """Headline metrics (means over categories) against the study's varied setting, with the
    std over seeds as error bars where a row has one (``<key>_std``)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    labels = [str(r[setting]) for r in rows]
    for key, name in metrics.items():
        errors = [r.get(f"{key}_std", np.nan) for r in rows]
        shown = None if all(not np.isfinite(e) for e in errors) else np.nan_to_num(errors)
        ax.errorbar(labels, [r[key] for r in rows], yerr=shown, marker="o", capsize=3, label=name)
    ax.set(xlabel=xlabel or setting, ylabel="mean over categories", ylim=(0, 1.02))
    if protocol:
        ax.set_title(f"{protocol} AUPRO protocol", fontsize=9)
    ax.legend()
    return save_figure(fig, path)


def _box(rows: slice, cols: slice) -> tuple[tuple[float, float], float]:
    """A square around a component, at least 24 px wide: ((x, y) corner, side)."""
    half = max(12, (rows.stop - rows.start) // 2 + 4, (cols.stop - cols.start) // 2 + 4)
    return ((cols.start + cols.stop) / 2 - half, (rows.start + rows.stop) / 2 - half), 2 * half


def save_figure(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
