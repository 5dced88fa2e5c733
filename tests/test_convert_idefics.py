"""IDEFICS checkpoints convert to flamingo_vlm models that compute what transformers' IdeficsForVisionText2Text does.

The reference is transformers' own implementation (an independent implementation of the same paper), on tiny
random models built from IdeficsConfig here, over its options; the image attention mask it is given comes from
transformers' IDEFICS processing code (``image_attention_mask_for_packed_input_ids``), so the routing rule is
checked against IDEFICS's too.
"""

from __future__ import annotations

import math

import pytest
import torch

from flamingo_vlm.convert.idefics import (
    IDEFICS_IMAGE_WRAPPER_TOKEN,
    IDEFICS_MEDIA_TOKEN,
    load_idefics,
)
from flamingo_vlm.tiny import make_tokenizer

TOL = 1e-5
IMAGE_SIZE = 16


def idefics_tokenizer():
    """A tiny tokenizer with IDEFICS's special tokens at ids V, V + 1 (its additional vocabulary), <unk> padding, and
    a BOS before every text, as IDEFICS's Llama tokenizer."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = make_tokenizer()
    bos = (tokenizer.bos_token, tokenizer.bos_token_id)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A $B", special_tokens=[bos])
    tokenizer.add_special_tokens({"additional_special_tokens": [IDEFICS_IMAGE_WRAPPER_TOKEN, IDEFICS_MEDIA_TOKEN]})
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every weight a scale at which each part visibly changes the logits (init leaves gates shut, norms at 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "alpha" in name:  # tanh gates, well open, either sign
                p.copy_(noise.sign() * (0.5 + 0.5 * torch.rand(p.shape, generator=g)))
            elif p.ndim == 1 and ("norm" in name or name.endswith((".ln.weight",))):
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(noise if "class_embedding" in name else 0.1 * noise)
            elif "latents" in name or "position_embedding" in name:
                p.copy_(noise)
            elif "embed" in name:  # token rows: at the LM head's scale, as they are that head when tied
                p.copy_(noise / math.sqrt(p.shape[1]))
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


def tiny_idefics(*, use_resampler=True, qk_norms=False, alpha_type="float", interval=1, layers=4, seed=0, **overrides):
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    tokenizer = idefics_tokenizer()
    config = IdeficsConfig(
        vocab_size=len(tokenizer) - 2, additional_vocab_size=2, hidden_size=32, intermediate_size=44, num_hidden_layers=layers,
        num_attention_heads=4, cross_layer_interval=interval, alpha_type=alpha_type, qk_layer_norms=qk_norms,
        use_resampler=use_resampler, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, max_position_embeddings=128,
        vision_config=dict(embed_dim=24, image_size=IMAGE_SIZE, patch_size=4, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40),
        perceiver_config=dict(
            use_resampler=use_resampler, resampler_n_latents=5, resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8,
            qk_layer_norms_perceiver=qk_norms,
        ),
        **overrides,
    )
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config).eval()
    randomize(model, seed)
    return model, tokenizer


def prompt_batch(tokenizer, seed: int = 0):
    """A left-padded batch in IDEFICS's prompt format: text before the first image, 3 / 1 / 2 images per row, two
    images in a row, and an EOS inside a row (tokens after it see no image until the next one).

    Returns (input_ids, attention_mask, images [M, C, H, W] in row order, images per row)."""
    fake, img = IDEFICS_IMAGE_WRAPPER_TOKEN, IDEFICS_MEDIA_TOKEN
    rows = [
        f"<s>A photo of{fake}{img}{fake}two cats on a mat.{fake}{img}{fake}{img}{fake}A dog",
        f"<s>Question:{fake}{img}{fake}What is it? Answer: a",
        f"<s>An image{fake}{img}{fake}of a cat.</s>Then text with no image,{fake}{img}{fake}and a",
    ]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rows]
    length = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (length - len(r)) + r for r in ids])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in ids])
    per_row = [int((row == tokenizer.convert_tokens_to_ids(img)).sum()) for row in input_ids]
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(sum(per_row), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return input_ids, attention_mask, images, per_row


def idefics_inputs(tokenizer, input_ids, images, per_row):
    """IDEFICS's pixel_values [B, N, C, H, W] (zero images pad short rows) and image_attention_mask [B, L, N], the
    latter from transformers' IDEFICS processing code."""
    from transformers.models.idefics.processing_idefics import (
        image_attention_mask_for_packed_input_ids,
        incremental_to_binary_attention_mask,
    )

    n = max(per_row)
    pixel_values = torch.zeros(len(per_row), n, *images.shape[1:])
    start = 0
    for b, count in enumerate(per_row):
        pixel_values[b, :count] = images[start : start + count]
        start += count
    incremental, _ = image_attention_mask_for_packed_input_ids(input_ids, tokenizer, "pt")
    return pixel_values, incremental_to_binary_attention_mask(incremental, "pt", num_classes=n)


