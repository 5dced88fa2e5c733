"""OpenFlamingo checkpoints load into flamingo_vlm and compute what OpenFlamingo 2.0.1 computed.

The fixture (tests/fixtures/openflamingo, made by scripts/openflamingo/make_fixture.py in an environment
where OpenFlamingo itself runs) holds OpenFlamingo's checkpoint of a randomised bridge on tiny random
backbones, an interleaved left-padded batch with 3/2/1 images per row, and OpenFlamingo's logits and greedy
generations. Neither open_flamingo nor open_clip is needed here: the open_clip ViT is mapped onto
transformers' CLIPVisionModel.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flamingo_vlm import load_flamingo
from flamingo_vlm.cli import main
from flamingo_vlm.convert import (
    clip_vision_from_open_clip,
    export_openflamingo,
    load_openflamingo,
    read_openflamingo_checkpoint,
)
from flamingo_vlm.modeling.vision import load_vision_encoder

FIXTURE = Path(__file__).parent / "fixtures" / "openflamingo"
META = json.loads((FIXTURE / "meta.json").read_text())
TOL = 1e-5


@pytest.fixture(scope="module")
def tensors():
    return load_file(FIXTURE / "tensors.safetensors")


@pytest.fixture(scope="module")
def checkpoint():
    return torch.load(FIXTURE / "checkpoint.pt", map_location="cpu", weights_only=True)


def vision_model():
    return clip_vision_from_open_clip(FIXTURE / "vision.safetensors", head_width=META["vision_cfg"]["head_width"], quick_gelu=META["vision_quick_gelu"])


def convert(checkpoint=FIXTURE / "checkpoint.pt", **kwargs):
    return load_openflamingo(
        checkpoint, str(FIXTURE / "lm"), vision_model(), vision_post_norm=META["vision_tokens_ln_post"],
        lm_kwargs={"dtype": torch.float32}, **kwargs,
    )


@pytest.fixture(scope="module")
def converted():
    return convert()


def flat_pixels(tensors) -> torch.Tensor:
    """OpenFlamingo's vision_x [B, T_img, 1, C, H, W] (zero images pad short rows) -> our [M, 1, C, H, W]."""
    return torch.cat([tensors["vision_x"][b, :n] for b, n in enumerate(META["images_per_row"])])


def openflamingo_forward(model, tensors):
    """Our logits for the batch, with the positions OpenFlamingo's forward used (0..L-1, pads included:
    transformers < 4.47 derives positions from the attention mask only in generate)."""
    ids = tensors["input_ids"]
    with torch.no_grad():
        return model(
            input_ids=ids, attention_mask=tensors["attention_mask"], pixel_values=flat_pixels(tensors),
            position_ids=torch.arange(ids.shape[1]).expand_as(ids),
        ).logits


def max_diff_on_tokens(logits, reference, attention_mask) -> float:
    real = attention_mask.bool()  # logits at padding positions are meaningless (and differ across versions)
    return float((logits[real] - reference[real]).abs().max())


def test_vision_patch_tokens_match_open_clip_both_conventions(tensors):
    """The mapped ViT gives open_clip's patch tokens with ln_post (open_clip >= 2.23) and without (as trained)."""
    pixels = flat_pixels(tensors)[:, 0]
    for post_norm, key in ((True, "vision_tokens_ln_post"), (False, "vision_tokens_no_ln_post")):
        encoder = load_vision_encoder(vision_model(), "clip", post_norm=post_norm)
        with torch.no_grad():
            assert (encoder(pixels) - tensors[key]).abs().max() < TOL
    assert (tensors["vision_tokens_ln_post"] - tensors["vision_tokens_no_ln_post"]).abs().max() > 0.1


def test_logits_match_openflamingo(converted, tensors):
    model, _, report = converted
    c = model.config
    assert [c.end_of_chunk_token_id, c.media_token_id, c.pad_token_id] == [META["token_ids"][t] for t in ("<|endofchunk|>", "<image>", "<PAD>")]
    layers = [i for i, layer in enumerate(model.lm.model.layers) if layer.gated_xattn is not None]
    assert layers == META["xattn_layers"] == [1, 3]
    assert not c.save_lm_embeddings and report.changed_embedding_rows == 0
    logits = openflamingo_forward(model, tensors)
    assert logits.shape == tensors["logits_a"].shape  # vocabulary = the tokenizer's, as OpenFlamingo resizes it
    assert max_diff_on_tokens(logits, tensors["logits_a"], tensors["attention_mask"]) < TOL
    # the gates really are open: without images the logits move far
    with torch.no_grad():
        blind = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"], visual_tokens=torch.zeros(6, 64, 8)).logits
    assert max_diff_on_tokens(blind, tensors["logits_a"], tensors["attention_mask"]) > 0.1


def test_greedy_generation_matches_openflamingo(converted, tensors):
    model, _, _ = converted
    out = model.generate(
        tensors["input_ids"], tensors["attention_mask"], pixel_values=flat_pixels(tensors), max_new_tokens=META["max_new_tokens"],
        do_sample=False, num_beams=1, eos_token_id=META["token_ids"]["<|endofchunk|>"], suppress_tokens=None,
    )
    assert torch.equal(out, tensors["generated"])


