"""GATED XATTN-DENSE (Flamingo, section 2.2): tanh-gated cross-attention to visual tokens, then a
tanh-gated feed-forward, inserted before a frozen LM decoder layer."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .layers import FeedForward, GatedFeedForward, make_norm
from .masking import MediaRouting


class MaskedCrossAttention(nn.Module):
    """Pre-norm cross-attention from text [B, L, d] to visual tokens, routed per token by a MediaRouting.

    ``norm`` / ``norm_eps``: the pre-norm's kind ("layer_norm" or "rms_norm"); ``qk_norm``: the same kind of
    norm over each head's queries and keys (after the projections, before the dot product, as IDEFICS).
    """

    def __init__(
        self,
        *,
        dim: int,
        dim_visual: int,
        heads: int,
        dim_head: int,
        norm_media: bool = True,
        norm: str = "layer_norm",
        norm_eps: float = 1e-5,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = make_norm(norm, dim, norm_eps)
        self.norm_media = nn.LayerNorm(dim_visual) if norm_media else nn.Identity()
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.q_norm = make_norm(norm, dim_head, norm_eps) if qk_norm else None
        self.k_norm = make_norm(norm, dim_head, norm_eps) if qk_norm else None

    def media_kv(self, visual_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """visual_tokens [M, n, d_visual] -> keys, values [M, H, n, D]; computable once and reused."""
        k, v = self.to_kv(self.norm_media(visual_tokens)).chunk(2, dim=-1)
        k = rearrange(k, "m n (h d) -> m h n d", h=self.heads)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, rearrange(v, "m n (h d) -> m h n d", h=self.heads)

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], routing: MediaRouting
    ) -> torch.Tensor:
        q = rearrange(self.to_q(self.norm(x)), "b l (h d) -> b l h d", h=self.heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        out = routing.attend(q, *kv)
        return self.to_out(rearrange(out, "b l h d -> b l (h d)"))


class GatedCrossAttentionBlock(nn.Module):
    """y = y + tanh(a_xattn) * xattn(y, visual); y = y + tanh(a_dense) * ffw(y).

    With both alphas at 0 (the default initialisation) the block is the identity, bit for bit, so the
    Flamingo model starts as exactly the frozen LM. ``gate="vector"``: each alpha is [dim], one gate per
    channel (IDEFICS alpha_type="vector"). ``ff_type="gated"``: the feed-forward is a gated MLP
    (:class:`GatedFeedForward`) of inner width ``ff_dim`` (default ``ff_mult * dim``).
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
        norm: str = "layer_norm",
        norm_eps: float = 1e-5,
        qk_norm: bool = False,
        ff_type: str = "mlp",
        ff_dim: int | None = None,
        gate: str = "scalar",
    ) -> None:
        super().__init__()
        self.attn = MaskedCrossAttention(
            dim=dim, dim_visual=dim_visual, heads=heads, dim_head=dim_head, norm_media=norm_media, norm=norm, norm_eps=norm_eps,
            qk_norm=qk_norm,
        )
        if gate not in ("scalar", "vector"):
            raise ValueError(f"gate must be 'scalar' or 'vector', got {gate!r}")
        gate_size = dim if gate == "vector" else 1
        self.attn_gate = nn.Parameter(torch.zeros(gate_size))
        if ff_type == "mlp":
            self.ff = FeedForward(dim, mult=ff_mult, activation=activation, inner=ff_dim, norm=make_norm(norm, dim, norm_eps))
        elif ff_type == "gated":
            self.ff = GatedFeedForward(dim, inner=ff_dim or ff_mult * dim, activation=activation, norm=make_norm(norm, dim, norm_eps))
        else:
            raise ValueError(f"ff_type must be 'mlp' or 'gated', got {ff_type!r}")
        self.ff_gate = nn.Parameter(torch.zeros(gate_size))
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
