"""ImageTransform gives the pixels each encoder family's own preprocessing gives, on non-square images of
common sizes: torchvision's transforms (OpenAI CLIP, open_clip), open_clip's ``image_transform``, timm's
``create_transform``, and transformers' CLIP / SigLIP image processors (torchvision- and PIL-backed), each
built here from the same configuration the encoder loaders read."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from flamingo_vlm.modeling.vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocessing, load_vision_encoder
from flamingo_vlm.processing import ImageTransform
from flamingo_vlm.tiny import make_tiny_clip

# (width, height): COCO's most common sizes, portrait and landscape, odd sizes, a short side already at
# the target (no resampling), and one a pixel above it.
SIZES = [(640, 480), (500, 375), (480, 640), (333, 500), (427, 640), (501, 377), (375, 500), (224, 300), (337, 500), (641, 225)]
TARGETS = [224, 336]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like image: smooth gradients plus texture, so resampling filters and offsets both matter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], axis=-1) * 200
    noise = rng.normal(0, 25, (height, width, 3))
    return Image.fromarray(np.clip(base + noise + 20, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images():
    return {size: photo(*size, seed=i) for i, size in enumerate(SIZES)}


def _torchvision(size, mean, std, *, resample="bicubic", resize_size=None, squash=False):
    tv = pytest.importorskip("torchvision.transforms")
    mode = {"bicubic": tv.InterpolationMode.BICUBIC, "bilinear": tv.InterpolationMode.BILINEAR}[resample]
    resize_size = resize_size or size
    resize = tv.Resize((resize_size, resize_size) if squash else resize_size, interpolation=mode)
    return tv.Compose([resize, tv.CenterCrop(size), tv.ToTensor(), tv.Normalize(mean, std)])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("resample", ["bicubic", "bilinear"])
def test_default_is_torchvision_resize_and_center_crop_exactly(images, target, resample):
    """OpenAI CLIP's and open_clip's preprocessing: Resize(int) floors the long side, CenterCrop rounds the offset."""
    reference = _torchvision(target, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resample=resample)
    ours = ImageTransform(target, resample=resample)
    for size, img in images.items():
        assert torch.equal(ours(img), reference(img)), size


def test_resized_size_truncates_the_long_side_as_torchvision_does():
    t = ImageTransform(224)
    assert t.resized_size(640, 480) == (298, 224)  # 298.67: round() would give 299
    assert t.resized_size(500, 375) == (298, 224)
    assert t.resized_size(333, 500) == (224, 336)  # 336.34
    assert ImageTransform(224, resize="squash").resized_size(640, 480) == (224, 224)
    assert ImageTransform(224, resize_size=256).resized_size(500, 375) == (341, 256)


@pytest.mark.parametrize("target", TARGETS)
def test_open_clip_preprocessing_from_the_models_preprocess_cfg(images, target, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transform import PreprocessCfg, image_transform_v2

    for resize_mode, interpolation in [("shortest", "bicubic"), ("squash", "bilinear")]:
        name = f"flamingo-vlm-test-pp-{target}-{resize_mode}"
        config = {
            "embed_dim": 16,
            "vision_cfg": {"image_size": target, "layers": 1, "width": 32, "head_width": 16, "patch_size": 112},
            "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 16, "heads": 1, "layers": 1},
        }
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(tmp_path / f"{name}.json")
        preprocess = {"resize_mode": resize_mode, "interpolation": interpolation, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.4)}
        encoder = load_vision_encoder(name, "open_clip", pretrained=None, force_preprocess_cfg=preprocess)
        reference = image_transform_v2(PreprocessCfg(**encoder.visual.preprocess_cfg), is_train=False)
        ours = ImageTransform.for_encoder(encoder)
        assert (ours.resize, ours.resample, ours.mean) == ("shortest_edge" if resize_mode == "shortest" else "squash", interpolation, (0.5, 0.4, 0.3))
        for size, img in images.items():
            assert torch.equal(ours(img), reference(img)), (resize_mode, size)


@pytest.mark.parametrize("crop_pct, crop_mode, interpolation", [(0.875, "center", "bicubic"), (0.9, "center", "bilinear"), (1.0, "squash", "bicubic"), (0.95, "squash", "bilinear")])
def test_timm_preprocessing_from_the_models_pretrained_cfg(images, crop_pct, crop_mode, interpolation):
    timm = pytest.importorskip("timm")
    pretrained_cfg = {"crop_pct": crop_pct, "crop_mode": crop_mode, "interpolation": interpolation, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    encoder = load_vision_encoder(
        "vit_tiny_patch16_224", "timm", pretrained=False, img_size=224, patch_size=56, embed_dim=16, depth=1, num_heads=1,
        pretrained_cfg_overlay=pretrained_cfg,
    )
    reference = timm.data.create_transform(**timm.data.resolve_data_config({}, model=encoder.model))
    ours = ImageTransform.for_encoder(encoder)
    assert ours.resize_size == int(224 / crop_pct) and ours.resample == interpolation
    for size, img in images.items():
        assert torch.equal(ours(img), reference(img)), size


def _hf_processor(kind: str, backend: str, **kwargs):
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    if backend == "pil":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        return (CLIPImageProcessorPil if kind == "clip" else SiglipImageProcessorPil)(**kwargs)
    pytest.importorskip("torchvision")
    return (CLIPImageProcessor if kind == "clip" else SiglipImageProcessor)(**kwargs)


@pytest.mark.parametrize("backend", ["torch", "pil"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_image_processors_read_from_the_checkpoint_directory(images, kind, target, backend, tmp_path):
    """The encoder loader reads the checkpoint's preprocessor_config.json (as the processor saved it) and the
    transform gives that processor's pixels: floored crop offset; torchvision-tensor (the default) or PIL resize."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=target, patch_size=112)
    model = CLIPVisionModel(CLIPVisionConfig(**small)) if kind == "clip" else SiglipVisionModel(SiglipVisionConfig(**small))
    model.save_pretrained(tmp_path)
    if kind == "clip":
        kwargs = dict(size={"shortest_edge": target}, crop_size={"height": target, "width": target}, resample=2 if target == 336 else 3)
    else:
        kwargs = dict(size={"height": target, "width": target}, resample=3)
    processor = _hf_processor(kind, backend, **kwargs)
    processor.save_pretrained(tmp_path)
    encoder = load_vision_encoder(str(tmp_path))
    # The saved config does not name the backend: AutoImageProcessor takes torchvision's where it is installed.
    assert (encoder.preprocessing.crop_offset, encoder.preprocessing.resize_backend) == ("floor", "torch")
    ours = ImageTransform.from_preprocessing(dataclasses.replace(encoder.preprocessing, resize_backend=backend))
    assert ours.size == target and ours.resample == ("bilinear" if kwargs["resample"] == 2 else "bicubic")
    for size, img in images.items():
        reference = processor(img, return_tensors="pt")["pixel_values"][0]
        # transformers fuses rescale and normalise ((x - 255 mean) / (255 std)): the same value to float32 rounding
        torch.testing.assert_close(ours(img), reference, atol=2e-6, rtol=0, msg=lambda m: f"{size}: {m}")


