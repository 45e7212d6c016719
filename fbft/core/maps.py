"""Pre-processing and anomaly maps as pure functions, following the official implementation.

Image -> edge-pad to a centred square -> bicubic resize -> ImageNet normalisation.
Tokens -> per-patch discrepancies Δ_j, Δ_k -> fusion -> bilinear upsample to the padded square
-> approximate Gaussian blur -> crop the padding away -> map at the image's original H×W.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fbft.metrics.score import TOP_FRACTION, image_score  # noqa: F401 - the maps' score

# The official approximate Gaussian blur: (box side, passes), applied in this order.
OFFICIAL_BLUR = ((5, 5), (7, 3))
# Blur modes: FBFT's operator, none, and PatchCore/SPADE's Gaussian (σ = 4 px, reflect padding,
# scipy.ndimage.gaussian_filter's defaults: truncated at 4σ).
BLURS = ("official", "none", "gaussian4")
GAUSSIAN_SIGMA = 4.0


def as_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Check an HxWx3 uint8 image (HxW or HxWx1 grayscale is replicated to RGB)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"{name}: expected an HxWx3 RGB array, got shape {image.shape}")
    return image


def pad_to_square(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Edge-replicate an HxWxC image to a centred max(H, W) square -> (square, (top, left))."""
    h, w = image.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    pad = [(top, side - h - top), (left, side - w - left)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pad, mode="edge"), (top, left)


def preprocess(
    image: np.ndarray, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """HxWx3 uint8 image -> normalised (3, S, S) float tensor, as the official loader."""
    square, _ = pad_to_square(as_rgb(image))
    resized = Image.fromarray(square).resize((image_size, image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - mean_t) / std_t


def discrepancy(pred: torch.Tensor, target: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-token discrepancy (..., D) -> (...): ``l2`` between unit vectors or ``cosine``."""
    if distance == "l2":
        diff = F.normalize(pred, dim=-1) - F.normalize(target, dim=-1)
        return diff.pow(2).sum(-1).sqrt()
    if distance == "cosine":
        return 1 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6)
    raise ValueError(f"distance must be 'l2' or 'cosine', got {distance!r}")


def fuse(delta_j: torch.Tensor, delta_k: torch.Tensor, fusion: str) -> torch.Tensor:
    """Fuse the two contextualisation-specific maps: product (default), sum, Δ_j or Δ_k only."""
    if fusion == "product":
        return delta_j * delta_k
    if fusion == "sum":
        return delta_j + delta_k
    if fusion == "j":
        return delta_j
    if fusion == "k":
        return delta_k
    raise ValueError(f"fusion must be one of product, sum, j, k; got {fusion!r}")


@functools.lru_cache(maxsize=64)
def _axis_operator(grid: int, side: int, blur_mode: str) -> torch.Tensor:
    """(side, grid) float64 matrix M of the map pipeline along one axis.

    Bilinear upsampling (align_corners=False) of a grid×grid map to side×side, then the
    official approximate Gaussian blur (5 passes of a 5×5 box mean, then 3 of a 7×7 box mean,
    zero padding, same size), are linear and separable, so the upsampled, blurred square map
    is M·P·Mᵀ for a patch map P; cropping the padding away takes rows of M. ``gaussian4`` (the
    baselines' papers) is separable and linear too: scipy's 1-D Gaussian, reflect padding, on
    the padded square before the crop.
    """
    if blur_mode not in BLURS:
        raise ValueError(f"blur must be one of {', '.join(BLURS)}; got {blur_mode!r}")
    basis = torch.eye(grid, dtype=torch.float64)[None]  # one channel per grid cell
    x = F.interpolate(basis, size=side, mode="linear")  # (1, grid, side)
    if blur_mode == "official":
        for width, passes in OFFICIAL_BLUR:
            for _ in range(passes):
                x = F.avg_pool1d(x, width, stride=1, padding=width // 2)
    if blur_mode == "gaussian4":
        from scipy.ndimage import gaussian_filter1d

        x = torch.from_numpy(gaussian_filter1d(x.numpy(), GAUSSIAN_SIGMA, axis=-1, mode="reflect"))
    return x[0].T.contiguous()


@functools.lru_cache(maxsize=64)
def _operator_on(grid: int, side: int, blur_mode: str, device: str) -> torch.Tensor:
    return _axis_operator(grid, side, blur_mode).to(device=device, dtype=torch.float32)


def anomaly_map(
    patch_map: torch.Tensor, height: int, width: int, blur_mode: str = "official"
) -> torch.Tensor:
    """One (g, g) fused patch map -> the (height, width) float32 anomaly map of the original image:
    bilinear upsample to the padded max(H, W) square, blur, crop exactly the padding away."""
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    op = _operator_on(patch_map.shape[-1], side, blur_mode, str(patch_map.device))
    return op[top : top + height] @ patch_map.float() @ op[left : left + width].T
