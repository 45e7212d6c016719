"""What PatchCore and SPADE share: token -> patch features, settings, the predict loop that
turns patch scores into FBFT's maps (same upsample + blur + crop), and save / load / describe.

Patch features: each block's tokens are L2-normalised per token, then (``blocks="both"``) the
two are concatenated, so both blocks weigh the same and distances lie in [0, 2] (ViT token
norms vary widely between patches, which would otherwise dominate the kNN). A concatenated
feature's distance is sqrt(d_j² + d_k²) of the per-block unit-vector distances.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import numpy as np
import torch
import torch.nn.functional as F

from fbft.core import maps
from fbft.core.device import resolve_device, sync
from fbft.detectors.base import Prediction, TokenPair, Variant, load_state, save_state
from fbft.detectors.neighbours import DEFAULT_CHUNK

FORMAT_VERSION = 1
Blocks = Literal["both", "j", "k"]
Blur = Literal["official", "none"]
VARIANT_KEYS = ("blur",)


@dataclass(frozen=True)
class BankConfig:
    """Settings both memory-bank methods share.

    ``blocks``: which teacher block's tokens form a patch feature ("both" = j and k, each
    L2-normalised, concatenated); ``normalize=False`` keeps raw tokens. ``chunk``: elements of
    one distance block (memory bound of the kNN and coreset). ``device``: "auto" = CUDA if present.
    """

    blocks: Blocks = "both"
    normalize: bool = True
    blur: Blur = "official"
    device: str = "auto"
    chunk: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        _choice("blocks", self.blocks, ("both", "j", "k"))
        _choice("blur", self.blur, ("official", "none"))
        if self.chunk < 1:
            raise ValueError(f"chunk must be a positive number of elements, got {self.chunk}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _as_float32(array: Any) -> torch.Tensor:
    """One (N, D) token array (numpy, float16/32 memmap or tensor) as a float32 CPU/GPU tensor,
    copied per image only (a read-only memmap is never handed to torch uncopied)."""
    if isinstance(array, torch.Tensor):
        return array.detach().to(torch.float32)
    return torch.from_numpy(np.array(array, dtype=np.float32))


def patch_features(
    pair: TokenPair, blocks: Blocks, normalize: bool, device: torch.device
) -> torch.Tensor:
    """One image's (f_j, f_k) -> (N, D') float32 patch features on ``device``."""
    f_j, f_k = pair
    if tuple(f_j.shape) != tuple(f_k.shape) or len(f_j.shape) != 2:
        raise ValueError(
            f"a token pair must be two (N, D) arrays of equal shape; got {tuple(f_j.shape)} "
            f"and {tuple(f_k.shape)}"
        )
    chosen = {"both": (f_j, f_k), "j": (f_j,), "k": (f_k,)}[blocks]
    parts = [_as_float32(a).to(device) for a in chosen]
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
    _choice("blur", blur, ("official", "none"))
    return blur


class BankDetector:
    """Base of the memory-bank detectors: subclasses fill ``_fit``, ``_score``, ``_tensors``."""

    method: ClassVar[str] = ""
    config_class: ClassVar[type[BankConfig]] = BankConfig

    def __init__(
        self, config: BankConfig | None = None, teacher: Mapping[str, Any] | None = None
    ) -> None:
        self.config = config or self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}")
        self.device = resolve_device(self.config.device)
        self.teacher = dict(teacher) if teacher is not None else None
        self.grid: int | None = None

    @classmethod
    def from_fbft_config(cls, config: Any, teacher: Any) -> Self:
        """The detector a study trial builds: the FBFT config's map settings (blur, device,
        seed where the method draws) on the shared teacher's tokens."""
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        given = {"blur": config.blur, "device": config.device, "seed": config.seed}
        settings = cls.config_class(**{k: v for k, v in given.items() if k in names})
        return cls(settings, teacher=teacher.describe())

    # --------------------------------------------------------------- subclasses
    def _fit(self, tokens: Sequence[TokenPair]) -> None:
        raise NotImplementedError

    def _score(self, feats: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        """(N, D') features -> (N,) patch scores, and the image score (None = top-0.1% map)."""
        raise NotImplementedError

    def _tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ---------------------------------------------------------------- interface
    def features(self, pair: TokenPair) -> torch.Tensor:
        """One image's patch features as this detector sees them."""
        c = self.config
        return patch_features(pair, c.blocks, c.normalize, self.device)

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
        self._sync()
        return self

    @torch.no_grad()
    def predict_variants(
        self,
        tokens: Sequence[TokenPair],
        sizes: Sequence[tuple[int, int]],
        variants: Sequence[Variant] = ({},),
    ) -> list[Prediction]:
        """Maps at each image's own (H, W) per variant (only ``blur`` varies), one kNN pass."""
        if self.grid is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit_tokens (or load)")
        if len(tokens) != len(sizes):
            raise ValueError(f"got {len(tokens)} token pairs but {len(sizes)} image sizes")
        blurs = [blur_of(v, self.config.blur) for v in variants]
        out = [Prediction(seconds={"knn": 0.0, "maps": 0.0}) for _ in variants]
        for feats, (h, w) in zip(self.iter_features(tokens), sizes, strict=True):
            t0 = time.perf_counter()
            patch, score = self._score(feats)
            patch_map = patch.reshape(self.grid, self.grid)
            self._sync()
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

    def predict_tokens(
        self, tokens: Sequence[TokenPair], sizes: Sequence[tuple[int, int]]
    ) -> Prediction:
        """Maps and image scores with the detector's own settings."""
        return self.predict_variants(tokens, sizes)[0]

    def describe(self) -> dict[str, Any]:
        """JSON-able identity: method, settings, bank shape, teacher identity (if given)."""
        shapes = {k: list(v.shape) for k, v in self._tensors().items()} if self.grid else {}
        return {
            "method": self.method,
            "settings": dataclasses.asdict(self.config),
            "grid": self.grid,
            "tensors": shapes,
            "teacher": self.teacher,
        }

    # -------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Atomically write the bank tensors with the JSON settings and a format version."""
        if self.grid is None:
            raise RuntimeError(f"nothing to save: {type(self).__name__} is not fitted")
        state = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "config": self.config.to_json(),
            "teacher": json.dumps(self.teacher),
            "grid": self.grid,
            "tensors": {k: v.detach().cpu() for k, v in self._tensors().items()},
        }
        return save_state(state, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | None = None) -> Self:
        """Load a saved detector of this method; ``device`` overrides where it runs."""
        state = load_state(path, cls.method, FORMAT_VERSION)
        if state["method"] != cls.method:
            raise ValueError(f"{path} holds a {state['method']} detector, not {cls.method}")
        settings = json.loads(state["config"])
        if device is not None:
            settings["device"] = device
        model = cls(cls.config_class(**settings), json.loads(state["teacher"]))
        model.grid = int(state["grid"])
        for name, tensor in state["tensors"].items():
            setattr(model, name, tensor.to(model.device))
        return model

    def _sync(self) -> None:
        sync(self.device)
