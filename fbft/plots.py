"""Figures a person looks at in MLflow: overlays, PRO curves, quartile charts, study summaries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from scipy import ndimage

from fbft.metrics import Curves


def overlay(
    image: np.ndarray, mask: np.ndarray, anomaly_map: np.ndarray, path: Path, title: str = ""
) -> Path:
    """Image | ground truth | anomaly map over the image, side by side."""
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 3)
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(image)
    if mask.any():
        axes[1].contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
    labeled, count = ndimage.label(mask, structure=np.ones((3, 3)))
    for rows, cols in ndimage.find_objects(labeled)[:50]:  # boxes find the tiny defects
        half = max(12, (rows.stop - rows.start) // 2 + 4, (cols.stop - cols.start) // 2 + 4)
        corner = ((cols.start + cols.stop) / 2 - half, (rows.start + rows.stop) / 2 - half)
        for ax in axes[1:]:
            ax.add_patch(Rectangle(corner, 2 * half, 2 * half, fill=False, ec="yellow", lw=0.8))
    axes[1].set_title(f"ground truth: {count} defect(s), {int(mask.sum())} px")
    axes[2].imshow(image)
    shown = axes[2].imshow(anomaly_map, cmap="jet", alpha=0.5)
    fig.colorbar(shown, ax=axes[2], fraction=0.046)
    axes[2].set_title("anomaly map")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title)
    return _save(fig, path)


def pro_curves(curves: Curves, path: Path, max_fpr: float = 0.3) -> Path:
    """PRO against FPR for the cumulative quartiles Q1..Q4, up to ``max_fpr``."""
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
    return _save(fig, path)


def quartile_chart(metrics: Mapping[str, float], path: Path) -> Path:
    """AUPRO@30% and AUPRO@5% for Q1..Q4, with ρ in the legend."""
    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    x = np.arange(4)
    for offset, lim in ((-0.2, "30"), (0.2, "5")):
        values = [metrics[f"aupro_{lim}_q{i}"] for i in range(1, 5)]
        ax.bar(x + offset, values, 0.4, label=f"AUPRO@{lim}%  (ρ = {metrics[f'rho_{lim}']:.3f})")
    ax.set_xticks(x, ["Q1", "Q2", "Q3", "Q4"])
    ax.set(ylim=(0, 1), ylabel="AUPRO")
    ax.legend(loc="lower right")
    return _save(fig, path)


def summary(
    rows: Sequence[Mapping[str, float]], setting: str, metrics: Mapping[str, str], path: Path
) -> Path:
    """Headline metrics (means over categories) against the study's varied setting."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    labels = [str(r[setting]) for r in rows]
    for key, name in metrics.items():
        ax.plot(labels, [r[key] for r in rows], marker="o", label=name)
    ax.set(xlabel=setting, ylabel="mean over categories", ylim=(0, 1.02))
    ax.legend()
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