def test_hf_defaults_without_a_preprocessor_config(tmp_path):
    make_tiny_clip(image_size=32, patch_size=8).save_pretrained(tmp_path)
    p = load_vision_encoder(str(tmp_path)).preprocessing
    assert p == ImagePreprocessing(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize_size=32, crop_offset="floor", resize_backend="torch")
    siglip = ImagePreprocessing.from_preprocessor_config(None, "siglip", 384)
    assert siglip == ImagePreprocessing(384, (0.5,) * 3, (0.5,) * 3, resize="squash", resize_size=384, crop_offset="floor", resize_backend="torch")


def test_unsupported_preprocessing_is_a_clear_error(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 224, "width": 320}}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: unsupported resize \{'height': 224, 'width': 320\}"):
        ImagePreprocessing.from_preprocessor_config(tmp_path, "siglip", 224)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"resample": 1}))
    with pytest.raises(ValueError, match=r"resample=1 is not supported \(2: bilinear, 3: bicubic\)"):
        ImagePreprocessing.from_preprocessor_config(tmp_path, "clip", 224)
    with pytest.raises(ValueError, match=r"resample must be one of \('bicubic', 'bilinear'\), got 'lanczos'"):
        ImageTransform(224, resample="lanczos")
    with pytest.raises(ValueError, match=r"resize_size \(200\) must be at least image_size \(224\)"):
        ImageTransform(224, resize_size=200)


def test_save_and_load_keep_every_field(tmp_path):
    t = ImageTransform(336, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), resize="squash", resize_size=352, resample="bilinear", crop_offset="floor", resize_backend="torch")
    t.save(tmp_path)
    assert ImageTransform.load(tmp_path) == t
    # a file written before the resize fields existed: torchvision's arithmetic
    (tmp_path / "image_transform.json").write_text(json.dumps({"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3}))
    assert ImageTransform.load(tmp_path) == ImageTransform(224, (0.5,) * 3, (0.5,) * 3)
    (tmp_path / "image_transform.json").write_text(json.dumps({"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "pad": 1}))
    with pytest.raises(ValueError, match=r"unknown fields \['pad'\]"):
        ImageTransform.load(tmp_path)


def test_openflamingo_conversion_preprocesses_as_open_clip(images, tmp_path):
    """OpenFlamingo's image_processor is open_clip's eval transform, even when the tower is loaded as a
    transformers CLIP model (whose own processor floors the crop offset): the converted processor, saved and
    loaded back, gives open_clip's pixels."""
    open_clip = pytest.importorskip("open_clip")
    from test_convert_openflamingo import convert

    from flamingo_vlm.processing import FlamingoProcessor

    _, processor, _ = convert()
    processor.save_pretrained(tmp_path)
    transform = FlamingoProcessor.from_pretrained(tmp_path).image_transform
    reference = open_clip.image_transform(transform.size, is_train=False)  # ViT-L-14 'openai': OpenAI mean/std, bicubic
    for size, img in images.items():
        assert torch.equal(transform(img), reference(img)), size
