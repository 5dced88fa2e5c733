"""GATED XATTN-DENSE (Flamingo, section 2.2): tanh-gated cross-attention to visual tokens, then a
tanh-gated feed-forward, inserted before a frozen LM decoder layer."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .layers import FeedForward
from .masking import MediaRouting


class MaskedCrossAttention(nn.Module):
    """Pre-norm cross-attention from text [B, L, d] to visual tokens, routed per token by a MediaRouting."""

    def __init__(self, *, dim: int, dim_visual: int, heads: int, dim_head: int, norm_media: bool = True) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.norm_media = nn.LayerNorm(dim_visual) if norm_media else nn.Identity()
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def media_kv(self, visual_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """visual_tokens [M, n, d_visual] -> keys, values [M, H, n, D]; computable once and reused."""
        k, v = self.to_kv(self.norm_media(visual_tokens)).chunk(2, dim=-1)
        return (rearrange(k, "m n (h d) -> m h n d", h=self.heads), rearrange(v, "m n (h d) -> m h n d", h=self.heads))

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], routing: MediaRouting
    ) -> torch.Tensor:
        q = rearrange(self.to_q(self.norm(x)), "b l (h d) -> b l h d", h=self.heads)
        out = routing.attend(q, *kv)
        return self.to_out(rearrange(out, "b l h d -> b l (h d)"))


class GatedCrossAttentionBlock(nn.Module):
    """y = y + tanh(a_xattn) * xattn(y, visual); y = y + tanh(a_dense) * ffw(y).

    With both alphas at 0 (the default initialisation) the block is the identity, bit for bit, so the
    Flamingo model starts as exactly the frozen LM.
    """

    def __init__(
        self,
        *,
        dim: int,
        dim_visual: int,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        activation: str = "squared_relu",
        norm_media: bool = True,
        gate_init: str = "zeros",
        gate_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.attn = MaskedCrossAttention(
            dim=dim, dim_visual=dim_visual, heads=heads, dim_head=dim_head, norm_media=norm_media
        )
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, mult=ff_mult, activation=activation)
        self.ff_gate = nn.Parameter(torch.zeros(1))
        if gate_init == "normal":
            nn.init.normal_(self.attn_gate, std=gate_init_std)
            nn.init.normal_(self.ff_gate, std=gate_init_std)
        elif gate_init != "zeros":
            raise ValueError(f"gate_init must be 'zeros' or 'normal', got {gate_init!r}")

    def media_kv(self, visual_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn.media_kv(visual_tokens)

    def forward(
        self,
        x: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        routing: MediaRouting | None = None,
    ) -> torch.Tensor:
        """x [B, L, d] (any float dtype; computed in the block's dtype) -> [B, L, d] in x's dtype.

        kv / routing None: the call sees no media. The cross-attention term is then exactly 0 (as it is for
        a token with no image before it), but the feed-forward still applies to every token.
        """
        dtype = self.attn_gate.dtype
        y = x.to(dtype)
        if routing is not None:
            y = y + self.attn_gate.tanh() * self.attn(y, kv, routing)
        y = y + self.ff_gate.tanh() * self.ff(y)
        return y.to(x.dtype)
