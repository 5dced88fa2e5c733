"""Small building blocks shared by the resampler and the gated cross-attention blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    if name == "silu":
        return nn.SiLU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}: expected 'squared_relu', 'gelu', 'silu' or 'relu'")


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """[..., dim] -> [..., dim]: "layer_norm" (affine LayerNorm) or "rms_norm" (RMSNorm with a weight, as Llama's)."""
    if kind == "layer_norm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rms_norm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}: expected 'layer_norm' or 'rms_norm'")


class _ActivationThenLinear(torch.autograd.Function):
    """linear(act(h), weight) that keeps only h for the backward and recomputes act(h) there.

    Autograd would keep both h (for the activation's gradient) and act(h) (for the weight's): two
    [..., mult*d] tensors per feed-forward, the widest activations of the bridge. Recomputing the
    elementwise activation costs little; the matrix products are the same as without it.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, act: nn.Module) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(h, weight)
        return F.linear(act(h), weight)  # under autocast: in the autocast dtype, as nn.Linear would be

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight = ctx.saved_tensors
        with torch.enable_grad():
            h_ = h.detach().requires_grad_(ctx.needs_input_grad[0])
            a = ctx.act(h_)
        g = grad_out.to(a.dtype)
        grad_h = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (g.reshape(-1, g.shape[-1]).T @ a.detach().reshape(-1, a.shape[-1])).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_h = torch.autograd.grad(a, h_, g @ weight.to(g.dtype))[0]
        return grad_h, grad_weight, None


class FeedForward(nn.Sequential):
    """Pre-norm MLP: LayerNorm -> Linear(d, mult*d) -> act -> Linear(mult*d, d), no biases.

    [..., d] -> [..., d]. The layout (indices 0..3) matches OpenFlamingo's so its weights map 1:1.
    When training, the activation is recomputed in the backward instead of kept (see
    :class:`_ActivationThenLinear`); outputs and gradients are those of the plain sequence.
    """

    def __init__(
        self, dim: int, *, mult: int = 4, activation: str = "squared_relu", inner: int | None = None, norm: nn.Module | None = None
    ) -> None:
        inner = inner or dim * mult
        super().__init__(
            norm if norm is not None else nn.LayerNorm(dim),
            nn.Linear(dim, inner, bias=False),
            make_activation(activation),
            nn.Linear(inner, dim, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self[1](self[0](x))
        if torch.is_grad_enabled() and (h.requires_grad or self[3].weight.requires_grad):
            return _ActivationThenLinear.apply(h, self[3].weight, self[2])
        return self[3](self[2](h))


class GatedFeedForward(nn.Module):
    """Pre-norm gated MLP, as Llama's: down(act(gate(n(x))) * up(n(x))), no biases. [..., d] -> [..., d].

    IDEFICS's cross-attention layers use this (its LM's MLP, same inner width and activation).
    """

    def __init__(self, dim: int, *, inner: int, activation: str = "silu", norm: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = norm if norm is not None else nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, inner, bias=False)
        self.up = nn.Linear(dim, inner, bias=False)
        self.act = make_activation(activation)
        self.down = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.down(self.act(self.gate(h)) * self.up(h))
