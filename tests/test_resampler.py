"""Perceiver Resampler: fixed-size output, time embeddings, frame masks; images and videos in one batch."""

import pytest
import torch

from flamingo_vlm import PerceiverResampler, Video

from helpers import BLUE, GREEN, RED, WHITE, build, image

DIM = 16


def _resampler(max_num_frames=4, seed=0):
    torch.manual_seed(seed)
    return PerceiverResampler(dim=DIM, depth=2, num_latents=5, heads=2, dim_head=8, ff_mult=2, max_num_frames=max_num_frames).eval()


def _features(m, t, s, seed=0):
    return torch.randn(m, t, s, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("m, t, s", [(1, 1, 1), (3, 1, 16), (2, 4, 7), (2, 9, 3)])
def test_output_shape_is_fixed(m, t, s):
    r = _resampler(max_num_frames=4)
    with torch.no_grad():
        out = r(_features(m, t, s))
    assert out.shape == (m, 5, DIM)
    assert torch.isfinite(out).all()


def test_media_are_resampled_independently():
    r = _resampler()
    feats = _features(3, 2, 6)
    with torch.no_grad():
        together = r(feats)
        alone = torch.cat([r(feats[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[1])


def test_time_embeddings_are_added_per_frame():
    """Swapping two frames changes the output only because of the time embeddings."""
    r = _resampler()
    feats = _features(1, 2, 4)
    swapped = feats[:, [1, 0]]
    with torch.no_grad():
        a, b = r(feats), r(swapped)
        assert not torch.allclose(a, b, atol=1e-4)
        r.time_embeddings.zero_()
        torch.testing.assert_close(r(feats), r(swapped), atol=1e-5, rtol=1e-5)


def test_time_embeddings_interpolate_past_max_num_frames():
    r = _resampler(max_num_frames=4)
    learned = r.time_embeddings.detach()
    assert torch.equal(r.time_embedding(3), learned[:3])
    assert torch.equal(r.time_embedding(4), learned)
    emb = r.time_embedding(10)
    assert emb.shape == (10, DIM)
    torch.testing.assert_close(emb[0], learned[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(emb[-1], learned[-1], atol=1e-6, rtol=0)
    # linear: 10 frames over 4 embeddings, frame 3 sits exactly on learned[1]
    torch.testing.assert_close(emb[3], learned[1], atol=1e-6, rtol=0)
    assert not torch.allclose(emb[1], learned[1])
    with torch.no_grad():
        assert r(_features(2, 10, 3)).shape == (2, 5, DIM)


@pytest.mark.parametrize("real, padded", [(2, 4), (1, 3), (3, 7), (6, 9)])
def test_padded_video_equals_unpadded(real, padded):
    """Zero frames masked out by frame_mask change nothing, within and beyond max_num_frames."""
    r = _resampler(max_num_frames=4)
    feats = _features(1, real, 6)
    pad = torch.cat([feats, torch.zeros(1, padded - real, 6, DIM)], dim=1)
    mask = torch.zeros(1, padded, dtype=torch.bool)
    mask[:, :real] = True
    with torch.no_grad():
        ref = r(feats)
        out = r(pad, mask)
        unmasked = r(pad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked, ref, atol=1e-4)  # the mask is what makes them equal


def test_frame_mask_in_a_batch_of_different_lengths():
    """Each medium of a padded batch equals that medium resampled alone."""
    r = _resampler(max_num_frames=4)
    lengths = [1, 3, 6, 5]
    t = max(lengths)
    media = [_features(1, n, 4, seed=i) for i, n in enumerate(lengths)]
    batch = torch.zeros(len(lengths), t, 4, DIM)
    mask = torch.zeros(len(lengths), t, dtype=torch.bool)
    for i, (x, n) in enumerate(zip(media, lengths)):
        batch[i, :n], mask[i, :n] = x[0], True
    with torch.no_grad():
        out = r(batch, mask)
        for i, x in enumerate(media):
            torch.testing.assert_close(out[i : i + 1], r(x), atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_clear_errors():
    r = _resampler()
    with pytest.raises(ValueError, match=r"resampler expects features \[media, frames, positions, dim\]"):
        r(torch.randn(2, 6, DIM))
    with pytest.raises(ValueError, match=r"frame_mask must have shape \(2, 3\)"):
        r(_features(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))


# ---- in the model ---------------------------------------------------------------------------------
def _frames(colors):
    return Video([image(c) for c in colors])


def test_image_and_video_in_one_batch():
    model, processor = build("llama")
    batch = processor([[image(RED), "Output: red"], ["a clip", _frames([GREEN, BLUE, WHITE]), "Output:"]])
    assert batch["pixel_values"].shape[:2] == (2, 3)
    assert batch["frame_mask"].tolist() == [[True, False, False], [True, True, True]]
    alone = processor([image(RED), "Output: red"])
    video_alone = processor(["a clip", _frames([GREEN, BLUE, WHITE]), "Output:"])
    with torch.no_grad():
        mixed = model(**batch).visual_tokens
        ref_image = model.encode_media(alone["pixel_values"])
        ref_video = model(**video_alone).visual_tokens
    assert mixed.shape == (2, model.config.resampler_num_latents, model.vision_encoder.hidden_size)
    torch.testing.assert_close(mixed[:1], ref_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1:], ref_video, atol=1e-5, rtol=1e-5)


def test_videos_longer_than_max_num_frames_in_one_batch():
    """Two videos past max_num_frames, of different lengths: each gets the visual tokens it gets alone."""
    model, processor = build("llama", max_num_frames=2)
    short, long = _frames([RED, GREEN, BLUE]), _frames([BLUE, WHITE, RED, GREEN, WHITE])
    batch = processor([["a", short, "b"], ["c", long, "d"]])
    with torch.no_grad():
        mixed = model(**batch).visual_tokens
        ref_short = model(**processor(["a", short, "b"])).visual_tokens
        ref_long = model(**processor(["c", long, "d"])).visual_tokens
    torch.testing.assert_close(mixed[:1], ref_short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1:], ref_long, atol=1e-5, rtol=1e-5)


def test_vision_encoder_never_sees_padding_frames():
    model, processor = build("llama")
    seen = []
    handle = model.vision_encoder.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    try:
        batch = processor([[image(RED), "x", _frames([GREEN, BLUE]), "y"], ["z", _frames([RED, GREEN, BLUE, WHITE]), "w"]])
        assert batch["pixel_values"].shape[:2] == (3, 4)  # 12 frame slots, 7 real frames
        with torch.no_grad():
            model(**batch)
            model.generate(**batch, max_new_tokens=2)
    finally:
        handle.remove()
    assert seen == [7, 7]


def test_time_embeddings_get_gradients_with_a_frame_mask():
    r = _resampler(max_num_frames=4).train()
    mask = torch.tensor([[True, True, True, True, True, False], [True, False, False, False, False, False]])
    r(_features(2, 6, 3), mask).sum().backward()
    grad = r.time_embeddings.grad
    assert grad is not None and (grad.abs().sum(-1) > 0).all()  # 5 frames interpolate over all 4 embeddings


def test_spatial_position_embeddings_make_the_output_depend_on_where_features_are():
    """Without spatial embeddings the resampler is blind to the order of a frame's features (attention is
    permutation-invariant over keys); with them, moving a feature to another position changes the tokens."""
    feats = _features(1, 1, 6)
    moved = feats[:, :, torch.tensor([5, 1, 2, 3, 4, 0])]
    plain = _resampler()
    torch.manual_seed(0)
    spatial = PerceiverResampler(dim=DIM, depth=2, num_latents=5, heads=2, dim_head=8, ff_mult=2, spatial_positions=6).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(feats), plain(moved), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(spatial(feats), spatial(moved), atol=1e-4)
    with pytest.raises(ValueError, match="resampler_spatial_positions=7"):
        spatial(_features(1, 1, 7))


def test_spatial_position_embeddings_are_trained_and_saved():
    model, processor = build("llama", resampler_spatial_positions=16)  # the tiny CLIP gives 4x4 patch features
    assert "resampler.spatial_embeddings" in dict(model.trainable_parameters())
    assert "resampler.spatial_embeddings" in model.flamingo_state_dict()
    with torch.no_grad():
        out = model(**processor([image(RED), "a red square"]))
    assert out.visual_tokens.shape == (1, model.config.resampler_num_latents, model.vision_encoder.hidden_size)


def test_spatial_embeddings_start_as_a_grid_code():
    """Square grids start from 2-D sine-cosine codes: centred, unit scale, nearby features alike, so where a
    feature is can be read linearly from the first step; other layouts start from random codes."""
    from flamingo_vlm.modeling.resampler import spatial_position_init

    codes = spatial_position_init(64, 96)  # an 8 x 8 grid, row-major
    assert codes.shape == (64, 96)
    torch.testing.assert_close(codes.mean(dim=0), torch.zeros(96), atol=1e-5, rtol=0)
    assert abs(codes.std().item() - 1.0) < 1e-4
    sim = (codes @ codes.T).view(64, 8, 8)
    assert sim[0, 0, 0] > sim[0, 0, 1] > sim[0, 0, 2] and sim[0, 0, 0] > sim[0, 1, 0] > sim[0, 2, 0]
    # left half against right half: one direction separates them, at every row
    direction = codes.view(8, 8, 96)[:, :4].mean(dim=(0, 1)) - codes.view(8, 8, 96)[:, 4:].mean(dim=(0, 1))
    score = (codes @ direction).view(8, 8)
    assert (score[:, :4].min(dim=1).values > score[:, 4:].max(dim=1).values).all()
    assert spatial_position_init(6, 8).shape == (6, 8)  # not a square grid: random codes


@pytest.mark.parametrize("activation", ["squared_relu", "gelu"])
def test_feed_forward_recomputing_its_activation_gives_the_plain_gradients(activation):
    """FeedForward keeps only the pre-activation for the backward; outputs and gradients are the plain ones."""
    from flamingo_vlm.modeling.layers import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(DIM, mult=3, activation=activation)
    x = torch.randn(2, 5, DIM, requires_grad=True)
    out = ff(x)
    out.square().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in ff.parameters()]
    x.grad = None
    ff.zero_grad()
    plain = torch.nn.Sequential(*ff)(x)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    plain.square().sum().backward()
    for a, b in zip(got, [x.grad] + [p.grad for p in ff.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # under bf16 autocast too (the backward casts as autocast's linear would)
    runs = []
    for module in (ff, torch.nn.Sequential(*ff)):
        x.grad = None
        ff.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
        y.float().square().sum().backward()
        runs.append([y, x.grad.clone()] + [p.grad.clone() for p in ff.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # frozen weights (no grad anywhere): the plain path, nothing saved
    for p in ff.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(ff(x), plain, rtol=0, atol=0)
