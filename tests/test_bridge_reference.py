"""The bridge against independent references written from the paper (tests/bridge_reference.py), with
open gates and random LayerNorms so the visual pathway is really in the logits.

- the Perceiver Resampler (images and videos) equals the paper's pseudo-code;
- every GATED XATTN-DENSE block, inside a real forward, equals a per-token reference that routes each
  token by explicit loops (phi, the "all" ablation, the EOS reset), and the logits with the reference
  blocks substituted equal the model's;
- pixel_values in OpenFlamingo's [B, N, T, C, H, W] layout mean the rows' own media, in row order.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import bridge_reference as ref
from helpers import build, encode_pieces, randomize_bridge
from train_fixtures import single_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

ROUTINGS = [("last", False), ("last", True), ("all", False), ("all", True)]


def make_model(lm_type: str, mode: str = "last", reset: bool = False, seed: int = 0):
    model, processor = build(lm_type, seed=seed, media_attention=mode, reset_media_at_eos=reset)
    randomize_bridge(model, seed=seed)
    return model.eval(), processor


def packed_batch(processor, model) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids / attention_mask [3, L]: text before the first image, two documents packed
    with an EOS between them, several images per row, and a row without media (5 media in all)."""
    rows = [
        encode_pieces(processor, model, ["a red circle", "IMG", "two cats sit", "EOC", "IMG", " on the mat", "EOS", "the dog runs", "IMG", " in the park", "EOC"]),
        encode_pieces(processor, model, ["IMG", "Question: what colour", "IMG", " Answer: red", "EOC"]),
        encode_pieces(processor, model, ["the quick brown fox"]),
    ]
    length = max(map(len, rows))
    pad = model.config.pad_token_id
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    return ids, mask


def random_pixels(num: int, frames: int | None = None, seed: int = 0) -> torch.Tensor:
    """[num, 3, 32, 32] (or [num, frames, 3, 32, 32]) normalised pixels, every medium different."""
    g = torch.Generator().manual_seed(seed)
    shape = (num, 3, 32, 32) if frames is None else (num, frames, 3, 32, 32)
    return torch.randn(shape, generator=g)


def routing_of(model, input_ids, mode=None, reset=None):
    c = model.config
    return ref.visible_media(
        input_ids, media_token_id=c.media_token_id, eos_token_id=c.eos_token_id,
        reset_at_eos=c.reset_media_at_eos if reset is None else reset, mode=c.media_attention if mode is None else mode,
    )


@pytest.mark.parametrize("frames", [None, 3])
def test_resampler_equals_the_papers_pseudo_code(frames):
    model, _ = make_model("llama")
    pixels = random_pixels(3, frames)
    with torch.no_grad():
        features = model.encode_vision(pixels if frames else pixels[:, None])  # [M, T, S, d]
        got = model.encode_media(pixels if frames else pixels[:, None])
    c = model.config
    want = ref.resampler(features, model.resampler.state_dict(), heads=c.resampler_heads, depth=c.resampler_depth)
    assert got.shape == want.shape == (3, c.resampler_num_latents, features.shape[-1])
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    # the media differ, so their visual tokens must too (no medium leaks into another)
    assert (want[0] - want[1]).abs().max() > 1e-2


