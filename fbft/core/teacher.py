"""The frozen teacher: a timm ViT that returns the patch tokens of two blocks.

Tokens are taken after the final LayerNorm with the prefix (class and register) tokens removed,
as DINOv2's ``get_intermediate_layers(..., norm=True)`` returns them, and only the blocks up to
block k are ever run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import timm
import timm.data
import torch
from torch import nn

from fbft.core import maps
from fbft.core.config import FBFTConfig
from fbft.core.device import chunks, flushed_denormals, sync
from fbft.core.weights import (  # noqa: F401 - re-exported for the study driver
    TeacherWeightsError,
    cached_hub_file,
    file_sha256,
    hub_reachable,
    resolve_weights,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUTOCAST = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_layers(layers: tuple[int, int], depth: int, backbone: str) -> None:
    """Layers are 1-indexed block numbers j < k within the backbone's depth."""
    j, k = layers
    if not (1 <= j < k <= depth):
        raise ValueError(
            f"layers={list(layers)} is not valid for {backbone} with {depth} blocks: give two "
            f"1-indexed block numbers j < k between 1 and {depth} (the paper uses 8 12 for a "
            "12-block ViT)"
        )


def check_image_size(image_size: int, patch_size: int, backbone: str) -> None:
    """The input side must be a multiple of the patch size."""
    if image_size % patch_size:
        below = image_size // patch_size * patch_size
        above = below + patch_size
        nearest = f"{below} or {above}" if below else str(above)
        raise ValueError(
            f"image_size={image_size} is not a multiple of the patch size {patch_size} of "
            f"{backbone}; the nearest valid sizes are {nearest}"
        )


def check_backbone(backbone: str, backbone_kwargs: dict[str, Any] | None = None) -> tuple[int, int]:
    """(patch size, depth) of a timm ViT, built on the meta device (no memory, no weights).

    Raises a ValueError naming the backbone when it is unknown or not a ViT with ``blocks``,
    ``patch_embed`` and ``forward_intermediates`` (e.g. a ResNet).
    """
    kwargs = dict(backbone_kwargs or {})
    try:
        with torch.device("meta"):
            model = _timm_model(backbone, pretrained=False, **kwargs)
    except TypeError as err:  # architecture overrides this model does not take
        raise ValueError(
            f"cannot build backbone {backbone!r} with backbone_kwargs {kwargs}: {err}"
        ) from None
    missing = [
        a for a in ("blocks", "patch_embed", "forward_intermediates") if not hasattr(model, a)
    ]
    if missing:
        raise ValueError(
            f"backbone {backbone!r} is not a ViT with blocks/forward_intermediates (it has no "
            f"{', '.join(missing)}); FBFT needs a timm ViT, e.g. "
            "vit_base_patch14_reg4_dinov2.lvd142m or vit_small_patch14_reg4_dinov2.lvd142m"
        )
    return int(model.patch_embed.patch_size[0]), len(model.blocks)


