"""SPADE (Cohen & Hoshen, 2020) on FBFT's teacher tokens, for the paper's Table 6.

Image level: a test image's pooled feature (mean of its patch features) is compared with every
nominal image's; its ``image_k`` nearest nominal images give the image score (mean distance,
SPADE's kNN score, ``image_score="knn"``) and, with ``gallery="knn"``, the gallery: the patch
score is the mean distance to the ``patch_k`` nearest patches among those images' patches (any
position), as in the paper. ``gallery="all"`` is the simplified variant: every nominal patch.
``image_score="map"`` scores an image by FBFT's top-0.1% map mean instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fbft.detectors.bank import BankConfig, BankDetector, _choice
from fbft.detectors.base import TokenPair
from fbft.detectors.neighbours import knn
from fbft.detectors.registry import register_detector


@dataclass(frozen=True)
class SPADEConfig(BankConfig):
    """``image_k``: K nearest nominal images (paper: 50); ``patch_k``: κ nearest gallery patches
    averaged (paper: 1); ``bank_dtype="float16"`` halves the memory of the stored nominal
    patches (a full VisA category at 1036² and 1536 dims: 15 GB instead of 30)."""

    image_k: int = 50
    patch_k: int = 1
    gallery: Literal["knn", "all"] = "knn"
    image_score: Literal["knn", "map"] = "knn"
    bank_dtype: Literal["float32", "float16"] = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("gallery", self.gallery, ("knn", "all"))
        _choice("image_score", self.image_score, ("knn", "map"))
        _choice("bank_dtype", self.bank_dtype, ("float32", "float16"))
        if self.image_k < 1 or self.patch_k < 1:
            raise ValueError(f"image_k and patch_k must be ≥ 1; got {self.image_k}, {self.patch_k}")


@register_detector("spade")
class SPADE(BankDetector):
    """SPADE on teacher tokens: ``SPADE(SPADEConfig()).fit_tokens(train_tokens)``."""

    config_class = SPADEConfig
    config: SPADEConfig

    def __init__(self, config: SPADEConfig | None = None, teacher: dict | None = None) -> None:
        super().__init__(config, teacher)
        self.bank = torch.empty(0)  # (images, N, D') nominal patch features
        self.pooled = torch.empty(0)  # (images, D') their means

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank, "pooled": self.pooled}

    def _fit(self, tokens: Sequence[TokenPair]) -> None:
        dtype = getattr(torch, self.config.bank_dtype)
        for i, feats in enumerate(self.iter_features(tokens)):
            if i == 0:
                n, d = len(tokens), feats.shape[1]
                self.bank = torch.empty(n, feats.shape[0], d, dtype=dtype, device=self.device)
                self.pooled = torch.empty(n, d, device=self.device)
            self.bank[i] = feats
            self.pooled[i] = feats.mean(0)

    def _score(self, feats: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        cfg = self.config
        k = min(cfg.image_k, self.pooled.shape[0])
        image_d, nearest = knn(feats.mean(0, keepdim=True), self.pooled, k, cfg.chunk)
        images = self.bank if cfg.gallery == "all" else self.bank[nearest[0]]
        gallery = images.flatten(0, 1)
        dist, _ = knn(feats, gallery, min(cfg.patch_k, gallery.shape[0]), cfg.chunk)
        score = float(image_d.double().mean()) if cfg.image_score == "knn" else None
        return dist.mean(1), score