@pytest.mark.parametrize("lm_type", ["llama", "gpt2"])
@pytest.mark.parametrize("mode,reset", ROUTINGS)
def test_gated_xattn_blocks_equal_the_per_token_reference(lm_type, mode, reset):
    model, processor = make_model(lm_type, mode, reset)
    ids, mask = packed_batch(processor, model)
    pixels = random_pixels(5)
    c = model.config
    with torch.no_grad():
        features = model.encode_vision(pixels[:, None])
    visual = ref.resampler(features, model.resampler.state_dict(), heads=c.resampler_heads, depth=c.resampler_depth)
    visible = routing_of(model, ids)
    # the batch exercises the rule under test: every other routing gives other block outputs
    block0 = model.xattn_blocks[0]
    x0 = torch.randn(*ids.shape, model.lm_hidden_size, generator=torch.Generator().manual_seed(1))
    own = ref.gated_xattn_block(x0, visual, visible, block0.state_dict(), heads=c.xattn_heads)
    for other_mode, other_reset in ROUTINGS:
        if (other_mode, other_reset) != (mode, reset):
            other = ref.gated_xattn_block(x0, visual, routing_of(model, ids, other_mode, other_reset), block0.state_dict(), heads=c.xattn_heads)
            assert (own - other).abs().max() > 1e-3, (other_mode, other_reset)

    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    errors = []

    def substitute(block, args, output):
        want = ref.gated_xattn_block(args[0], visual, visible, block.state_dict(), heads=c.xattn_heads)
        errors.append(float((output.double() - want).abs().max()))
        return want.to(output.dtype)

    handles = [block.register_forward_hook(substitute) for block in model.xattn_blocks]
    try:
        with torch.no_grad():
            substituted = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    finally:
        for h in handles:
            h.remove()
    assert len(errors) == len(model.xattn_blocks) >= 2
    assert max(errors) < 1e-4, errors
    real = mask.bool()
    torch.testing.assert_close(plain[real], substituted[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lm_type", ["llama", "gpt2"])
def test_openflamingo_layout_is_the_rows_media_in_row_order(lm_type):
    """pixel_values [B, N, T, C, H, W]: row b's n-th <image> is medium (b, n). The logits equal those of the
    media passed flat [M, T, C, H, W] in row order, and those of each row run alone with its own media."""
    model, processor = make_model(lm_type)
    rows = [["IMG", "a red circle", "IMG", " two cats"], ["IMG", "the dog", "IMG", " runs in the"]]
    encoded = [encode_pieces(processor, model, r) for r in rows]
    length = max(map(len, encoded))
    pad = model.config.pad_token_id
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in encoded])
    mask = (ids != pad).long()
    pixels = random_pixels(4, frames=1).view(2, 2, 1, 3, 32, 32)  # [B, N, T, C, H, W], four different images
    with torch.no_grad():
        nested = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        flat = model(input_ids=ids, attention_mask=mask, pixel_values=pixels.flatten(0, 1)).logits
        transposed = model(input_ids=ids, attention_mask=mask, pixel_values=pixels.transpose(0, 1).flatten(0, 1)).logits
        alone = [model(input_ids=ids[b : b + 1, : len(encoded[b])], pixel_values=pixels[b]).logits[0] for b in range(2)]
    torch.testing.assert_close(nested, flat, atol=1e-5, rtol=1e-5)
    for b in range(2):
        torch.testing.assert_close(nested[b, : len(encoded[b])], alone[b], atol=1e-4, rtol=1e-4)
    # the orders are distinguishable: media (0, 1) and (1, 0) trade places in the column-major order
    assert (nested - transposed).abs().max() > 1e-2


def test_the_reference_routing_follows_the_papers_rules():
    """The loops of bridge_reference.visible_media on a hand-checked row (the references' own check)."""
    I, C, E, t = 7, 8, 1, 5  # <image>, <EOC>, EOS, a text token
    ids = torch.tensor([[t, I, t, C, I, t, E, t, I, t], [I, t, t, t, t, t, t, t, t, t]])
    kw = dict(media_token_id=I, eos_token_id=E)
    last = ref.visible_media(ids, reset_at_eos=False, mode="last", **kw)
    assert last[0] == [[], [0], [0], [0], [1], [1], [1], [1], [2], [2]]
    assert last[1] == [[3]] * 10  # the second row's media are numbered after the first row's
    assert ref.visible_media(ids, reset_at_eos=True, mode="last", **kw)[0] == [[], [0], [0], [0], [1], [1], [], [], [2], [2]]
    assert ref.visible_media(ids, reset_at_eos=False, mode="all", **kw)[0] == [[], [0], [0], [0], [0, 1], [0, 1], [0, 1], [0, 1], [0, 1, 2], [0, 1, 2]]
    assert ref.visible_media(ids, reset_at_eos=True, mode="all", **kw)[0] == [[], [0], [0], [0], [0, 1], [0, 1], [], [], [2], [2]]
    assert list(itertools.chain(*ref.visible_media(ids[1:], reset_at_eos=True, mode="all", **kw)[0])) == [0] * 10
