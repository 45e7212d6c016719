"""The two students: shallow MLPs shared across patches.

Forward S_F: f_j -> f_k; backward S_B: f_k -> f_j.
"""

from __future__ import annotations

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
