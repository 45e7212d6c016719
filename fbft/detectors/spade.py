"""SPADE (Cohen & Hoshen, 2020) on FBFT's teacher tokens, for the paper's Table 6.

Image level: a test image's pooled feature (mean of its patch features) is compared with every
nominal image's; its ``image_k`` nearest nominal images give the image score (mean distance,
SPADE's kNN score, ``image_score="knn"``) and, with ``gallery="knn"``, the gallery: the patch
score is the mean distance to the ``patch_k`` nearest patches among those images' patches (any
position), as in the paper. ``gallery="all"`` is the simplified variant: every nominal patch.
``image_score="map"`` scores an image by FBFT's top-0.1% map mean instead. ``per_layer=True``
(the paper): one min-distance map per teacher block, averaged over the blocks, instead of one
kNN over the concatenated blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from fbft.detectors.bank import BankConfig, BankDetector
from fbft.detectors.base import TokenPair
from fbft.detectors.neighbours import knn
from fbft.detectors.registry import register_detector


@dataclass(frozen=True)
class SPADEConfig(BankConfig):
    """``image_k``: K nearest nominal images (paper: 50); ``patch_k``: κ nearest gallery patches
    averaged (paper: 1); ``bank_dtype="float16"`` halves the memory of the stored nominal
    patches (a full VisA category at 1036² and 1536 dims: 15 GB instead of 30); ``per_layer``:
    a map per block, averaged (the paper)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {"per_layer": True, "normalize": False, "blur": "gaussian4"},
        "fbft-maps": {"per_layer": False, "normalize": True, "blur": "official"},
    }

    image_k: int = 50
    patch_k: int = 1
    gallery: Literal["knn", "all"] = "knn"
    image_score: Literal["knn", "map"] = "knn"
    bank_dtype: Literal["float32", "float16"] = "float32"
    per_layer: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_k < 1 or self.patch_k < 1:
            raise ValueError(f"image_k and patch_k must be ≥ 1; got {self.image_k}, {self.patch_k}")


@register_detector("spade")
class SPADE(BankDetector):
    """SPADE on teacher tokens: ``SPADE(SPADEConfig()).fit_tokens(train_tokens)``."""

    config_class = SPADEConfig
    config: SPADEConfig
    buffers = ("bank", "pooled")  # (images, N, D') nominal patch features; (images, D') means

    def _fit(self, tokens: Sequence[TokenPair]) -> None:
        dtype = getattr(torch, self.config.bank_dtype)
        for i, feats in enumerate(self.iter_features(tokens)):
            if i == 0:
                n, d = len(tokens), feats.shape[1]
                self.memory.bank = torch.empty(
                    n, feats.shape[0], d, dtype=dtype, device=self.device
                )
                self.memory.pooled = torch.empty(n, d, device=self.device)
            self.memory.bank[i] = feats
            self.memory.pooled[i] = feats.mean(0)

    def _score(self, feats: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        cfg = self.config
        pooled = self.memory.pooled
        k = min(cfg.image_k, pooled.shape[0])
        image_d, nearest = knn(feats.mean(0, keepdim=True), pooled, k, cfg.chunk)
        images = self.bank if cfg.gallery == "all" else self.bank[nearest[0]]
        gallery = images.flatten(0, 1)
        patch_k = min(cfg.patch_k, gallery.shape[0])
        blocks = 2 if cfg.per_layer and cfg.blocks == "both" else 1
        maps = [
            knn(q, g, patch_k, cfg.chunk)[0].mean(1)
            for q, g in zip(feats.chunk(blocks, 1), gallery.chunk(blocks, 1), strict=True)
        ]
        score = float(image_d.double().mean()) if cfg.image_score == "knn" else None
        return torch.stack(maps).mean(0), score