def test_processor_tokenizes_like_openflamingo(converted, tensors):
    _, processor, _ = converted
    pixels = flat_pixels(tensors)[:, 0]
    starts = [0, 3, 5]
    images = [[pixels[i] for i in range(s, s + n)] for s, n in zip(starts, META["images_per_row"])]
    batch = processor(text=META["prompts"], images=images)
    assert torch.equal(batch["input_ids"], tensors["input_ids"])
    assert torch.equal(batch["attention_mask"], tensors["attention_mask"])


def test_prefixed_training_checkpoint_reads_the_same(checkpoint):
    wrapped = {"model_state_dict": {f"module.{k}": v for k, v in checkpoint.items()}, "epoch": 3}
    assert read_openflamingo_checkpoint(wrapped["model_state_dict"]).keys() == checkpoint.keys()


def test_changed_embedding_rows_load_faithfully_and_persist(checkpoint, tensors, tmp_path):
    """OpenFlamingo may train old embedding rows and save the LM head: both are loaded over the LM's."""
    variant = {**checkpoint, **torch.load(FIXTURE / "embeddings_b.pt", map_location="cpu", weights_only=True)}
    model, processor, report = convert(variant)
    assert report.changed_embedding_rows == 20 and report.changed_lm_head_rows == 10 and report.lm_head_new_rows_from_checkpoint
    assert model.config.save_lm_embeddings
    logits = openflamingo_forward(model, tensors)
    assert max_diff_on_tokens(logits, tensors["logits_b"], tensors["attention_mask"]) < TOL
    assert max_diff_on_tokens(logits, tensors["logits_a"], tensors["attention_mask"]) > 1e-3
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, _ = load_flamingo(tmp_path, vision=vision_model(), lm_kwargs={"dtype": torch.float32})
    assert torch.equal(openflamingo_forward(reloaded, tensors), logits)
    assert not any(p.requires_grad for name, p in reloaded.lm.named_parameters() if ".base." in name)


def test_export_reproduces_the_checkpoint(converted, checkpoint, tensors):
    model, _, _ = converted
    exported = export_openflamingo(model)
    assert set(exported) <= set(META["openflamingo_model_keys"]) | {"perceiver.latents"}  # names OpenFlamingo's model has
    assert set(exported) - set(checkpoint) == {"lang_encoder.lm_head.weight"}  # the untied head's new rows, too
    for key, value in checkpoint.items():
        assert torch.equal(exported[key], value.float()), key
    again, _, _ = convert(exported)
    assert torch.equal(openflamingo_forward(again, tensors), openflamingo_forward(model, tensors))


def test_export_refuses_what_openflamingo_cannot_compute():
    from tests.helpers import build

    model, _ = build()  # paper defaults: LayerNorm on media, squared ReLU, small sizes, time embeddings
    with pytest.raises(ValueError) as e:
        export_openflamingo(model)
    for needle in ("xattn_norm_media", "squared_relu", "time embeddings", "resampler_depth"):
        assert needle in str(e.value)


def test_wrong_backbones_fail_naming_the_mismatch(checkpoint):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

    base = AutoConfig.from_pretrained(FIXTURE / "lm")

    def lm(**changes):
        torch.manual_seed(1)
        return AutoModelForCausalLM.from_config(type(base)(**{**base.to_dict(), **changes}))

    def fails(*needles, checkpoint=FIXTURE / "checkpoint.pt", lm=None, vision=None, tokenizer=str(FIXTURE / "lm")):
        with pytest.raises(ValueError) as e:
            load_openflamingo(checkpoint, lm or str(FIXTURE / "lm"), vision or vision_model(), tokenizer, vision_post_norm=True)
        for needle in needles:
            assert needle in str(e.value), str(e.value)

    fails("LM hidden size 16", "the LM has 32", lm=lm(hidden_size=32))
    fails("decoder layers [1, 3]", "the LM has 3 decoder layers", lm=lm(num_hidden_layers=3))
    fails("not this LM's", lm=lm())  # same shapes, other weights
    bigger = AutoTokenizer.from_pretrained(FIXTURE / "lm")
    bigger.add_tokens(["<extra>"])
    fails("303 rows", "304 tokens", "vocabulary mismatch", tokenizer=bigger)
    wide = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4))
    fails("vision features of width 8", "gives 16", vision=wide)
    broken = dict(torch.load(FIXTURE / "checkpoint.pt", weights_only=True))
    del broken["perceiver.layers.2.0.to_q.weight"]
    broken["perceiver.extra.weight"] = torch.zeros(1)
    fails("missing keys: ['perceiver.layers.2.0.to_q.weight']", "unexpected keys: ['perceiver.extra.weight']", checkpoint=broken)


def test_convert_commands_round_trip(tmp_path, checkpoint, tensors, capsys):
    out = tmp_path / "of-tiny"
    assert main([
        "convert", "openflamingo", str(FIXTURE / "checkpoint.pt"), "--lm", str(FIXTURE / "lm"),
        "--vision", str(FIXTURE / "vision.safetensors"), "--vision-head-width", "4", "--vision-post-norm", "--out", str(out),
    ]) == 0
    assert "LM-head rows for the new tokens" in capsys.readouterr().out
    model, _ = load_flamingo(out)
    assert max_diff_on_tokens(openflamingo_forward(model, tensors), tensors["logits_a"], tensors["attention_mask"]) < TOL
    assert main(["convert", "to-openflamingo", str(out), "--out", str(tmp_path / "checkpoint.pt")]) == 0
    exported = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(exported[k], v.float()) for k, v in checkpoint.items())