def real_token_diff(a, b, attention_mask) -> float:
    real = attention_mask.bool()  # logits at padding positions are meaningless
    return float((a[real] - b[real]).abs().max())


GRID = [
    pytest.param(dict(use_resampler=True, qk_norms=False, alpha_type="float", interval=1), id="resampler-float-every1"),
    pytest.param(dict(use_resampler=True, qk_norms=True, alpha_type="vector", interval=2), id="resampler-qknorm-vector-every2"),
    pytest.param(dict(use_resampler=False, qk_norms=True, alpha_type="vector", interval=1), id="noresampler-qknorm-vector-every1"),
    pytest.param(dict(use_resampler=False, qk_norms=False, alpha_type="float", interval=2), id="noresampler-float-every2"),
    pytest.param(
        dict(use_resampler=True, qk_norms=False, alpha_type="float", interval=2, tie_word_embeddings=True), id="tied-embeddings"
    ),
]


@pytest.mark.parametrize("options", GRID)
def test_logits_and_greedy_generation_match_transformers(options):
    idefics, tokenizer = tiny_idefics(**options)
    if options.get("tie_word_embeddings"):
        assert idefics.lm_head.weight is idefics.model.embed_tokens.weight
    model, _, _ = load_idefics(idefics, tokenizer)
    c = model.config
    assert (c.use_resampler, c.xattn_qk_norm, c.resampler_qk_norm) == (options["use_resampler"], options["qk_norms"], options["qk_norms"])
    assert c.xattn_gate == ("vector" if options["alpha_type"] == "vector" else "scalar")
    layers = [i for i, layer in enumerate(model.lm.model.layers) if layer.gated_xattn is not None]
    assert layers == list(range(0, 4, options["interval"]))  # before layers 0, n, 2n, ... as IDEFICS

    input_ids, attention_mask, images, per_row = prompt_batch(tokenizer)
    pixel_values, image_attention_mask = idefics_inputs(tokenizer, input_ids, images, per_row)
    with torch.no_grad():
        reference = idefics(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_attention_mask=image_attention_mask
        ).logits
        ours = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=images).logits
        blind = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.zeros_like(images)).logits
    assert ours.shape == reference.shape  # the LM's rows plus the additional (decoupled) rows
    assert real_token_diff(ours, reference, attention_mask) < TOL
    assert real_token_diff(blind, reference, attention_mask) > 0.1  # the images really matter

    special = [tokenizer.convert_tokens_to_ids(t) for t in (IDEFICS_MEDIA_TOKEN, IDEFICS_IMAGE_WRAPPER_TOKEN)]
    common = dict(max_new_tokens=6, do_sample=False, num_beams=1, eos_token_id=tokenizer.eos_token_id, suppress_tokens=special)
    with torch.no_grad():
        expected = idefics.generate(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_attention_mask=image_attention_mask,
            pad_token_id=tokenizer.pad_token_id, **common,
        )
        generated = model.generate(input_ids, attention_mask, pixel_values=images, **common)
    assert torch.equal(generated, expected)


IDEFICS_LIKE = dict(
    vision_keep_cls=True, cross_attn_position="first", cross_attn_every_n_layers=2, xattn_norm="rms_norm", xattn_norm_eps=1e-6,
    xattn_qk_norm=True, xattn_ff_type="gated", xattn_ff_dim=40, ff_activation="silu", xattn_gate="vector",
    xattn_norm_media=False, reset_media_after_eos=True,
)


