"""Vision adapters (CLIP, SigLIP, open_clip, timm) and the preprocessing facts they expose."""

import json

import pytest
import torch

from flamingo_vlm.modeling.vision import (
    OPENAI_CLIP_MEAN,
    HFVisionEncoder,
    ImagePreprocessing,
    guess_vision_type,
    load_vision_encoder,
)
from flamingo_vlm.processing import ImageTransform
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
    # transformers' SiglipImageProcessor: squash to the square size, no crop
    expected = dict(resize="squash", resize_size=IMAGE_SIZE, crop_offset="floor", resize_backend="torch")
    assert enc.preprocessing == ImagePreprocessing(IMAGE_SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), **expected)
    assert ImageTransform.for_encoder(enc) == ImageTransform(IMAGE_SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), **expected)


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
    assert enc.preprocessing.image_size == IMAGE_SIZE and enc.preprocessing.image_mean == mean


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


def test_preprocessing_read_from_preprocessor_config(tmp_path):
    make_tiny_clip(image_size=IMAGE_SIZE, patch_size=PATCH).save_pretrained(tmp_path)
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 24, "width": 24}, "size": {"shortest_edge": 28}, "image_mean": mean, "image_std": std}
    ))
    enc = load_vision_encoder(tmp_path)
    hf = dict(resize_size=28, crop_offset="floor", resize_backend="torch")
    assert enc.preprocessing == ImagePreprocessing(24, tuple(mean), tuple(std), **hf)
    assert ImageTransform.for_encoder(enc) == ImageTransform(24, tuple(mean), tuple(std), **hf)
    # SigLIP-style: size as height/width, no crop
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 20, "width": 20}, "resample": 2}))
    p = ImagePreprocessing.from_preprocessor_config(tmp_path, "siglip", 99)
    assert p == ImagePreprocessing(20, (0.5,) * 3, (0.5,) * 3, resize="squash", resize_size=20, resample="bilinear", crop_offset="floor", resize_backend="torch")
    # no preprocessor config: the processor class's defaults
    assert ImagePreprocessing.from_preprocessor_config(tmp_path / "none", "clip", 99) == ImagePreprocessing(99, resize_size=99, **{k: v for k, v in hf.items() if k != "resize_size"})


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
    assert enc.preprocessing.image_size == IMAGE_SIZE
    assert not any(p.requires_grad for p in enc.parameters())
    transform = ImageTransform.for_encoder(enc)
    x = torch.stack([transform(image(RED)), transform(image(BLUE))])
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
    assert enc.preprocessing.image_size == IMAGE_SIZE
    transform = ImageTransform.for_encoder(enc)
    x = torch.stack([transform(image(RED)), transform(image(BLUE))])
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
