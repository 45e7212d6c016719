"""PatchCore (Roth et al., CVPR 2022) on FBFT's teacher tokens, for the paper's Table 6.

Memory bank = every nominal patch feature (see :mod:`fbft.detectors.bank`; ``patch_size=3``
averages each token over its 3×3 neighbourhood first, as the official code's ``patchsize=3``),
subsampled by greedy k-center (the approximate variant of the paper: selection on a seeded
Gaussian random projection to ``projection_dim`` dims, exact when ``projection_dim`` is None or
≥ the feature width; no selection at ``coreset_ratio=1``). Patch score = euclidean distance to
the nearest bank entry.

Image score (``Prediction.scores``): ``scorer="max"`` the largest patch score (the official
code's released configs, ``--anomaly_scorer_num_nn 1``); ``"reweighted"`` the paper's eq. 7 (as
anomalib computes it): s* = ‖m_test* − m*‖ reweighted by w = 1 − softmax(‖m_test* − m‖ over
m ∈ N_b(m*))[m*], N_b(m*) the ``neighbours`` bank entries nearest to m* (m* included). Maps:
upsample to the padded square, ``blur``, crop (:func:`fbft.core.maps.anomaly_map`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from fbft.detectors.bank import BankConfig, BankDetector
from fbft.detectors.base import TokenPair
from fbft.detectors.neighbours import greedy_coreset, knn, random_projection
from fbft.detectors.registry import register_detector


@dataclass(frozen=True)
class PatchCoreConfig(BankConfig):
    """``coreset_ratio``: bank fraction kept; ``projection_dim``: width of the random projection
    the coreset is selected on (None = exact greedy on full features); ``patch_size``: 1 or 3
    (local aggregation); ``scorer``: ``max`` or ``reweighted`` (eq. 7 with ``neighbours`` = b);
    ``seed``: projection and first coreset centre."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": dict(patch_size=3, normalize=False, scorer="max", blur="gaussian4"),
        "fbft-maps": dict(patch_size=1, normalize=True, scorer="reweighted", blur="official"),
    }

    coreset_ratio: float = 0.1
    projection_dim: int | None = 128
    patch_size: Literal[1, 3] = 1
    scorer: Literal["max", "reweighted"] = "reweighted"
    neighbours: int = 9
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"projection_dim must be positive or None, got {self.projection_dim}")
        if self.neighbours < 1:
            raise ValueError(f"neighbours must be ≥ 1, got {self.neighbours}")


@register_detector("patchcore")
class PatchCore(BankDetector):
    """PatchCore on teacher tokens: ``PatchCore(PatchCoreConfig()).fit_tokens(train_tokens)``."""

    config_class = PatchCoreConfig
    config: PatchCoreConfig

    def _patch_size(self) -> int:
        return self.config.patch_size

    def _fit(self, tokens: Sequence[TokenPair]) -> None:
        cfg = self.config
        counts = [int(pair[0].shape[0]) for pair in tokens]
        total = sum(counts)
        size = min(total, max(1, math.ceil(cfg.coreset_ratio * total)))
        if size == total:
            self.memory.bank = self._all_features(tokens, total, project=False)[0]
            return
        reduced, projected = self._all_features(tokens, total, project=True)
        start = int(torch.randint(total, (1,), generator=torch.Generator().manual_seed(cfg.seed)))
        chosen = greedy_coreset(reduced, size, start, cfg.chunk)
        if projected:
            del reduced
            self.memory.bank = self._gather(tokens, chosen.cpu(), counts)
        else:
            self.memory.bank = reduced[chosen]

    def _all_features(
        self, tokens: Sequence[TokenPair], total: int, project: bool
    ) -> tuple[torch.Tensor, bool]:
        """Every nominal feature in one preallocated (total, width) tensor, randomly projected
        when ``project`` and that narrows them: (rows, projected)."""
        cfg, out, proj, offset = self.config, torch.empty(0), None, 0
        for i, feats in enumerate(self.iter_features(tokens)):
            if i == 0:
                width = feats.shape[1]
                if project and cfg.projection_dim is not None and cfg.projection_dim < width:
                    proj = random_projection(width, cfg.projection_dim, cfg.seed, feats.device)
                    width = cfg.projection_dim
                out = torch.empty(total, width, device=feats.device)
            out[offset : offset + feats.shape[0]] = feats if proj is None else feats @ proj
            offset += feats.shape[0]
        return out, proj is not None

    def _gather(
        self, tokens: Sequence[TokenPair], chosen: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """Full-width features of the chosen rows (second pass over the tokens, sorted order)."""
        chosen, offset, out = chosen.sort().values, 0, torch.empty(0)
        for i, (feats, count) in enumerate(zip(self.iter_features(tokens), counts, strict=True)):
            if i == 0:
                out = torch.empty(len(chosen), feats.shape[1], device=feats.device)
            lo, hi = torch.searchsorted(chosen, torch.tensor([offset, offset + count])).tolist()
            out[lo:hi] = feats[(chosen[lo:hi] - offset).to(feats.device)]
            offset += count
        return out

    def _score(self, feats: torch.Tensor) -> tuple[torch.Tensor, float]:
        dist, idx = knn(feats, self.bank, 1, self.config.chunk)
        patch = dist[:, 0]
        return patch, self._image_score(feats, patch, idx[:, 0])

    def _image_score(
        self, feats: torch.Tensor, patch: torch.Tensor, nearest: torch.Tensor
    ) -> float:
        """The largest patch score, reweighted (paper eq. 7, anomalib's computation) unless
        ``scorer="max"`` (or b = 1)."""
        b = min(self.config.neighbours, self.bank.shape[0])
        top = int(patch.argmax())
        if b == 1 or self.config.scorer == "max":
            return float(patch[top])
        m_star = self.bank[nearest[top]].to(torch.float32)
        _, support = knn(m_star[None], self.bank, b, self.config.chunk)
        d = torch.linalg.vector_norm(self.bank[support[0]].float() - feats[top], dim=1)
        weight = 1 - torch.softmax(d.double(), 0)[0]
        return float(weight * patch[top].double())