@pytest.mark.parametrize(
    "resampler",
    [dict(use_resampler=False), dict(resampler_qk_norm=True, resampler_ff_activation="relu", max_num_frames=1)],
    ids=["no-resampler", "resampler-qknorm-relu"],
)
def test_idefics_options_keep_gate_zero_exactness(resampler):
    """The options added for IDEFICS keep the rule: closed gates give exactly the LM's logits, open ones do not."""
    from helpers import GREEN, RED, build, image, open_gates

    model, processor = build("llama", **IDEFICS_LIKE, **resampler)
    assert [i for i, layer in enumerate(model.lm.model.layers) if layer.gated_xattn is not None] == [0]
    batch = processor(
        [["a red", image(RED), "circle</s>", image(GREEN), "two cats"], ["dog", image(GREEN), "Output:"]], padding_side="right"
    )
    with torch.no_grad():
        with_media = model(**batch).logits
        lm_only = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(with_media, lm_only)
    open_gates(model)
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, lm_only)
    n_patches = (model.vision_encoder.preprocessing.image_size // 8) ** 2  # tiny CLIP: 8-pixel patches
    tokens = model.encode_media(batch["pixel_values"])
    expected = n_patches + 1 if not model.config.use_resampler else model.config.resampler_num_latents  # CLS kept
    assert tokens.shape[1] == expected


def test_after_eos_routing_is_idefics_image_attention_mask():
    """Property: over random token streams, ``reset_media_after_eos`` routing is IDEFICS's processor rule."""
    from transformers.models.idefics.processing_idefics import image_attention_mask_for_packed_input_ids

    from flamingo_vlm.modeling.masking import media_index

    tokenizer = idefics_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids(IDEFICS_MEDIA_TOKEN)
    alphabet = torch.tensor([image_id, tokenizer.eos_token_id, 5, 6, 7])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = alphabet[torch.randint(0, len(alphabet), (4, 30), generator=g)]
        expected, _ = image_attention_mask_for_packed_input_ids(ids, tokenizer, "pt")
        last, _ = media_index(ids, image_id, tokenizer.eos_token_id, eos_sees_media=True)
        assert torch.equal(last, expected)


def test_configs_saved_before_the_idefics_options_load_unchanged():
    import dataclasses

    from flamingo_vlm.config import FlamingoConfig

    new = set(IDEFICS_LIKE) | {"use_resampler", "resampler_ff_activation", "resampler_qk_norm"}
    old = {k: v for k, v in FlamingoConfig().to_dict().items() if k not in new | {"xattn_norm_media", "ff_activation", "cross_attn_every_n_layers"}}
    assert FlamingoConfig.from_dict(old) == FlamingoConfig()
    assert dataclasses.replace(FlamingoConfig(), **IDEFICS_LIKE).xattn_gate == "vector"
    with pytest.raises(ValueError, match="xattn_gate"):
        FlamingoConfig(xattn_gate="matrix")


def reference_logits(idefics, tokenizer, batch):
    input_ids, attention_mask, images, per_row = batch
    pixel_values, image_attention_mask = idefics_inputs(tokenizer, input_ids, images, per_row)
    with torch.no_grad():
        return idefics(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_attention_mask=image_attention_mask
        ).logits


def our_logits(model, batch):
    input_ids, attention_mask, images, _ = batch
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=images).logits


