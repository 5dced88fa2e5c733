"""Per-token media routing (the paper's phi) and its effect on the model's outputs."""

import pytest
import torch

from flamingo_vlm.modeling.masking import AllMediaRouting, LastMediaRouting, build_routing, media_index

from helpers import BLUE, GREEN, RED, WHITE, build, image, open_gates

IMG, EOS = 9, 1


def test_media_index_last_and_first():
    ids = torch.tensor([[5, IMG, 6, 7, IMG, 8, EOS, 6, IMG, 7]])
    last, first = media_index(ids, IMG)
    assert last.tolist() == [[-1, 0, 0, 0, 1, 1, 1, 1, 2, 2]]
    assert first.tolist() == [[0] * 10]
    last, first = media_index(ids, IMG, eos_token_id=EOS)
    # after the EOS a new document starts: no image until the next <image>
    assert last.tolist() == [[-1, 0, 0, 0, 1, 1, -1, -1, 2, 2]]
    assert first.tolist() == [[0, 0, 0, 0, 0, 0, 2, 2, 2, 2]]


def _reference_attend(q, k, v, allowed):
    """Naive per-token loop: q [B, L, H, D], k/v [M, H, n, D], allowed[b][l] = list of global media."""
    b, l, h, d = q.shape
    out = torch.zeros_like(q)
    for i in range(b):
        for j in range(l):
            media = allowed[i][j]
            if not media:
                continue
            keys = torch.cat([k[m] for m in media], dim=1)  # [H, n*len, D]
            values = torch.cat([v[m] for m in media], dim=1)
            att = torch.softmax(q[i, j, :, None, :] @ keys.transpose(-1, -2) / d**0.5, dim=-1)  # [H, 1, n*len]
            out[i, j] = (att @ values)[:, 0]
    return out


def _random_ids(gen, b, l, p_img=0.15, p_eos=0.0):
    ids = torch.randint(10, 50, (b, l), generator=gen)
    ids[torch.rand(b, l, generator=gen) < p_img] = IMG
    ids[torch.rand(b, l, generator=gen) < p_eos] = EOS
    return ids


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("reset", [False, True])
def test_last_media_routing_matches_per_token_loop(seed, reset):
    gen = torch.Generator().manual_seed(seed)
    ids = _random_ids(gen, 3, 23, p_eos=0.08 if reset else 0.0)
    counts = (ids == IMG).sum(1)
    offsets = counts.cumsum(0) - counts
    m, h, n, d = int(counts.sum()), 2, 5, 4
    q = torch.randn(3, 23, h, d, generator=gen)
    k, v = torch.randn(m, h, n, d, generator=gen), torch.randn(m, h, n, d, generator=gen)
    last, _ = media_index(ids, IMG, EOS if reset else None)
    allowed = [[[int(offsets[i] + last[i, j])] if last[i, j] >= 0 else [] for j in range(23)] for i in range(3)]
    routing = build_routing(ids, media_token_id=IMG, media_offsets=offsets, media_counts=counts,
                            mode="last", eos_token_id=EOS if reset else None)
    assert isinstance(routing, LastMediaRouting)
    torch.testing.assert_close(routing.attend(q, k, v), _reference_attend(q, k, v, allowed), atol=1e-6, rtol=1e-5)


def test_last_media_routing_with_rows_sharing_media():
    """Beams of one prompt share its media: rows with equal media offsets but different tokens."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(10, 50, (3, 15), generator=gen)
    ids[:, [0, 6]] = IMG
    ids[1, 9] = IMG  # a later image in one row only: rows need not be ordered by medium
    counts = (ids == IMG).sum(1)
    offsets = torch.zeros(3, dtype=torch.long)
    q = torch.randn(3, 15, 2, 4, generator=gen)
    k, v = torch.randn(3, 2, 5, 4, generator=gen), torch.randn(3, 2, 5, 4, generator=gen)
    last, _ = media_index(ids, IMG)
    allowed = [[[int(last[i, j])] if last[i, j] >= 0 else [] for j in range(15)] for i in range(3)]
    routing = build_routing(ids, media_token_id=IMG, media_offsets=offsets, media_counts=counts)
    torch.testing.assert_close(routing.attend(q, k, v), _reference_attend(q, k, v, allowed), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_all_media_routing_matches_per_token_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = _random_ids(gen, 3, 19, p_eos=0.05)
    counts = (ids == IMG).sum(1)
    offsets = counts.cumsum(0) - counts
    m, h, n, d = int(counts.sum()), 2, 3, 4
    q = torch.randn(3, 19, h, d, generator=gen)
    k, v = torch.randn(m, h, n, d, generator=gen), torch.randn(m, h, n, d, generator=gen)
    last, first = media_index(ids, IMG, EOS)
    allowed = [[[int(offsets[i]) + x for x in range(int(first[i, j]), int(last[i, j]) + 1)] for j in range(19)] for i in range(3)]
    routing = build_routing(ids, media_token_id=IMG, media_offsets=offsets, media_counts=counts,
                            mode="all", eos_token_id=EOS)
    assert isinstance(routing, AllMediaRouting)
    torch.testing.assert_close(routing.attend(q, k, v), _reference_attend(q, k, v, allowed), atol=1e-6, rtol=1e-5)


def test_grouped_layout_is_flat_in_the_number_of_images():
    """The grouped query layout holds at most ~2x the routed tokens, whatever the number of images."""
    for num_images in (1, 5, 33):
        chunk = 12
        ids = torch.full((2, num_images * chunk), 20)
        ids[:, ::chunk] = IMG
        counts = (ids == IMG).sum(1)
        routing = build_routing(ids, media_token_id=IMG, media_offsets=counts.cumsum(0) - counts, media_counts=counts)
        slots = len(routing.row_media) * routing.row_length
        assert slots <= 2 * ids.numel() + int(counts.sum())
        assert routing.row_length == chunk


def _xattn_outputs(model, batch):
    """Output of the first gated xattn block's cross-attention (before its gate), per token: [B, L, d]."""
    captured = {}
    handle = model.xattn_blocks[0].attn.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    with torch.no_grad():
        logits = model(**batch).logits
    handle.remove()
    return captured["out"], logits


