"""FlamingoConfig stays still: frozen, round-trips through JSON (old saves too), and no step of a model's
life (build, forward, train step, generate, save/load, OpenFlamingo conversion) changes it."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from flamingo_vlm import FlamingoConfig, build_flamingo, load_flamingo
from flamingo_vlm.config import CONFIG_NAME
from flamingo_vlm.convert import clip_vision_from_open_clip, load_openflamingo, load_openflamingo_weights
from flamingo_vlm.tiny import create_tiny_backbones

from helpers import BLUE, RED, SMALL_BRIDGE, image

FIXTURE = Path(__file__).parent / "fixtures" / "openflamingo"


def _config() -> FlamingoConfig:
    return FlamingoConfig(lm_name_or_path="lm", vision_name_or_path="vit", new_token_ids=[7, 8], media_token_id=7, end_of_chunk_token_id=8,
                          pad_token_id=0, eos_token_id=1, resampler_depth=2)


def test_config_cannot_be_mutated_and_round_trips_json(tmp_path):
    config = _config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.resampler_depth = 3
    assert config.new_token_ids == (7, 8)  # a tuple: not changeable in place either
    config.save(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["new_token_ids"] == [7, 8]
    assert FlamingoConfig.load(tmp_path) == config
    assert dataclasses.replace(config, resampler_depth=3).resampler_depth == 3 and config.resampler_depth == 2


def test_a_config_saved_by_the_previous_version_loads(tmp_path):
    """Earlier versions saved the backbones' hidden sizes into the config: those two keys are dropped."""
    saved = {**_config().to_dict(), "new_token_ids": [7, 8], "lm_hidden_size": 64, "vision_hidden_size": 32}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(saved))
    assert FlamingoConfig.load(tmp_path) == _config()
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**saved, "resampler_dpth": 2}))
    with pytest.raises(ValueError, match=r"unknown FlamingoConfig key\(s\) 'resampler_dpth' \(did you mean 'resampler_depth'\?\)"):
        FlamingoConfig.load(tmp_path)


def test_forward_train_step_generate_and_save_load_leave_the_config_as_built(tmp_path):
    lm_path, vision_path = create_tiny_backbones(tmp_path / "backbones")
    model, processor = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    built = copy.deepcopy(model.config)
    assert built.media_token_id is not None and built.new_token_ids and built.lm_name_or_path == str(lm_path)
    batch = processor([[image(RED), "Output: a red circle.<|endofchunk|>", image(BLUE), "Output:"], ["two cats", image(BLUE), "Output:"]])

    model.train()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-3).step()
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.generate(**batch, max_new_tokens=3, do_sample=False, num_beams=2)
    assert model.config == built

    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    reloaded, _ = load_flamingo(tmp_path / "saved")
    assert reloaded.config == built


def _vision():
    meta = json.loads((FIXTURE / "meta.json").read_text())
    return clip_vision_from_open_clip(FIXTURE / "vision.safetensors", head_width=meta["vision_cfg"]["head_width"], quick_gelu=meta["vision_quick_gelu"])


def test_conversion_decides_the_config_before_building_the_model():
    """A checkpoint that trained the LM's own embedding rows gives save_lm_embeddings=True from the start;
    loading it into a model built without that flag is refused before any weight is written."""
    checkpoint = torch.load(FIXTURE / "checkpoint.pt", map_location="cpu", weights_only=True)
    variant = {**checkpoint, **torch.load(FIXTURE / "embeddings_b.pt", map_location="cpu", weights_only=True)}
    model, _, _ = load_openflamingo(variant, str(FIXTURE / "lm"), _vision(), lm_kwargs={"dtype": torch.float32})
    assert model.config.save_lm_embeddings

    plain, _, _ = load_openflamingo(checkpoint, str(FIXTURE / "lm"), _vision(), lm_kwargs={"dtype": torch.float32})
    built = copy.deepcopy(plain.config)
    assert not built.save_lm_embeddings and built.decoder_layers_attr and built.new_token_ids
    embedding = plain.lm.get_input_embeddings().base.weight.clone()
    with pytest.raises(ValueError, match="build the model with save_lm_embeddings=True"):
        load_openflamingo_weights(plain, variant)
    assert torch.equal(plain.lm.get_input_embeddings().base.weight, embedding) and plain.config == built