@pytest.fixture(scope="module")
def idefics_dir(tmp_path_factory):
    """A tiny IDEFICS checkpoint directory (model + tokenizer), as the hub's are."""
    idefics, tokenizer = tiny_idefics(use_resampler=True, qk_norms=True, alpha_type="vector", interval=2)
    path = tmp_path_factory.mktemp("idefics") / "tiny-idefics"
    idefics.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_convert_commands_round_trip(idefics_dir, tmp_path, capsys):
    """`flamingo convert idefics` writes a directory load_flamingo reads (LM, vision tower and all); `to-idefics`
    writes it back as an IdeficsForVisionText2Text: the logits are IDEFICS's at every step."""
    from transformers import AutoTokenizer, IdeficsForVisionText2Text

    from flamingo_vlm import load_flamingo
    from flamingo_vlm.cli import main

    idefics = IdeficsForVisionText2Text.from_pretrained(idefics_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(idefics_dir)
    batch = prompt_batch(tokenizer)
    expected = reference_logits(idefics, tokenizer, batch)

    out = tmp_path / "converted"
    assert main(["convert", "idefics", str(idefics_dir), "--out", str(out), "--dtype", "float32"]) == 0
    assert "2 blocks, from layer 0" in capsys.readouterr().out
    assert (out / "lm" / "config.json").is_file() and (out / "vision" / "preprocessor_config.json").is_file()
    model, processor = load_flamingo(out)
    assert real_token_diff(our_logits(model, batch), expected, batch[1]) < TOL
    assert processor.tokenizer.convert_tokens_to_ids(IDEFICS_MEDIA_TOKEN) == model.config.media_token_id
    assert (model.vision_encoder.preprocessing.resize, processor.media_wrapper_token) == ("squash", IDEFICS_IMAGE_WRAPPER_TOKEN)

    back = tmp_path / "back"
    assert main(["convert", "to-idefics", str(out), "--out", str(back)]) == 0
    again = IdeficsForVisionText2Text.from_pretrained(back).eval()
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(back).image_processor.size.height == IMAGE_SIZE
    assert real_token_diff(reference_logits(again, tokenizer, batch), expected, batch[1]) < TOL
    for key, value in idefics.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_unsupported_idefics_options_fail_naming_them():
    from transformers import IdeficsConfig

    from flamingo_vlm.convert.idefics import unsupported_options

    config = IdeficsConfig(num_hidden_layers=6, cross_layer_interval=4, hidden_act="gelu_new", vision_config=dict(image_size=[224, 160]))
    problems = "\n".join(unsupported_options(config))
    for needle in ("cross_layer_interval=4 does not divide num_hidden_layers=6", "hidden_act='gelu_new'", "vision_config.image_size=[224, 160]"):
        assert needle in problems
    idefics, tokenizer = tiny_idefics(hidden_act="gelu_new")
    with pytest.raises(ValueError, match="does not support:\n  hidden_act='gelu_new'"):
        load_idefics(idefics, tokenizer)


def test_export_refuses_what_idefics_cannot_compute():
    from helpers import build

    from flamingo_vlm.convert import export_idefics

    model, _ = build("llama")  # the paper's block: LayerNorm, squared ReLU MLP, after-layer placement
    with pytest.raises(ValueError) as e:
        export_idefics(model)
    for needle in ("vision_keep_cls=True", "xattn_norm='layer_norm'", "xattn_ff_type='mlp'", "cross_attn_position='last'", "ReLU"):
        assert needle in str(e.value), str(e.value)


def test_processor_tokenizes_like_the_idefics_processor():
    """The converted processor writes IDEFICS's prompt format (<fake_token_around_image> around each run of images)."""
    from PIL import Image
    from transformers import IdeficsImageProcessor, IdeficsProcessor

    idefics, tokenizer = tiny_idefics()
    _, processor, _ = load_idefics(idefics, tokenizer)
    g = torch.Generator().manual_seed(0)
    images = [  # non-square, textured: IDEFICS squashes the whole image, where CLIP's processor would crop
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()) for h, w in ((40, 28), (30, 50), (20, 20), (64, 33))
    ]
    prompts = [
        ["User:", images[0], "Describe this image.\nAssistant: two cats.\n", "User:", images[1], images[2], "And these?\nAssistant:"],
        ["Question:", images[3], "What is it? Answer:"],
    ]
    tokenizer.padding_side = "left"
    theirs = IdeficsProcessor(IdeficsImageProcessor(image_size=IMAGE_SIZE), tokenizer)(text=prompts)
    ours = processor(prompts)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    processor.special_tokens_in_text = "escape"  # as flamingo serve runs: the wrapper token is prompt syntax
    assert torch.equal(processor(prompts)["input_ids"], theirs["input_ids"])
    their_pixels = torch.cat([theirs["pixel_values"][0, :3], theirs["pixel_values"][1, :1]])
    assert (ours["pixel_values"][:, 0] - their_pixels).abs().max() < 1e-5
    assert processor.format_text(processor.format_text("a<image><image>b")) == (
        "a<fake_token_around_image><image><fake_token_around_image><image><fake_token_around_image>b"
    )


@pytest.fixture(scope="module")
def converted_dir(idefics_dir, tmp_path_factory):
    from flamingo_vlm.convert import convert_idefics

    out = tmp_path_factory.mktemp("converted") / "idefics-tiny"
    convert_idefics(idefics_dir, out)
    return out


