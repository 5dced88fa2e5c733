"""Sharing a model: save_pretrained writes a model card (backbones, bridge, training data and steps, evaluation
results when known), push_to_hub uploads that same folder through huggingface_hub (tested up to the upload
call), and few_shot answers a query after examples in one call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eval_fixtures import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from flamingo_vlm import build_flamingo, few_shot
from flamingo_vlm.tiny import create_tiny_backbones
from helpers import BLUE, GREEN, RED, SMALL_BRIDGE, build, image, open_gates

TRAINING = {"steps": 1234, "lr": 1e-4, "schedule": "cosine", "seed": 0,
            "datasets": [{"name": "m3w", "format": "mmc4", "batch_size": 256, "loss_weight": 1.0},
                         {"name": "ltip", "format": "pairs", "batch_size": 512, "loss_weight": 0.2}]}
EVALUATION = {"summary": [
    {"task": "coco", "shots": 0, "metric": "cider", "metrics": {"cider": {"mean": 41.234, "std": 0.0, "values": [41.234]}}},
    {"task": "coco", "shots": 4, "metric": "cider", "metrics": {"cider": {"mean": 55.5, "std": 1.25, "values": [54.25, 56.75]}}},
]}


@pytest.fixture(scope="module")
def saved_backbones(tmp_path_factory):
    return create_tiny_backbones(tmp_path_factory.mktemp("backbones"))


def test_save_pretrained_writes_a_model_card(saved_backbones, tmp_path):
    lm, clip = saved_backbones
    model, processor = build_flamingo(lm, clip, cross_attn_every_n_layers=2, **SMALL_BRIDGE)
    model.save_pretrained(tmp_path / "plain")
    card = (tmp_path / "plain" / "README.md").read_text()
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    assert card.startswith("---\nlibrary_name: flamingo-vlm\n")
    assert "language model: `tiny-llama` (a local path" in card and "vision encoder: `tiny-clip`" in card
    assert f"{trainable:,} parameters" in card
    assert "| cross_attn_every_n_layers | 2 |" in card and "| resampler_num_latents | 8 |" in card
    assert "## Training" not in card and "## Evaluation" not in card  # not known: not invented
    assert str(Path(lm).parent) not in card  # no filesystem layout in what gets shared

    model.save_pretrained(tmp_path / "trained", training=TRAINING, evaluation=EVALUATION)
    card = (tmp_path / "trained" / "README.md").read_text()
    assert "- optimizer steps: 1234" in card and "- schedule: cosine" in card
    assert "| m3w | mmc4 | 256 | 1.0 |" in card and "| ltip | pairs | 512 | 0.2 |" in card
    assert "| task | metric | 0-shot | 4-shot |" in card and "| coco | cider | 41.23 | 55.50 ± 1.25 |" in card


def test_a_hub_backbone_is_named_as_the_card_base_model():
    from flamingo_vlm.config import FlamingoConfig
    from flamingo_vlm.modeling.card import model_card

    card = model_card(FlamingoConfig(lm_name_or_path="facebook/opt-125m", vision_name_or_path="openai/clip-vit-base-patch32"),
                      trainable_parameters=10)
    assert "base_model:\n- facebook/opt-125m\n- openai/clip-vit-base-patch32\n---" in card
    assert "[`facebook/opt-125m`](https://huggingface.co/facebook/opt-125m)" in card


def test_push_to_hub_uploads_the_saved_folder(saved_backbones, tmp_path, monkeypatch):
    lm, clip = saved_backbones
    model, processor = build_flamingo(lm, clip, **SMALL_BRIDGE)
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, *, folder_path, repo_id, commit_message):
            files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            calls.append(("upload_folder", repo_id, commit_message, files))
            return "commit-info"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = model.push_to_hub("me/tiny-flamingo", processor=processor, private=True, token="t0k", training=TRAINING)
    assert out == "commit-info"
    assert calls[0] == ("init", "t0k") and calls[1] == ("create_repo", "me/tiny-flamingo", True, True)
    _, repo, message, files = calls[2]
    assert repo == "me/tiny-flamingo" and message
    model.save_pretrained(tmp_path / "local", training=TRAINING)
    processor.save_pretrained(tmp_path / "local")
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    assert set(files) == set(local) and {"README.md", "model.safetensors", "flamingo_config.json"} <= set(files)
    assert files["README.md"] == local["README.md"] and b"optimizer steps: 1234" in files["README.md"]


def test_few_shot_answers_in_one_call_without_a_leading_space():
    model, processor = build("llama")
    open_gates(model, 0.7)
    red, blue, green = image(RED), image(BLUE), image(GREEN)
    examples = [(red, "Output: a red thing."), (blue, "Output: a blue thing.<|endofchunk|>")]
    answer = few_shot(model, processor, examples, green, max_new_tokens=6, num_beams=1)

    # by hand: the interleaved prompt, greedy generate, decode up to the first <|endofchunk|>
    batch = processor([red, "Output: a red thing.<|endofchunk|>", blue, "Output: a blue thing.<|endofchunk|>", green, "Output:"])
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=6, num_beams=1, do_sample=False)
    new = out[0, batch["input_ids"].shape[1]:].tolist()
    stops = {processor.end_of_chunk_token_id, model.config.eos_token_id}
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    expected = processor.decode(new, skip_special_tokens=True)
    assert answer == expected.strip() and not answer.startswith(" ")
    assert few_shot(model, processor, examples, (green, "Output:"), max_new_tokens=6, num_beams=1) == answer
    with pytest.raises(ValueError, match=r"examples\[0\] must be a \(media, text\) pair"):
        few_shot(model, processor, [red], green)