def _two_image_batches(processor, mode_reset=False):
    first = [image(RED), "Output: a red circle.<|endofchunk|>", image(BLUE), "Output: a blue square.<|endofchunk|>"]
    a = processor([first + [image(GREEN), "Output:"]], padding_side="right")
    b = processor([first + [image(WHITE), "Output:"]], padding_side="right")
    return a, b


def test_changing_an_image_changes_nothing_before_it():
    model, processor = build("llama")
    open_gates(model, 0.8)
    a, b = _two_image_batches(processor)
    xa, la = _xattn_outputs(model, a)
    xb, lb = _xattn_outputs(model, b)
    pos = int((a["input_ids"][0] == model.config.media_token_id).nonzero()[2])  # the changed (third) image
    assert torch.equal(la[:, :pos], lb[:, :pos])
    assert not torch.allclose(la[:, pos:], lb[:, pos:])
    # immediate mode: in the cross-attention output only tokens whose last image is the changed one move
    assert torch.equal(xa[:, :pos], xb[:, :pos])
    assert (xa[0, pos:] - xb[0, pos:]).abs().amax(-1).min() > 0


def test_tokens_before_any_image_get_zero_cross_attention():
    model, processor = build("gpt2")
    open_gates(model)
    batch = processor(["a prefix with no image", image(RED), "Output: red"], padding_side="right")
    x, _ = _xattn_outputs(model, batch)
    pos = int((batch["input_ids"][0] == model.config.media_token_id).nonzero()[0])
    assert torch.equal(x[0, :pos], torch.zeros_like(x[0, :pos]))
    assert x[0, pos:].abs().amax(-1).min() > 0


def _swap_first_of_two_images(model, processor):
    """Cross-attention outputs of a two-image prompt, and of it with image 1 changed; and image 2's position."""
    open_gates(model)
    a = processor([image(RED), "Output: red.<|endofchunk|>", image(BLUE), "Output: blue"], padding_side="right")
    b = processor([image(GREEN), "Output: red.<|endofchunk|>", image(BLUE), "Output: blue"], padding_side="right")
    xa, _ = _xattn_outputs(model, a)
    xb, _ = _xattn_outputs(model, b)
    return xa, xb, int((a["input_ids"][0] == model.config.media_token_id).nonzero()[1])


def test_immediate_mode_other_image_tokens_unaffected():
    """Changing image 1 leaves the cross-attention output of tokens that see image 2 untouched."""
    xa, xb, second = _swap_first_of_two_images(*build("opt"))
    assert torch.equal(xa[0, second:], xb[0, second:])
    assert not torch.equal(xa[0, :second], xb[0, :second])


def test_all_previous_images_mode():
    xa, xb, second = _swap_first_of_two_images(*build("llama", media_attention="all"))
    # tokens after image 2 still see image 1 in this mode
    assert (xa[0, second:] - xb[0, second:]).abs().amax(-1).min() > 0


def test_document_reset_at_eos():
    model, processor = build("llama", reset_media_at_eos=True)
    open_gates(model)
    eos = processor.tokenizer.eos_token
    batch = processor([image(RED), f"Output: red.<|endofchunk|>{eos}next document", image(BLUE), "Output: blue"], padding_side="right")
    x, _ = _xattn_outputs(model, batch)
    ids = batch["input_ids"][0]
    eos_pos = int((ids == processor.tokenizer.eos_token_id).nonzero()[-1])
    second = int((ids == model.config.media_token_id).nonzero()[1])
    assert torch.equal(x[0, eos_pos:second], torch.zeros_like(x[0, eos_pos:second]))
    assert x[0, :eos_pos].abs().amax(-1)[1:].min() > 0
