"""Shared fixtures: tiny random-init backbones built in the test (no downloads)."""

from __future__ import annotations

import torch
from PIL import Image

from flamingo_vlm import build_flamingo
from flamingo_vlm.tiny import TINY_LM_CONFIGS, make_tiny_clip, make_tiny_lm, make_tokenizer

LM_TYPES = sorted(TINY_LM_CONFIGS)

# A small bridge so the whole suite stays fast on 2 CPU cores.
SMALL_BRIDGE = dict(
    resampler_depth=2, resampler_num_latents=8, resampler_heads=2, resampler_dim_head=16,
    xattn_heads=2, xattn_dim_head=16, xattn_ff_mult=2, resampler_ff_mult=2,
)


def build(lm_type: str = "llama", *, seed: int = 0, lm_vocab: int | None = None, **overrides):
    """(model, processor, tokenizer) with a tiny LM of ``lm_type`` and a tiny CLIP encoder."""
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    lm = make_tiny_lm(lm_type, vocab_size=lm_vocab or len(tokenizer), seed=seed)
    torch.manual_seed(seed + 1)
    model, processor = build_flamingo(lm, make_tiny_clip(seed=seed), tokenizer, **{**SMALL_BRIDGE, **overrides})
    return model, processor


def open_gates(model, value: float = 1.0) -> None:
    """Set every tanh gate's alpha so the visual pathway really contributes (tests of media effects)."""
    with torch.no_grad():
        for block in model.xattn_blocks:
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)


def image(color, size=(40, 36)) -> Image.Image:
    img = Image.new("RGB", size, color)
    img.putpixel((3, 5), (color[2], color[0], color[1]))
    return img


RED, GREEN, BLUE, WHITE = (220, 20, 30), (10, 200, 40), (20, 30, 210), (250, 250, 250)



def randomize_bridge(model, seed: int = 0, gate_range: tuple[float, float] = (0.5, 1.5)) -> None:
    """Give the bridge weights a reference test can tell apart: every LayerNorm's scale and shift random
    (at initialisation they are 1 and 0, so a swapped or missing norm would go unseen), and every tanh gate
    a different non-zero alpha of random sign with |alpha| in ``gate_range`` (open, and not equal to tanh)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = gate_range
    with torch.no_grad():
        for module in [model.resampler, *model.xattn_blocks]:
            for sub in module.modules():
                if isinstance(sub, torch.nn.LayerNorm):
                    sub.weight.copy_(1 + 0.3 * torch.randn(sub.weight.shape, generator=g))
                    sub.bias.copy_(0.3 * torch.randn(sub.bias.shape, generator=g))
        for block in model.xattn_blocks:
            for gate in (block.attn_gate, block.ff_gate):
                sign = 1.0 if torch.rand((), generator=g) < 0.5 else -1.0
                gate.fill_(sign * (lo + (hi - lo) * float(torch.rand((), generator=g))))


def encode_pieces(processor, model, pieces: list[str]) -> list[int]:
    """Token ids of text pieces and the markers "IMG", "EOC" and "EOS" (the model's <image>, <|endofchunk|>
    and EOS ids); no BOS is added, so a test spells out exactly the row it means."""
    c = model.config
    special = {"IMG": c.media_token_id, "EOC": c.end_of_chunk_token_id, "EOS": c.eos_token_id}
    ids: list[int] = []
    for piece in pieces:
        ids += [special[piece]] if piece in special else processor.tokenizer.encode(piece, add_special_tokens=False)
    return ids
