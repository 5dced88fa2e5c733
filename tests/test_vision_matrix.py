"""Vision encoders at the shapes real checkpoints have (tiny width and depth; real patch size, image size
and so position-embedding count): CLIP ViT-L/14 at 224 and 336 px, SigLIP (so400m/14 at 384 px), SigLIP 2
(fixed resolution, B/16 at 256 px), open_clip ViT-L-14 and timm ViTs (class token; register tokens).

For each: a Flamingo on a tiny LM is the LM to the bit at gate 0, the encoder gives (image / patch)^2 patch
tokens, the model saves and loads back exactly, and the processor's pixels are the encoder's own
preprocessing (transformers' image processor saved with the checkpoint, open_clip's / timm's transform).
"""

import json
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

from flamingo_vlm import build_flamingo, load_flamingo
from flamingo_vlm.modeling.vision import load_vision_encoder
from flamingo_vlm.tiny import create_tiny_backbones

from helpers import SMALL_BRIDGE, randomize_bridge
from test_image_preprocessing import photo

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
IMAGES = [photo(640, 480, seed=0), photo(333, 500, seed=1), photo(501, 377, seed=2)]


@dataclass
class Case:
    vision: Any  # what build_flamingo / load_flamingo take
    tokens: int  # patch tokens per image
    width: int
    reference: Callable  # PIL image -> [3, H, W], the encoder family's own preprocessing
    atol: float = 0.0  # transformers fuses rescale and normalise: float32 rounding apart


def _hf(tmp_path, kind: str, image_size: int, patch_size: int) -> Case:
    from transformers import AutoImageProcessor, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, SiglipImageProcessor
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**TINY, image_size=image_size, patch_size=patch_size))
        processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**TINY, image_size=image_size, patch_size=patch_size))
        processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reference = AutoImageProcessor.from_pretrained(tmp_path)  # as a user of the checkpoint would preprocess
    return Case(str(tmp_path), (image_size // patch_size) ** 2, 32, lambda img: reference(img, return_tensors="pt")["pixel_values"][0], 2e-6)


def _open_clip(tmp_path) -> Case:
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transform import PreprocessCfg, image_transform_v2

    name = "flamingo-vlm-test-vit-l-14-shapes"
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
        "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 16, "heads": 1, "layers": 1},
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    encoder = load_vision_encoder(name, "open_clip", pretrained=None)
    reference = image_transform_v2(PreprocessCfg(**encoder.visual.preprocess_cfg), is_train=False)
    return Case(encoder, 256, 32, reference)


def _timm(model_name: str, **kwargs) -> Callable[[Any], Case]:
    def make(tmp_path) -> Case:
        timm = pytest.importorskip("timm")
        torch.manual_seed(0)
        encoder = load_vision_encoder(model_name, "timm", pretrained=False, embed_dim=32, depth=2, num_heads=2, **kwargs)
        # built at another size than its pretrained config's (DINOv2: 518), a timm user asks for the size it takes
        size = {"input_size": (3, 224, 224)} if "img_size" in kwargs else {}
        reference = timm.data.create_transform(**timm.data.resolve_data_config(size, model=encoder.model))
        return Case(encoder, 256, 32, reference)

    return make


CASES = {
    "clip-vit-l14-224": lambda p: _hf(p, "clip", 224, 14),
    "clip-vit-l14-336": lambda p: _hf(p, "clip", 336, 14),
    "siglip-so400m14-384": lambda p: _hf(p, "siglip", 384, 14),
    "siglip2-b16-256": lambda p: _hf(p, "siglip", 256, 16),
    "open_clip-vit-l-14": _open_clip,
    "timm-vit-l14-clip-224": _timm("vit_large_patch14_clip_224"),  # class token, crop_pct 1.0
    "timm-vit-s14-reg4-224": _timm("vit_small_patch14_reg4_dinov2", img_size=224),  # class + 4 register tokens
}


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory):
    return create_tiny_backbones(tmp_path_factory.mktemp("backbones"))[0]


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request, lm_path, tmp_path_factory):
    case = CASES[request.param](tmp_path_factory.mktemp(request.param))
    torch.manual_seed(1)
    model, processor = build_flamingo(lm_path, case.vision, **SMALL_BRIDGE)
    return case, model, processor


def test_features_are_one_token_per_patch(built):
    case, model, processor = built
    pixels = torch.stack([processor.image_transform(img) for img in IMAGES])
    with torch.no_grad():
        features = model.vision_encoder(pixels)
    assert features.shape == (len(IMAGES), case.tokens, case.width)
    assert torch.isfinite(features).all() and not torch.allclose(features[0], features[1])


def test_processor_pixels_are_the_encoders_own_preprocessing(built):
    case, _, processor = built
    for img in IMAGES:
        ours, reference = processor.image_transform(img), case.reference(img)
        assert ours.shape == reference.shape
        torch.testing.assert_close(ours, reference, atol=case.atol, rtol=0)


def _batch(processor):
    return processor([["a red", IMAGES[0], "circle<|endofchunk|>", IMAGES[1], "two cats"], ["dog", IMAGES[2], "Output:"]], padding_side="right")


def test_gate_zero_is_the_lm_to_the_bit(built):
    _, model, processor = built
    batch = _batch(processor)
    with torch.no_grad():
        with_media = model(**batch).logits
        lm_only = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(with_media, lm_only)


def test_save_and_load_are_exact(built, tmp_path):
    case, model, processor = built
    randomize_bridge(model)  # gates open, every bridge weight counts
    batch = _batch(processor)
    with torch.no_grad():
        expected = model(**batch).logits
        assert not torch.allclose(expected, model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # a checkpoint directory reloads by its path; open_clip/timm towers here are random, so the object is passed
    loaded, loaded_processor = load_flamingo(tmp_path, vision=None if isinstance(case.vision, str) else case.vision)
    assert loaded_processor.image_transform == processor.image_transform
    batch = _batch(loaded_processor)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_siglip2_naflex_is_refused_with_the_reason(tmp_path):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    model = Siglip2VisionModel(Siglip2VisionConfig(**TINY, patch_size=16, num_patches=64))
    with pytest.raises(ValueError, match=r"SigLIP 2 NaFlex model .*variable-resolution patch sequences.*fixed-resolution"):
        load_vision_encoder(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="SigLIP 2 NaFlex"):
        load_vision_encoder(str(tmp_path))
    with pytest.raises(ValueError, match="SigLIP 2 NaFlex"):
        load_vision_encoder(str(tmp_path), "siglip")
