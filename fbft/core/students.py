"""The two students: shallow MLPs shared across patches.

Forward S_F: f_j -> f_k; backward S_B: f_k -> f_j.
"""

from __future__ import annotations

import os

import torch
from torch import nn


class Student(nn.Sequential):
    """Linear -> GELU -> Linear -> GELU -> Linear, as the official code (width D by default)."""

    def __init__(self, in_features: int, out_features: int, width: int | None = None) -> None:
        width = width or (in_features + out_features) // 2
        super().__init__(
            nn.Linear(in_features, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, out_features),
        )


class Students(nn.Module):
    """The forward and backward feature-transfer networks, trained jointly."""

    def __init__(self, embed_dim: int, width: int | None = None) -> None:
        super().__init__()
        self.forward_net = Student(embed_dim, embed_dim, width)
        self.backward_net = Student(embed_dim, embed_dim, width)

    def forward(self, f_j: torch.Tensor, f_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of blocks j and k -> (predicted f_j by S_B, predicted f_k by S_F)."""
        return self.backward_net(f_k), self.forward_net(f_j)


def transfer_loss(
    pred_j: torch.Tensor, f_j: torch.Tensor, pred_k: torch.Tensor, f_k: torch.Tensor, loss: str
) -> torch.Tensor:
    """Training loss summed over both directions, each a mean over tokens.

    ``cosine``: 1 - cos(pred, f) (official); ``l2``: Euclidean distance ||pred - f||.
    """
    if loss == "cosine":

        def term(p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
            return 1 - nn.functional.cosine_similarity(p, f, dim=-1, eps=1e-6).mean()
    elif loss == "l2":

        def term(p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
            return (p - f).norm(dim=-1).mean()
    else:
        raise ValueError(f"loss must be 'cosine' or 'l2', got {loss!r}")
    return term(pred_j, f_j) + term(pred_k, f_k)


# The official FeatureProjectionMLP's layer names -> positions in our Student (nn.Sequential).
OFFICIAL_LAYERS = {"input": 0, "projection": 2, "output": 4}


def from_official_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official ``FeatureProjectionMLP`` state dict (``input``, ``projection``, ``output``
    Linear layers) as the state dict of our :class:`Student`."""
    out = {}
    for key, value in state.items():
        layer, _, param = key.partition(".")
        if layer not in OFFICIAL_LAYERS or param not in ("weight", "bias"):
            raise ValueError(
                f"unexpected key {key!r} in an official student checkpoint: expected "
                "input/projection/output .weight/.bias (FeatureProjectionMLP of L2BT)"
            )
        out[f"{OFFICIAL_LAYERS[layer]}.{param}"] = value
    return out


def load_official_students(
    forward_path: str | os.PathLike[str], backward_path: str | os.PathLike[str], embed_dim: int
) -> Students:
    """Students from the authors' ``forward_net_*.pth`` and ``backward_net_*.pth`` files."""
    states = {}
    for name, path in (("forward", forward_path), ("backward", backward_path)):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "input.weight" not in state:
            raise ValueError(f"{path}: not an official {name}_net checkpoint (no input.weight)")
        states[name] = from_official_state(state)
    width = int(states["forward"]["0.weight"].shape[0])
    if states["forward"]["0.weight"].shape[1] != embed_dim:
        raise ValueError(
            f"{forward_path}: the students take {states['forward']['0.weight'].shape[1]}-wide "
            f"tokens but the teacher gives {embed_dim}; use the backbone they were trained on"
        )
    students = Students(embed_dim, width)
    students.forward_net.load_state_dict(states["forward"])
    students.backward_net.load_state_dict(states["backward"])
    return students