class Teacher(nn.Module):
    """Frozen timm ViT returning the patch tokens of blocks j and k (1-indexed).

    ``weights_source`` records where the weights came from: ``"hub-cache"``, ``"hub"``,
    ``"file"`` or ``"random"``; ``weights_id`` identifies them (for caching and records).
    ``precision`` is the autocast of :meth:`encode`; ``normalize`` picks the pixel mean/std:
    ``"imagenet"`` (the official code) or ``"backbone"`` (timm's data config of the backbone).
    """

    def __init__(
        self,
        backbone: str,
        layers: tuple[int, int],
        image_size: int,
        weights: str = "auto",
        backbone_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        precision: str = "fp32",
        normalize: str = "imagenet",
    ) -> None:
        super().__init__()
        if precision not in AUTOCAST or normalize not in ("imagenet", "backbone"):
            raise ValueError(
                f"precision={precision!r} must be one of {', '.join(AUTOCAST)} and "
                f"normalize={normalize!r} one of imagenet, backbone"
            )
        self.backbone = backbone
        self.layers = (int(layers[0]), int(layers[1]))
        self.image_size = int(image_size)
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.precision, self.normalize = precision, normalize
        self.patch_size, depth = check_backbone(backbone, self.backbone_kwargs)
        check_layers(self.layers, depth, backbone)
        check_image_size(self.image_size, self.patch_size, backbone)
        self.seed = int(seed)
        self.model, self.weights_source, self.weights_id, self.weights_file = _create(
            backbone, weights, self.image_size, self.backbone_kwargs, seed
        )
        self.embed_dim = int(self.model.embed_dim)
        self.grid = self.image_size // self.patch_size
        self.model.prune_intermediate_layers(
            [self.layers[0] - 1, self.layers[1] - 1], prune_norm=False, prune_head=True
        )
        if normalize == "imagenet":
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        else:
            data = timm.data.resolve_model_data_config(self.model)
            self.mean, self.std = tuple(data["mean"]), tuple(data["std"])
        self.model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> Teacher:
        """The teacher stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (B, 3, S, S) -> tokens of blocks j and k, each (B, (S/P)², D)."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"teacher expects {self.image_size}x{self.image_size} inputs, got {tuple(x.shape)}"
            )
        if self.precision != "fp32" and x.device.type != "cuda":
            raise ValueError(
                f"precision={self.precision!r} (autocast) needs a CUDA device; the teacher runs "
                f"on {x.device}. Use precision='fp32'."
            )
        # Autocast here, around the ViT only: every caller (fit, predict, the per-epoch loop,
        # the benchmarks) gets the same precision, and the students never run under it.
        autocast = torch.autocast(x.device.type, AUTOCAST[self.precision], self.precision != "fp32")
        with autocast:
            f_j, f_k = self.model.forward_intermediates(
                x,
                indices=[self.layers[0] - 1, self.layers[1] - 1],
                norm=True,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
            )
        return f_j.float(), f_k.float()

    def preprocess(self, image: np.ndarray, name: str = "image") -> torch.Tensor:
        """HxWx3 uint8 image -> the normalised (3, S, S) input of this teacher."""
        return maps.preprocess(maps.as_rgb(image, name), self.image_size, self.mean, self.std)

    def batches(self, images: Iterable[np.ndarray], batch_size: int) -> Iterator[TeacherBatch]:
        """Pre-process and run ``images`` in batches (autocast by ``precision``): per batch the
        images' (H, W), f_j and f_k (float32, on the teacher's device) and the teacher's seconds
        (CUDA-synchronised)."""
        device = self.device
        for batch in chunks(images, batch_size):
            arrays = [maps.as_rgb(img, f"image {i}") for i, img in batch]
            x = torch.stack([self.preprocess(a) for a in arrays]).to(device)
            sync(device)
            start = time.perf_counter()
            with flushed_denormals():
                f_j, f_k = self(x)
            sync(device)
            yield [a.shape[:2] for a in arrays], f_j, f_k, time.perf_counter() - start

    def encode(
        self, images: Iterable[np.ndarray], batch_size: int = 4
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One teacher pass per image: (f_j, f_k) of shape (N, D) per image, CPU float32."""
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _, f_j, f_k, _ in self.batches(images, batch_size):
            out += zip(f_j.cpu(), f_k.cpu(), strict=True)
        return out

    def describe(self) -> dict[str, Any]:
        """Identity of this teacher: everything that changes its tokens."""
        return {
            "backbone": self.backbone,
            "backbone_kwargs": self.backbone_kwargs,
            "weights": self.weights_id,
            "image_size": self.image_size,
            "layers": list(self.layers),
            "precision": self.precision,
            "normalize": self.normalize,
        }

    def build_config(self) -> dict[str, Any]:
        """The FBFTConfig teacher fields that rebuild this teacher (weights resolved: the file
        it loaded, or ``"random"`` with its seed), so a saved detector can rebuild it."""
        return {
            "backbone": self.backbone,
            "backbone_kwargs": self.backbone_kwargs,
            "weights": self.weights_file or "random",
            "teacher_seed": self.seed,
            "image_size": self.image_size,
            "layers": list(self.layers),
            "precision": self.precision,
            "normalize": self.normalize,
        }


def make_teacher(config: FBFTConfig) -> Teacher:
    """The teacher a config describes (on the CPU)."""
    return Teacher(
        config.backbone,
        config.layers,
        config.image_size,
        weights=config.weights,
        backbone_kwargs=config.backbone_kwargs,
        seed=config.teacher_seed,
        precision=config.precision,
        normalize=config.normalize,
    )


TeacherBatch = tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor, float]


def _create(
    backbone: str, weights: str, image_size: int, kwargs: dict[str, Any], seed: int
) -> tuple[nn.Module, str, str, str | None]:
    """Build the timm model and load its weights: (model, source, weights id, weights file)."""
    arch = {"img_size": image_size, **kwargs}
    resolved = resolve_weights(backbone, weights, seed)
    if resolved == "random":
        arch_id = ",".join(f"{k}={kwargs[k]}" for k in sorted(kwargs))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _timm_model(backbone, pretrained=False, **arch)
        return model, "random", f"random:{backbone}[{arch_id}]:seed={seed}", None
    path = Path(resolved)
    try:
        model = _timm_model(
            backbone, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **arch
        )
    except Exception as err:
        raise TeacherWeightsError(
            f"teacher weights file {str(path)!r} could not be loaded into {backbone} "
            f"({type(err).__name__}: {str(err)[:300]}); is it a checkpoint of this backbone "
            "(Meta DINOv2 .pth, timm .pth/.bin or .safetensors)? Pass another file, "
            "weights='auto' or weights='random'."
        ) from err
    in_cache = weights in ("auto", "hub") or _under(path, _hub_cache())
    source = "hub-cache" if in_cache else "file"
    return model, source, f"sha256:{file_sha256(path)}", str(path.resolve())


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _under(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _timm_model(backbone: str, **kwargs: Any) -> nn.Module:
    """timm.create_model with a clear error for unknown names."""
    name = backbone.split(".")[0]
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(
            f"unknown timm backbone {backbone!r}"
            + (f"; similar: {', '.join(close)}" if close else "")
        )
    return timm.create_model(backbone, num_classes=0, **kwargs)
