"""save_pretrained / from_pretrained: only trained weights, exact round trip, clear errors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from flamingo_vlm import FlamingoModel, build_flamingo, load_flamingo
from flamingo_vlm.tiny import create_tiny_backbones

from helpers import BLUE, RED, SMALL_BRIDGE, image


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    return create_tiny_backbones(tmp_path_factory.mktemp("backbones"))


def _perturb(model):
    """Make every trained weight differ from its initial value, so the round trip is not trivially true."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def _batch(processor):
    return processor(
        [[image(RED), "Output: a red circle.<|endofchunk|>", image(BLUE), "Output:"], ["two cats", image(BLUE), "Output:"]]
    )


def test_round_trip_reproduces_logits_exactly(backbones, tmp_path):
    lm_path, vision_path = backbones
    model, processor = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    _perturb(model)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    batch = _batch(processor)
    with torch.no_grad():
        before = model(**batch).logits

    loaded, loaded_processor = load_flamingo(tmp_path)
    batch2 = _batch(loaded_processor)
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    assert torch.equal(batch["pixel_values"], batch2["pixel_values"])
    with torch.no_grad():
        after = loaded(**batch2).logits
    assert torch.equal(before, after)
    assert {n for n, _ in loaded.trainable_parameters()} == {n for n, _ in model.trainable_parameters()}
    assert all(p.requires_grad for _, p in loaded.trainable_parameters())


def test_only_trained_weights_are_saved(backbones, tmp_path):
    lm_path, vision_path = backbones
    model, _ = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    model.save_pretrained(tmp_path)
    state = load_file(os.path.join(tmp_path, "model.safetensors"))
    assert all(k.split(".")[0] in {"resampler", "xattn", "new_token_embeddings", "new_token_lm_head"} for k in state)
    trainable = dict(model.trainable_parameters())
    params = {k: v for k, v in state.items() if k in trainable}
    assert sum(v.numel() for v in params.values()) == sum(p.numel() for p in trainable.values())
    # besides parameters only the resampler's/blocks' buffers could be there; the LM's weights never are
    lm_numel = sum(p.numel() for p in model.lm.parameters() if not p.requires_grad)
    assert sum(v.numel() for v in state.values()) < lm_numel
    config = json.loads(open(os.path.join(tmp_path, "flamingo_config.json")).read())
    assert config["lm_name_or_path"] == lm_path and config["vision_name_or_path"] == vision_path
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_loading_onto_the_wrong_backbone_names_the_mismatch(backbones, tmp_path):
    lm_path, vision_path = backbones
    model, _ = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    model.save_pretrained(tmp_path)
    other_lm = create_tiny_backbones(tmp_path / "other", lm_type="gpt2")[0]
    from transformers import AutoModelForCausalLM

    wrong = AutoModelForCausalLM.from_pretrained(other_lm, n_layer=3)  # 3 layers: one xattn block too many
    with pytest.raises(ValueError, match="model_type: saved with 'llama', now 'gpt2'"):
        FlamingoModel.from_pretrained(tmp_path, lm=wrong)
    with pytest.raises(ValueError, match="unexpected keys|missing keys"):  # told to load it anyway: the weights do not fit
        FlamingoModel.from_pretrained(tmp_path, lm=wrong, check_lm=False)


def test_from_pretrained_without_a_save_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="flamingo_config.json"):
        FlamingoModel.from_pretrained(tmp_path)


def test_relative_backbone_paths_load_from_another_working_directory(tmp_path, monkeypatch):
    """The README's create_tiny_backbones("backbones") + build_flamingo(lm_path, vision_path): the config
    names the backbones so that load_flamingo works from any directory (a relative path would be taken for
    a hub name and fail offline)."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(work)
    lm_path, vision_path = create_tiny_backbones("backbones")
    assert not os.path.isabs(lm_path)
    model, processor = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    _perturb(model)
    model.save_pretrained("my-flamingo")
    saved = json.loads((work / "my-flamingo" / "flamingo_config.json").read_text())
    assert saved["lm_name_or_path"] == str(work / "backbones" / "tiny-llama")
    batch = _batch(processor)
    with torch.no_grad():
        expected = model(**batch).logits
    monkeypatch.chdir(elsewhere)
    loaded, _ = load_flamingo(work / "my-flamingo")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_backbones_inside_the_model_directory_are_saved_relative_to_it(tmp_path, monkeypatch):
    """A model directory that carries its own backbones can be moved or copied whole."""
    import shutil

    lm_path, vision_path = create_tiny_backbones(tmp_path / "bundle" / "backbones")
    model, processor = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    model.save_pretrained(tmp_path / "bundle")
    processor.save_pretrained(tmp_path / "bundle")
    saved = json.loads((tmp_path / "bundle" / "flamingo_config.json").read_text())
    assert saved["lm_name_or_path"] == os.path.join("backbones", "tiny-llama")
    assert saved["vision_name_or_path"] == os.path.join("backbones", "tiny-clip")
    shutil.move(tmp_path / "bundle", tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    loaded, _ = load_flamingo(tmp_path / "moved")
    assert loaded.config.lm_name_or_path == str(tmp_path / "moved" / "backbones" / "tiny-llama")
    batch = _batch(processor)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def _save_on(tmp_path, backbones, lm_type="llama"):
    lm_path, vision_path = backbones
    model, processor = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    model.save_pretrained(tmp_path / "model")
    return model


def test_loading_onto_another_lm_is_refused_with_the_difference_named(backbones, tmp_path):
    """Another checkpoint of the same shapes, another family, another vocabulary size: each refused, naming
    what differs; check_lm=False loads it anyway; the same LM in bf16 is the same LM."""
    from flamingo_vlm.tiny import make_tiny_lm, make_tokenizer

    _save_on(tmp_path, backbones)
    rows = len(make_tokenizer())
    others = {
        "weights": make_tiny_lm("llama", vocab_size=rows, seed=5),
        "model_type": make_tiny_lm("mistral", vocab_size=rows, seed=0),
        "vocab_rows": make_tiny_lm("llama", vocab_size=rows + 41, seed=0),
    }
    for what, lm in others.items():
        with pytest.raises(ValueError, match=f"not the one this bridge was trained on(.|\\n)*{what}"):
            FlamingoModel.from_pretrained(tmp_path / "model", lm=lm)
    FlamingoModel.from_pretrained(tmp_path / "model", lm=others["weights"], check_lm=False)
    FlamingoModel.from_pretrained(tmp_path / "model", lm_kwargs={"dtype": torch.bfloat16})
