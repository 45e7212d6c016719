"""The frozen teacher: a timm ViT that returns the patch tokens of two blocks.

Tokens are taken after the final LayerNorm with the prefix (class and register) tokens removed,
as DINOv2's ``get_intermediate_layers(..., norm=True)`` returns them, and only the blocks up to
block k are ever run.
"""

from __future__ import annotations

import hashlib
import socket
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")


class TeacherWeightsError(RuntimeError):
    """The requested teacher weights could not be loaded."""


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


def file_sha256(path: Path) -> str:
    """Content hash of a file (weights identity for the feature cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection within ``timeout`` seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def cached_hub_file(backbone: str) -> Path | None:
    """The backbone's pretrained weights if they are already in the local Hugging Face cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo = cfg.hf_hub_id if cfg.hf_hub_id != "timm/" else f"timm/{backbone}"
    names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILENAMES
    for name in names:
        try:
            return Path(hf_hub_download(repo, name, local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, OSError):
            continue
    return None


class Teacher(nn.Module):
    """Frozen timm ViT returning the patch tokens of blocks j and k (1-indexed).

    ``weights_source`` records where the weights came from: ``"hub"``, ``"hub-cache"``,
    ``"file"`` or ``"random"``; ``weights_id`` identifies them (for caching and records).
    """

    def __init__(
        self,
        backbone: str,
        layers: tuple[int, int],
        image_size: int,
        weights: str = "auto",
        backbone_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = (int(layers[0]), int(layers[1]))
        self.image_size = int(image_size)
        kwargs = dict(backbone_kwargs or {})
        self.model, self.weights_source, self.weights_id = _create(
            backbone, weights, self.image_size, kwargs, seed
        )
        if not hasattr(self.model, "forward_intermediates") or not hasattr(self.model, "blocks"):
            raise ValueError(f"{backbone} is not a timm ViT with blocks and forward_intermediates")
        depth = len(self.model.blocks)
        check_layers(self.layers, depth, backbone)
        self.patch_size = int(self.model.patch_embed.patch_size[0])
        check_image_size(self.image_size, self.patch_size, backbone)
        self.embed_dim = int(self.model.embed_dim)
        self.grid = self.image_size // self.patch_size
        self.model.prune_intermediate_layers(
            [self.layers[0] - 1, self.layers[1] - 1], prune_norm=False, prune_head=True
        )
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(cfg.get("std", IMAGENET_STD))
        self.model.eval().requires_grad_(False)

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
        f_j, f_k = self.model.forward_intermediates(
            x,
            indices=[self.layers[0] - 1, self.layers[1] - 1],
            norm=True,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        return f_j.float(), f_k.float()

    def describe(self) -> dict[str, Any]:
        """Identity of this teacher: everything that changes its tokens."""
        return {
            "backbone": self.backbone,
            "weights": self.weights_id,
            "image_size": self.image_size,
            "layers": list(self.layers),
        }


def _create(
    backbone: str, weights: str, image_size: int, kwargs: dict[str, Any], seed: int
) -> tuple[nn.Module, str, str]:
    """Build the timm model and load its weights; returns (model, source, weights id)."""
    arch = {"img_size": image_size, **kwargs}
    arch_id = ",".join(f"{k}={kwargs[k]}" for k in sorted(kwargs))

    def random_init() -> tuple[nn.Module, str, str]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _timm_model(backbone, pretrained=False, **arch)
        return model, "random", f"random:{backbone}[{arch_id}]:seed={seed}"

    def from_file(path: Path, source: str) -> tuple[nn.Module, str, str]:
        model = _timm_model(
            backbone, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **arch
        )
        return model, source, f"sha256:{file_sha256(path)}"

    if weights == "random":
        return random_init()
    if weights not in ("auto", "hub"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"teacher weights file {str(path)!r} does not exist; pass an existing checkpoint "
                "(Meta DINOv2 .pth, timm .pth/.bin or .safetensors), or weights='hub' | 'auto' | "
                "'random'"
            )
        return from_file(path, "file")
    cached = cached_hub_file(backbone)
    if cached is not None:
        return from_file(cached, "hub-cache")
    reason = "the Hugging Face hub is not reachable and the weights are not in the local cache"
    if hub_reachable():
        try:
            model = _timm_model(backbone, pretrained=True, **arch)
            cached = cached_hub_file(backbone)
            weights_id = f"sha256:{file_sha256(cached)}" if cached else f"hub:{backbone}"
            return model, "hub", weights_id
        except (OSError, RuntimeError) as err:
            reason = f"downloading the weights failed: {err}"
    if weights == "hub":
        raise TeacherWeightsError(
            f"could not load pretrained weights for {backbone}: {reason}. Download them on a "
            "connected machine (they land in the Hugging Face cache, HF_HOME) or pass "
            "weights=<checkpoint file>; weights='random' runs with a random-init teacher."
        )
    warnings.warn(
        f"\n{'!' * 78}\n!! TEACHER WEIGHTS: {reason}.\n!! Falling back to a RANDOM-INIT "
        f"{backbone} (seed {seed}); results are NOT those of a pretrained teacher.\n!! Runs are "
        f"tagged teacher_weights=random. Pass weights=<file> to use a local checkpoint.\n"
        f"{'!' * 78}",
        stacklevel=3,
    )
    return random_init()


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
