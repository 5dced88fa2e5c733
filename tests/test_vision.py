"""Vision adapters (CLIP, SigLIP, open_clip, timm), the image transform and image decoding."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from flamingo_vlm.modeling.vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    HFVisionEncoder,
    ImageTransform,
    guess_vision_type,
    load_image,
    load_vision_encoder,
)
from flamingo_vlm.tiny import make_tiny_clip

from helpers import BLUE, RED, image

IMAGE_SIZE, PATCH = 32, 8
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2


def make_tiny_siglip(hidden_size: int = 32, seed: int = 0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH,
    )
    torch.manual_seed(seed)
    return SiglipVisionModel(config).eval()


def _pixels(n=2, seed=0):
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


# ---- Hugging Face adapters ------------------------------------------------------------------------
def test_clip_object_drops_cls_token():
    clip = make_tiny_clip(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=48)
    enc = load_vision_encoder(clip)
    assert isinstance(enc, HFVisionEncoder) and enc.vision_type == "clip" and enc.hidden_size == 48
    x = _pixels(3)
    with torch.no_grad():
        feats = enc(x)
        ref = clip(pixel_values=x).last_hidden_state
    assert feats.shape == (3, NUM_PATCHES, 48)  # CLS dropped: S = (image / patch)^2
    assert ref.shape[1] == NUM_PATCHES + 1
    assert torch.equal(feats, ref[:, 1:])
    # frozen and in eval mode
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())


def test_siglip_object_keeps_all_patches():
    siglip = make_tiny_siglip(hidden_size=32)
    enc = load_vision_encoder(siglip)
    assert enc.vision_type == "siglip" and enc.hidden_size == 32
    x = _pixels(2)
    with torch.no_grad():
        feats = enc(x)
        ref = siglip(pixel_values=x).last_hidden_state
    assert feats.shape == (2, NUM_PATCHES, 32)  # SigLIP has no CLS token: every patch is kept
    assert torch.equal(feats, ref)
    assert enc.image_transform == ImageTransform(IMAGE_SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_loading_from_a_saved_directory(kind, tmp_path):
    model = make_tiny_clip(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=48) if kind == "clip" else make_tiny_siglip(48)
    model.save_pretrained(tmp_path)
    assert guess_vision_type(tmp_path) == kind
    assert guess_vision_type(str(tmp_path)) == kind
    enc = load_vision_encoder(str(tmp_path))
    assert enc.vision_type == kind and enc.name_or_path == str(tmp_path)
    x = _pixels(2)
    with torch.no_grad():
        feats, direct = enc(x), load_vision_encoder(model)(x)
    assert feats.shape == (2, NUM_PATCHES, 48)
    torch.testing.assert_close(feats, direct, atol=1e-6, rtol=1e-6)
    mean = OPENAI_CLIP_MEAN if kind == "clip" else (0.5, 0.5, 0.5)
    assert enc.image_transform.size == IMAGE_SIZE and enc.image_transform.mean == mean


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_feature_layer_picks_a_hidden_layer(kind):
    model = make_tiny_clip(image_size=IMAGE_SIZE, patch_size=PATCH) if kind == "clip" else make_tiny_siglip()
    x = _pixels(2)
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states
        last = load_vision_encoder(model, kind)(x)
        penultimate = load_vision_encoder(model, kind, feature_layer=-2)(x)
        first = load_vision_encoder(model, kind, feature_layer=1)(x)
    drop = 1 if kind == "clip" else 0
    assert penultimate.shape == last.shape == first.shape
    assert torch.equal(penultimate, hidden[-2][:, drop:])
    assert torch.equal(first, hidden[1][:, drop:])
    assert not torch.allclose(penultimate, last)


def test_guess_vision_type_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the vision encoder type"):
        guess_vision_type(tmp_path)  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        guess_vision_type(tmp_path)
    with pytest.raises(ValueError, match="vision_type"):
        load_vision_encoder(torch.nn.Linear(2, 2))


def test_unknown_vision_type_is_a_clear_error():
    clip = make_tiny_clip()
    with pytest.raises(ValueError, match=r"unknown vision_type 'resnet'.*clip.*open_clip.*siglip.*timm"):
        load_vision_encoder(clip, "resnet")


def test_image_transform_read_from_preprocessor_config(tmp_path):
    make_tiny_clip(image_size=IMAGE_SIZE, patch_size=PATCH).save_pretrained(tmp_path)
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 24, "width": 24}, "size": {"shortest_edge": 28}, "image_mean": mean, "image_std": std}
    ))
    enc = load_vision_encoder(tmp_path)
    assert enc.image_transform == ImageTransform(24, tuple(mean), tuple(std))
    # SigLIP-style: size as height/width, no crop
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 20, "width": 20}}))
    t = ImageTransform.from_preprocessor_config(tmp_path, 99, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert t == ImageTransform(20, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    # no preprocessor config: the defaults
    assert ImageTransform.from_preprocessor_config(tmp_path / "none", 99, (0.5,) * 3, (0.5,) * 3) == ImageTransform(99, (0.5,) * 3, (0.5,) * 3)


# ---- ImageTransform -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(40, 36), (20, 70), (16, 16)])
def test_image_transform_shape(size):
    t = ImageTransform(size=24)
    x = t(image(RED, size=size))
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32


def test_image_transform_normalises_a_flat_colour():
    color = (255, 0, 128)
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.2, 0.1)
    x = ImageTransform(size=16, mean=mean, std=std)(Image.new("RGB", (30, 20), color))
    for c in range(3):
        expected = (color[c] / 255.0 - mean[c]) / std[c]
        torch.testing.assert_close(x[c], torch.full((16, 16), expected), atol=1e-5, rtol=0)
    # grayscale and RGBA inputs become 3 channels
    assert ImageTransform(size=8)(Image.new("L", (10, 10), 7)).shape == (3, 8, 8)
    assert ImageTransform(size=8)(Image.new("RGBA", (10, 10), (1, 2, 3, 4))).shape == (3, 8, 8)


def test_image_transform_centre_crops():
    """A wide image: the left and right margins are cropped away, the centre is kept."""
    img = Image.new("RGB", (30, 10), BLUE)
    for x in range(10, 20):
        for y in range(10):
            img.putpixel((x, y), RED)
    out = ImageTransform(size=10, mean=(0, 0, 0), std=(1, 1, 1))(img)
    torch.testing.assert_close(out[:, 5, 5], torch.tensor(RED) / 255.0, atol=1e-6, rtol=0)
    assert out[0].amin() > 0.5  # no blue margin left


def test_image_transform_save_load_round_trip(tmp_path):
    t = ImageTransform(size=48, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    t.save(tmp_path)
    loaded = ImageTransform.load(tmp_path)
    assert loaded == t
    assert isinstance(loaded.mean, tuple) and isinstance(loaded.std, tuple)
    assert torch.equal(loaded(image(RED)), t(image(RED)))


# ---- load_image -----------------------------------------------------------------------------------
def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_sources(tmp_path):
    img = image(RED, size=(12, 9))
    ref = np.asarray(img)
    assert load_image(img) is img
    path = tmp_path / "a.png"
    img.save(path)
    for source in (path, str(path), _png_bytes(img), bytearray(_png_bytes(img)), ref.copy()):
        loaded = load_image(source)
        assert isinstance(loaded, Image.Image), type(source)
        assert np.array_equal(np.asarray(loaded.convert("RGB")), ref), type(source)
    gray = load_image(np.full((5, 6, 1), 9, dtype=np.uint8))
    assert gray.size == (6, 5) and gray.getpixel((0, 0)) == 9
    # every source gives the same transformed tensor
    t = ImageTransform(size=8)
    assert torch.equal(t(path), t(img)) and torch.equal(t(_png_bytes(img)), t(ref))


def test_load_image_rejects_bad_arrays_and_types():
    with pytest.raises(ValueError, match="H x W x C uint8"):
        load_image(np.zeros((5, 5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="H x W x C uint8"):
        load_image(np.zeros((5, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="cannot read an image from a int"):
        load_image(3)


def test_corrupt_bytes_fail_to_decode():
    with pytest.raises(ValueError, match="failed to decode image bytes"):
        load_image(b"definitely not an image")
    truncated = _png_bytes(image(RED, size=(64, 64)))[:60]
    with pytest.raises(ValueError, match="failed to decode"):
        load_image(truncated)


def test_corrupt_file_fails_to_decode(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 garbage garbage")
    with pytest.raises(ValueError, match="failed to decode image file .*broken.jpg"):
        load_image(bad)
    with pytest.raises(ValueError, match="failed to decode"):
        ImageTransform(size=8)(str(bad))


# ---- optional adapters ----------------------------------------------------------------------------
def test_open_clip_adapter(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    name = "flamingo-vlm-test-tiny-vit"
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": PATCH},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    enc = load_vision_encoder(name, "open_clip", pretrained=None)
    assert enc.vision_type == "open_clip" and enc.hidden_size == 64 and enc.name_or_path == name
    assert enc.image_transform.size == IMAGE_SIZE
    assert not any(p.requires_grad for p in enc.parameters())
    x = torch.stack([enc.image_transform(image(RED)), enc.image_transform(image(BLUE))])
    with torch.no_grad():
        feats = enc(x)
    assert feats.shape == (2, NUM_PATCHES, 64)  # patch tokens, no class token
    assert not torch.allclose(feats[0], feats[1])


def test_timm_adapter():
    pytest.importorskip("timm")
    kwargs = dict(img_size=IMAGE_SIZE, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2)
    enc = load_vision_encoder("vit_tiny_patch16_224", "timm", pretrained=False, **kwargs)
    assert enc.vision_type == "timm" and enc.hidden_size == 32 and enc.num_prefix_tokens == 1
    # the transform follows the model's input size (not the pretrained config's 224)
    assert enc.image_transform.size == IMAGE_SIZE
    x = torch.stack([enc.image_transform(image(RED)), enc.image_transform(image(BLUE))])
    with torch.no_grad():
        feats = enc(x)
        ref = enc.model.forward_features(x)
    assert feats.shape == (2, NUM_PATCHES, 32)
    assert torch.equal(feats, ref[:, 1:])  # the class token is dropped


def test_timm_convnet_feature_map_is_flattened():
    pytest.importorskip("timm")
    enc = load_vision_encoder("resnet18", "timm", pretrained=False, layers=(1, 1, 1, 1))
    assert enc.hidden_size == 512
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = enc(x)
        fmap = enc.model.forward_features(x)  # [N, d, h, w]
    assert fmap.shape == (2, 512, 2, 2)
    assert feats.shape == (2, 4, 512)
    assert torch.equal(feats[:, 1], fmap[:, :, 0, 1])  # row-major positions
