"""Loading backbones: quiet and correct by construction (a vision tower read out of a full CLIPModel checkpoint
gets exactly its weights, with no progress bars and no table of the text tower's 'unexpected' keys), and a
missing local path is an error naming the path, the working directory and the override."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

from flamingo_vlm import build_flamingo, load_flamingo, load_vision_encoder
from flamingo_vlm.tiny import create_tiny_backbones
from helpers import SMALL_BRIDGE

VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny LM, a full two-tower CLIPModel checkpoint, and a Flamingo model saved on them."""
    root = tmp_path_factory.mktemp("backbones")
    lm, _ = create_tiny_backbones(root)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)).eval()
    clip.save_pretrained(root / "full-clip")
    model, processor = build_flamingo(lm, str(root / "full-clip"), **SMALL_BRIDGE)
    model.save_pretrained(root / "flamingo")
    processor.save_pretrained(root / "flamingo")
    return root, clip


def test_vision_tower_from_a_full_clip_checkpoint_loads_quietly_and_exactly(saved, capfd):
    root, clip = saved
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_flamingo(root / "flamingo")
    out, err = capfd.readouterr()
    assert out == "" and err == "", f"loading printed:\n{out}{err}"
    assert not [w for w in caught if "flamingo_vlm" in w.filename or "UNEXPECTED" in str(w.message)]
    tower = model.vision_encoder.model
    expected = clip.vision_model.state_dict()
    got = tower.state_dict()
    got = {k.removeprefix("vision_model."): v for k, v in got.items()}
    assert set(expected) <= set(got)
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_a_checkpoint_without_the_vision_tower_is_refused(tmp_path):
    CLIPTextModel(CLIPTextConfig(**TEXT)).save_pretrained(tmp_path / "text-only")
    with pytest.raises(ValueError, match=r"not a CLIPVisionModel checkpoint"):
        load_vision_encoder(str(tmp_path / "text-only"), "clip")


def test_a_missing_backbone_path_names_the_path_and_the_override(saved, tmp_path, monkeypatch):
    root, _ = saved
    moved = tmp_path / "moved"
    shutil.copytree(root / "flamingo", moved)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_flamingo(moved, vision=str(tmp_path / "nowhere" / "clip"))
    message = str(e.value)
    assert str(tmp_path / "nowhere" / "clip") in message and f"working directory {os.getcwd()!r}" in message
    assert "--vision" in message and "Repo id" not in message
    with pytest.raises(FileNotFoundError, match=r"the lm backbone '\./gone/lm' is not there .*--lm PATH_OR_HUB_NAME"):
        load_flamingo(moved, lm="./gone/lm")
    # a relative name that could be a hub repo id: neither local nor downloadable, said so
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import: patch the flag itself
    with pytest.raises(FileNotFoundError, match=r"neither a local directory .* nor a hub model .*--lm"):
        load_flamingo(moved, lm="gone/lm")


def test_the_commands_name_the_missing_path_and_take_the_override(saved, tmp_path, capsys):
    from flamingo_vlm.cli import main

    root, _ = saved
    moved = tmp_path / "moved"
    shutil.copytree(root / "flamingo", moved)
    missing = str(tmp_path / "nowhere" / "lm")
    assert main(["generate", "--model", str(moved), "--prompt", "Output:", "--lm", missing, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flamingo generate: error: the lm backbone") and missing in err and "--lm" in err
    # the override finds the backbone where it is now
    assert main(["generate", "--model", str(moved), "--prompt", "Output:", "--max-new-tokens", "2",
                 "--lm", str(root / "tiny-llama"), "--vision", str(root / "full-clip"), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "flamingo generate: parameters " in captured.err and "| device cpu" in captured.err
