"""Small building blocks shared by the resampler and the gated cross-attention blocks."""

from __future__ import annotations

import torch
from torch import nn


class SquaredReLU(nn.Module):
    """relu(x)^2, the activation of the paper's new layers (So et al., 2021)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


def make_activation(name: str) -> nn.Module:
    if name == "squared_relu":
        return SquaredReLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}: expected 'squared_relu' or 'gelu'")


class FeedForward(nn.Sequential):
    """Pre-norm MLP: LayerNorm -> Linear(d, mult*d) -> act -> Linear(mult*d, d), no biases.

    [..., d] -> [..., d]. The layout (indices 0..3) matches OpenFlamingo's so its weights map 1:1.
    """

    def __init__(self, dim: int, *, mult: int = 4, activation: str = "squared_relu") -> None:
        inner = dim * mult
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner, bias=False),
            make_activation(activation),
            nn.Linear(inner, dim, bias=False),
        )
