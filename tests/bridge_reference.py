"""Plain-torch references of the Flamingo bridge, written from the paper, not from flamingo_vlm.

They read weights from the modules' state dicts and compute everything themselves, in float64, with
explicit loops where the paper states a rule per token (which image a token sees). Nothing here calls
flamingo_vlm code, so a bug copied into both sides cannot hide.

Paper references (arXiv 2204.14198): Perceiver Resampler, Fig. 5 and appendix A.1.1; GATED XATTN-DENSE,
Fig. 4 and section 2.2; phi (which image a text token attends to), section 2.3.
"""

from __future__ import annotations

import math

import torch


def _f64(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in state.items()}


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def feed_forward(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """Pre-norm MLP with the paper's Squared ReLU: W2 relu(W1 LN(x))^2. [..., d] -> [..., d].

    Keys follow the Sequential layout (LayerNorm, Linear, activation, Linear) that OpenFlamingo also uses.
    """
    h = layer_norm(x, sd[f"{prefix}0.weight"], sd[f"{prefix}0.bias"]) @ sd[f"{prefix}1.weight"].T
    return (torch.clamp(h, min=0) ** 2) @ sd[f"{prefix}3.weight"].T


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Dense multi-head attention without a mask. q [Q, H*D], k/v [K, H*D] -> [Q, H*D]."""
    dim_head = q.shape[-1] // heads
    out = []
    for h in range(heads):
        cols = slice(h * dim_head, (h + 1) * dim_head)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(dim_head)
        out.append(torch.softmax(scores, dim=-1) @ v[:, cols])
    return torch.cat(out, dim=-1)


# ---- Perceiver Resampler (Fig. 5) ---------------------------------------------------------------
def resampler(features: torch.Tensor, state: dict[str, torch.Tensor], *, heads: int, depth: int) -> torch.Tensor:
    """features [M, T, S, d] -> visual tokens [M, num_latents, d], per the paper's pseudo-code:

        x_f = x_f + time_embeddings[:T]; x_f = flatten(x_f)          # [T*S, d]
        x = latents
        for each layer: x = x + attn(q=x, kv=concat([x_f, x])); x = x + ffw(x)
        return LayerNorm(x)

    Each medium is resampled on its own (a loop, no batching across media).
    """
    sd = _f64(state)
    out = []
    for media in features.double():
        t, s, d = media.shape
        x_f = (media + sd["time_embeddings"][:t, None, :]).reshape(t * s, d)
        x = sd["latents"].clone()
        for i in range(depth):
            p = f"layers.{i}.0."
            f_n = layer_norm(x_f, sd[p + "norm_media.weight"], sd[p + "norm_media.bias"])
            x_n = layer_norm(x, sd[p + "norm_latents.weight"], sd[p + "norm_latents.bias"])
            kv = torch.cat([f_n, x_n], dim=0) @ sd[p + "to_kv.weight"].T
            k, v = kv[:, : kv.shape[1] // 2], kv[:, kv.shape[1] // 2 :]
            x = x + softmax_attention(x_n @ sd[p + "to_q.weight"].T, k, v, heads) @ sd[p + "to_out.weight"].T
            x = x + feed_forward(x, sd, f"layers.{i}.1.")
        out.append(layer_norm(x, sd["norm.weight"], sd["norm.bias"]))
    return torch.stack(out)


# ---- phi (section 2.3) --------------------------------------------------------------------------
def visible_media(
    input_ids: torch.Tensor, *, media_token_id: int, eos_token_id: int | None, reset_at_eos: bool, mode: str
) -> list[list[list[int]]]:
    """For each row and token, the global indices of the media that token cross-attends to.

    Media are numbered in row order over the whole batch. "last": the last ``<image>`` at or before the
    token (phi); "all": every ``<image>`` of the token's document at or before it (the paper's ablation).
    With ``reset_at_eos`` an EOS ends a document: it and the tokens after it see no earlier image.
    """
    rows, next_media = [], 0
    for row in input_ids.tolist():
        seen: list[int] = []
        per_token = []
        for tok in row:
            if reset_at_eos and tok == eos_token_id:
                seen = []
                per_token.append([])
                continue
            if tok == media_token_id:
                seen.append(next_media)
                next_media += 1
            per_token.append(seen[-1:] if mode == "last" else list(seen))
        rows.append(per_token)
    return rows


# ---- GATED XATTN-DENSE (Fig. 4) -----------------------------------------------------------------
def gated_xattn_block(
    x: torch.Tensor, visual_tokens: torch.Tensor, visible: list[list[list[int]]], state: dict[str, torch.Tensor], *, heads: int
) -> torch.Tensor:
    """x [B, L, d], visual_tokens [M, n, d_v] -> [B, L, d]:

        y = x + tanh(alpha_xattn) * attn(q=LN(x), kv=LN(visual tokens of the media the token sees))
        y = y + tanh(alpha_dense) * ffw(y)

    Token by token: the keys/values are those of ``visible[b][l]`` only; a token that sees no medium
    gets no cross-attention output.
    """
    sd = _f64(state)
    x = x.double()
    q = layer_norm(x, sd["attn.norm.weight"], sd["attn.norm.bias"]) @ sd["attn.to_q.weight"].T
    media = visual_tokens.double()
    if "attn.norm_media.weight" in sd:
        media = layer_norm(media, sd["attn.norm_media.weight"], sd["attn.norm_media.bias"])
    kv = media @ sd["attn.to_kv.weight"].T
    k, v = kv[..., : kv.shape[-1] // 2], kv[..., kv.shape[-1] // 2 :]
    attended = torch.zeros_like(q)
    for b in range(x.shape[0]):
        for l in range(x.shape[1]):
            if visible[b][l]:
                keys = torch.cat([k[m] for m in visible[b][l]])
                values = torch.cat([v[m] for m in visible[b][l]])
                attended[b, l] = softmax_attention(q[b, l][None], keys, values, heads)[0]
    y = x + torch.tanh(sd["attn_gate"]) * (attended @ sd["attn.to_out.weight"].T)
    return y + torch.tanh(sd["ff_gate"]) * feed_forward(y, sd, "ff.")
