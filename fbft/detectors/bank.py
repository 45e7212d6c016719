"""What PatchCore and SPADE share: token -> patch features, settings and their named presets,
the predict loop that turns patch scores into maps at the original size, and the fitted
memory as buffers of a module (saved and loaded as its ``state_dict``).

Patch features: each block's tokens, optionally averaged over a local neighbourhood
(``patch_size``), optionally L2-normalised per token (``normalize``), then (``blocks="both"``)
concatenated. Normalised, both blocks weigh the same and distances lie in [0, 2]; a
concatenated feature's distance is then sqrt(d_j² + d_k²) of the per-block distances.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import UninitializedBuffer

from fbft.core import maps
from fbft.core.config import check_choices, choices
from fbft.core.device import resolve_device, sync
from fbft.detectors.base import BaseDetector, Prediction, TokenPair, Variant
from fbft.detectors.neighbours import DEFAULT_CHUNK
from fbft.detectors.registry import BASELINE_PRESETS
from fbft.detectors.saved import SavedDetector

Blocks = Literal["both", "j", "k"]
Blur = Literal["gaussian4", "official", "none"]
VARIANT_KEYS = ("blur",)


@dataclass(frozen=True)
class BankConfig:
    """Settings both memory-bank methods share.

    ``blocks``: which teacher block's tokens form a patch feature ("both" = j and k
    concatenated); ``normalize``: L2-normalise each block's token first. ``blur``: of the maps —
    ``gaussian4`` (the papers: Gaussian σ = 4 px, reflect padding), ``official`` (FBFT's
    operator) or ``none``. ``chunk``: elements of one distance block (memory bound of the kNN
    and coreset). ``device``: "auto" = CUDA if present. Defaults are the ``fbft-maps`` preset.
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {name: {} for name in BASELINE_PRESETS}

    blocks: Blocks = "both"
    normalize: bool = True
    blur: Blur = "official"
    device: str = "auto"
    chunk: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        check_choices(self)
        if self.chunk < 1:
            raise ValueError(f"chunk must be a positive number of elements, got {self.chunk}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Self:
        """The named preset (``paper``: the published method; ``fbft-maps``: FBFT's maps)."""
        if name not in cls.PRESETS:
            raise ValueError(
                f"unknown {cls.__name__} preset {name!r}; choose one of {', '.join(cls.PRESETS)}"
            )
        return cls(**{**cls.PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _as_float32(array: Any) -> torch.Tensor:
    """One (N, D) token array (numpy, float16/32 memmap or tensor) as a float32 CPU/GPU tensor,
    copied per image only (a read-only memmap is never handed to torch uncopied)."""
    if isinstance(array, torch.Tensor):
        return array.detach().to(torch.float32)
    return torch.from_numpy(np.array(array, dtype=np.float32))


def local_mean(tokens: torch.Tensor, size: int) -> torch.Tensor:
    """(N, D) tokens of a g×g grid -> each averaged over its size×size neighbourhood, zero
    padded and divided by size² at the border (PatchCore's ``patchsize`` aggregation: the
    official unfold + mean mapper, anomalib's ``AvgPool2d(3, 1, 1)``)."""
    if size == 1:
        return tokens
    g, d = grid_of(tokens.shape[0]), tokens.shape[1]
    grid = tokens.T.reshape(1, d, g, g)
    pooled = F.avg_pool2d(grid, size, stride=1, padding=size // 2, count_include_pad=True)
    return pooled.reshape(d, g * g).T


def patch_features(
    pair: TokenPair, blocks: Blocks, normalize: bool, device: torch.device, patch_size: int = 1
) -> torch.Tensor:
    """One image's (f_j, f_k) -> (N, D') float32 patch features on ``device``."""
    f_j, f_k = pair
    if tuple(f_j.shape) != tuple(f_k.shape) or len(f_j.shape) != 2:
        raise ValueError(
            f"a token pair must be two (N, D) arrays of equal shape; got {tuple(f_j.shape)} "
            f"and {tuple(f_k.shape)}"
        )
    chosen = {"both": (f_j, f_k), "j": (f_j,), "k": (f_k,)}[blocks]
    parts = [local_mean(_as_float32(a).to(device), patch_size) for a in chosen]
    if normalize:
        parts = [F.normalize(p, dim=1) for p in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def grid_of(n_tokens: int) -> int:
    """Side g of the square patch grid holding N = g² tokens."""
    g = math.isqrt(n_tokens)
    if g * g != n_tokens:
        raise ValueError(f"{n_tokens} patch tokens do not form a square grid")
    return g


def blur_of(variant: Variant, default: str) -> str:
    """The blur a variant asks for; any other key does not apply to a memory-bank method."""
    for key in variant:
        if key not in VARIANT_KEYS:
            raise ValueError(
                f"variant key {key!r} does not apply to PatchCore/SPADE (only {VARIANT_KEYS})"
            )
    blur = variant.get("blur", default)
    allowed = choices(BankConfig)["blur"]
    if blur not in allowed:
        raise ValueError(f"blur must be one of {', '.join(allowed)}; got {blur!r}")
    return blur


class Memory(nn.Module):
    """The fitted memory (bank, pooled features...) as buffers: its ``state_dict`` is what a
    saved file holds; unfitted buffers are uninitialised, so loading takes any shape."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        for name in names:
            self.register_buffer(name, UninitializedBuffer())


class BankDetector(BaseDetector):
    """Base of the memory-bank detectors: subclasses fill ``_fit`` and ``_score``."""

    config_class: ClassVar[type[BankConfig]] = BankConfig
    buffers: ClassVar[tuple[str, ...]] = ("bank",)

    def __init__(self, config: BankConfig | None = None, teacher: Any = None) -> None:
        self.config = config or self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}")
        self.device = resolve_device(self.config.device)
        self.teacher = teacher
        self.memory = Memory(self.buffers)
        self.grid: int | None = None

    @classmethod
    def from_fbft_config(cls, config: Any, teacher: Any, preset: str | None = None) -> Self:
        """The detector a study trial builds on the shared teacher's tokens: the named preset
        (device and seed from the FBFT config), or with no preset FBFT's own blur."""
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        given = {"device": config.device, "seed": config.seed}
        if preset is None:
            given["blur"] = config.blur
        settings = {k: v for k, v in given.items() if k in names}
        made = cls.config_class.preset(preset, **settings) if preset else None
        return cls(made or cls.config_class(**settings), teacher=teacher)

    @property
    def bank(self) -> torch.Tensor:
        return self.memory.bank

    @property
    def fitted(self) -> bool:
        return self.grid is not None

    # --------------------------------------------------------------- subclasses
    def _fit(self, tokens: Sequence[TokenPair]) -> None:
        raise NotImplementedError

    def _score(self, feats: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        """(N, D') features -> (N,) patch scores, and the image score (None = top-0.1% map)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- interface
    def features(self, pair: TokenPair) -> torch.Tensor:
        """One image's patch features as this detector sees them."""
        c = self.config
        return patch_features(pair, c.blocks, c.normalize, self.device, self._patch_size())

    def _patch_size(self) -> int:
        return 1

    def iter_features(self, tokens: Sequence[TokenPair]) -> Iterator[torch.Tensor]:
        """Patch features image by image (never all images at once), checking one grid."""
        for i, pair in enumerate(tokens):
            grid = grid_of(int(pair[0].shape[0]))
            if self.grid is not None and grid != self.grid:
                raise ValueError(f"image {i}: {grid}x{grid} patches, the detector has {self.grid}")
            self.grid = grid
            yield self.features(pair)

    @torch.no_grad()
    def fit_tokens(self, tokens: Sequence[TokenPair]) -> Self:
        """Build the memory bank from nominal images' token pairs; returns self."""
        if len(tokens) == 0:
            raise ValueError("fit needs at least one nominal training image; got none")
        self.grid = None
        self._fit(tokens)
        sync(self.device)
        return self

    @torch.no_grad()
    def predict_variants(
        self,
        tokens: Sequence[TokenPair],
        sizes: Sequence[tuple[int, int]],
        variants: Sequence[Variant] = ({},),
    ) -> list[Prediction]:
        """Maps at each image's own (H, W) per variant (only ``blur`` varies), one kNN pass."""
        self.check_fitted("predict")
        if len(tokens) != len(sizes):
            raise ValueError(f"got {len(tokens)} token pairs but {len(sizes)} image sizes")
        blurs = [blur_of(v, self.config.blur) for v in variants]
        out = [Prediction(seconds={"knn": 0.0, "maps": 0.0}) for _ in variants]
        for feats, (h, w) in zip(self.iter_features(tokens), sizes, strict=True):
            t0 = time.perf_counter()
            patch, score = self._score(feats)
            patch_map = patch.reshape(self.grid, self.grid)
            sync(self.device)
            t1 = time.perf_counter()
            for pred, blur in zip(out, blurs, strict=True):
                full = maps.anomaly_map(patch_map, int(h), int(w), blur)
                pred.scores.append(maps.image_score(full) if score is None else score)
                pred.maps.append(full.cpu().numpy())
            t2 = time.perf_counter()
            for pred in out:
                pred.seconds["knn"] += (t1 - t0) / len(out)
                pred.seconds["maps"] += (t2 - t1) / len(out)
        return out

    # ------------------------------------------------------ the shared contract
    def _settings(self) -> dict[str, Any]:
        return self.config.to_dict()

    def _state(self) -> dict[str, torch.Tensor]:
        return dict(self.memory.state_dict())

    def _extra(self) -> dict[str, Any]:
        return {"grid": self.grid}

    @classmethod
    def _from_saved(
        cls, saved: SavedDetector, where: str, device: str | None, weights: str | None
    ) -> Self:
        settings = dict(saved.settings)
        if device is not None:
            settings["device"] = device
        can_rebuild = bool(saved.teacher and saved.teacher.get("config"))
        teacher = cls._rebuild_teacher(saved, where, device, weights) if can_rebuild else None
        model = cls(cls.config_class(**settings), teacher)
        model.memory.load_state_dict(saved.state, assign=True)
        model.memory.to(model.device)
        model.grid = int(saved.extra["grid"])
        return model
