"""Tiny random-init teachers and generated images shared by the detector tests."""

from __future__ import annotations

import contextlib
import json

import numpy as np

from fbft import FBFTConfig

TINY = {"depth": 4, "embed_dim": 48, "num_heads": 2}


def tiny_config(**changes) -> FBFTConfig:
    """A DINOv2-shaped 4-block ViT of width 48 at 56 px, random-init, quiet."""
    base = dict(
        backbone="vit_small_patch14_reg4_dinov2",
        weights="random",
        image_size=56,
        layers=(2, 4),
        backbone_kwargs=TINY,
        epochs=15,
        lr=1e-3,
        progress=False,
    )
    return FBFTConfig(**{**base, **changes})


def tiny_flags(epochs: int = 2) -> list[str]:
    """The study command-line flags of the same tiny teacher (random-init, quiet)."""
    return [
        "--backbone", "vit_small_patch14_reg4_dinov2",
        "--backbone-kwargs", json.dumps(TINY),
        "--image-size", "56", "--layers", "2,4", "--epochs", str(epochs), "--weights", "random",
    ]  # fmt: skip


def textures(n: int, seed: int, shape: tuple[int, int] = (56, 56)) -> list[np.ndarray]:
    """Nominal images: a regular grid pattern with mild noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = rng.integers(95, 115, size=(*shape, 3)).astype(np.uint8)
        image[::7] = 60
        image[:, ::7] = 60
        out.append(image)
    return out


def with_defect(image: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A copy with a saturated red square and its mask."""
    y, x, h, w = box
    out = image.copy()
    out[y : y + h, x : x + w] = (230, 20, 20)
    mask = np.zeros(image.shape[:2], bool)
    mask[y : y + h, x : x + w] = True
    return out, mask


@contextlib.contextmanager
def tracking_store(folder, experiment: str):
    """A fresh SQLite MLflow store in ``folder`` (artifacts beside it, never ./mlruns) with
    ``experiment`` active; the global tracking URI is restored afterwards."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{folder}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment(experiment, artifact_location=str(folder / "artifacts"))
    mlflow.set_experiment(experiment)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(previous)