def test_flamingo_eval_runs_on_a_converted_model(converted_dir, tmp_path):
    """`flamingo eval` on a converted IDEFICS directory, few-shot captioning (generation) and classification (scoring)."""
    import json

    import yaml
    from eval_fixtures import write_classification, write_karpathy

    from flamingo_vlm.cli import main

    data = tmp_path / "data"
    karpathy, classes = write_karpathy(data / "coco"), write_classification(data / "imagenet")
    config = {
        "model": str(converted_dir), "shots": [0, 2], "seeds": [0],
        "tasks": [
            {"type": "coco_captioning", "karpathy_json": str(karpathy), "image_dir": str(data / "coco"), "max_new_tokens": 3},
            {"type": "imagenet", "list_file": str(classes["val"]), "support_list_file": str(classes["train"]),
             "class_names": str(classes["classnames"])},
        ],
    }
    config_path = tmp_path / "eval.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "results.json"
    assert main(["eval", str(config_path), "--limit", "2", "--out", str(out), "--no-progress"]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert {(r["task"], r["shots"]) for r in runs} == {("coco", 0), ("coco", 2), ("imagenet", 0), ("imagenet", 2)}
    assert all(r["num_examples"] == 2 for r in runs)


def test_flamingo_serve_answers_with_a_converted_model(converted_dir):
    """The HTTP API on a converted IDEFICS model gives the library's generation."""
    from fastapi.testclient import TestClient
    from helpers import GREEN, RED, image
    from serving_fixtures import TEST_LIMITS, data_url

    from flamingo_vlm import load_flamingo
    from flamingo_vlm.evaluation import generate_texts
    from flamingo_vlm.serving import create_app

    model, processor = load_flamingo(converted_dir)
    prompt = [image(RED), "Output: a red circle.</s>", image(GREEN), "Output:"]
    items = [{"text": x} if isinstance(x, str) else {"image": data_url(x)} for x in prompt]
    with TestClient(create_app(model, processor, limits=TEST_LIMITS, max_wait_ms=1)) as client:
        r = client.post("/v1/generate", json={"prompt": items, "max_new_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["text"] == generate_texts(model, processor, [prompt], max_new_tokens=5)[0].strip()
    assert r.json()["media"] == 2


def test_vision_tower_is_clip_with_the_cls_token_and_no_post_norm():
    """IDEFICS's vision transformer maps weight for weight onto CLIPVisionModel; its features are the last hidden
    state, CLS token included, without post_layernorm."""
    idefics, tokenizer = tiny_idefics(use_resampler=False)
    model, _, _ = load_idefics(idefics, tokenizer)
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = idefics.model.vision_model(pixel_values=pixels).last_hidden_state
        assert torch.equal(model.vision_encoder(pixels), expected)
        assert torch.equal(model.encode_media(pixels[:, None]), expected)  # no resampler: the features themselves


def test_a_bfloat16_checkpoint_converts_with_an_fp32_bridge(idefics_dir):
    idefics, tokenizer = tiny_idefics(use_resampler=True, qk_norms=True, alpha_type="vector", interval=2)
    model, _, _ = load_idefics(idefics_dir, dtype=torch.bfloat16)
    assert next(model.lm.parameters()).dtype == next(model.vision_encoder.parameters()).dtype == torch.bfloat16
    assert model.bridge_dtype == torch.float32
    batch = prompt_batch(tokenizer)
    assert real_token_diff(our_logits(model, batch).float(), reference_logits(idefics, tokenizer, batch), batch[1]) < 0.2


def test_beam_search_matches_transformers():
    idefics, tokenizer = tiny_idefics(use_resampler=True, qk_norms=True, alpha_type="vector", interval=2)
    model, _, _ = load_idefics(idefics, tokenizer)
    input_ids, attention_mask, images, per_row = batch = prompt_batch(tokenizer)
    pixel_values, image_attention_mask = idefics_inputs(tokenizer, *batch[:1], images, per_row)
    special = [tokenizer.convert_tokens_to_ids(t) for t in (IDEFICS_MEDIA_TOKEN, IDEFICS_IMAGE_WRAPPER_TOKEN)]
    common = dict(max_new_tokens=6, do_sample=False, num_beams=3, eos_token_id=tokenizer.eos_token_id, suppress_tokens=special)
    with torch.no_grad():
        expected = idefics.generate(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            image_attention_mask=image_attention_mask, pad_token_id=tokenizer.pad_token_id, **common,
        )
        assert torch.equal(model.generate(input_ids, attention_mask, pixel_values=images, **common), expected)


def test_tied_embeddings_survive_save_load_and_export(tmp_path):
    """tie_word_embeddings=True: the head's new rows are the new embedding rows (one trained tensor), through
    convert_idefics, load_flamingo and export_idefics."""
    from flamingo_vlm import load_flamingo
    from flamingo_vlm.convert import convert_idefics, export_idefics

    idefics, tokenizer = tiny_idefics(interval=2, tie_word_embeddings=True)
    convert_idefics(idefics, tmp_path / "tied", tokenizer)
    model, _ = load_flamingo(tmp_path / "tied")
    assert "new_token_lm_head.weight" not in model.flamingo_state_dict()
    batch = prompt_batch(tokenizer)
    expected = reference_logits(idefics, tokenizer, batch)
    assert real_token_diff(our_logits(model, batch), expected, batch[1]) < TOL
    back = export_idefics(model)
    assert back.lm_head.additional_fc.weight is back.model.embed_tokens.additional_embedding.weight
    assert real_token_diff(reference_logits(back, tokenizer, batch), expected, batch[1]) < TOL
