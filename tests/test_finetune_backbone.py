"""Fine-tuning what trains: each freezing policy trains exactly the weights it names (gradients checked), keeps
every other weight bit-identical, and saves / loads them exactly; LoRA adapters start as a no-op and merge or
load back to the same logits; the vision encoder at a higher resolution, its position embeddings interpolated."""

from __future__ import annotations

import pytest
import torch

from flamingo_vlm import build_flamingo, load_flamingo
from flamingo_vlm.modeling.finetune import backbone_state, merge_lora
from flamingo_vlm.tiny import create_tiny_backbones
from flamingo_vlm.training.optim import build_optimizer
from helpers import BLUE, RED, SMALL_BRIDGE, image, open_gates

POLICIES = {
    "bridge": {},
    "vision_all": {"train_vision_blocks": -1},
    "vision_last": {"train_vision_blocks": 1},
    "lm_last": {"train_lm_layers": 1},
    "lora": {"lora_rank": 4, "lora_alpha": 8.0},
    "everything": {"train_vision_blocks": -1, "train_lm_layers": 2, "lora_rank": 2},
}


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    return create_tiny_backbones(tmp_path_factory.mktemp("backbones"))


def _batch(processor):
    return processor(
        [
            [image(RED), "Output: a red circle.<|endofchunk|>", image(BLUE), "Output: blue"],
            ["two cats", image(BLUE), "Output: a cat"],
        ],
        padding_side="right",
        return_labels=True,
    )


def _expected_names(model, policy: dict) -> set[str]:
    """The backbone weights a policy names, worked out from the modules (not from backbone_state)."""
    names = set()
    vision = policy.get("train_vision_blocks", 0)
    # the tiny CLIP's features: the last hidden state's patch tokens, post_layernorm not applied
    enc = {k: p for k, p in model.vision_encoder.named_parameters() if "post_layernorm" not in k}
    if vision == -1:
        names |= {f"vision_encoder.{k}" for k in enc}
    elif vision:
        last = len(model.vision_encoder.model.encoder.layers) - 1
        names |= {f"vision_encoder.{k}" for k in enc if k.startswith(f"model.encoder.layers.{last}.")}
    layers = [layer.decoder_layer for layer in model.lm.model.layers]
    n = policy.get("train_lm_layers", 0)
    for i, layer in enumerate(layers):
        for k, _ in layer.named_parameters():
            if "lora_" in k:
                names.add(f"lora.{i}.{k}")
            elif i >= len(layers) - n:
                names.add(f"lm_layers.{i}.{k}")
    return names


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_each_policy_trains_exactly_what_it_names_and_saves_it(backbones, tmp_path, policy):
    lm_path, vision_path = backbones
    torch.manual_seed(0)
    model, processor = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    model.set_backbone_training(**POLICIES[policy])
    open_gates(model, 0.5)
    bridge = {
        n
        for n, _ in model.trainable_parameters()
        if n.split(".")[0] in ("resampler", "xattn") or n.startswith("new_token")
    }
    expected = _expected_names(model, POLICIES[policy])
    assert set(backbone_state(model)) == expected
    named = dict(model.trainable_parameters())
    assert set(named) == bridge | expected
    assert {id(p) for p in named.values()} == {id(p) for p in model.parameters() if p.requires_grad}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(list(named.items()), lr=1e-2, weight_decay=0.1)
    model.train()
    model(**_batch(processor)).loss.backward()
    with_grad = {n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}
    # every named weight gets a gradient, but LoRA's A while B is still 0 (B moves first, then A)
    assert with_grad == {n for n in named if ".lora_A." not in n}
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not (changed & frozen_names)  # frozen weights are bit-identical after a step
    assert changed

    model.eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_flamingo(tmp_path)
    assert set(dict(loaded.trainable_parameters())) == set(named)
    with torch.no_grad():
        assert torch.equal(model(**_batch(processor)).logits, loaded(**_batch(loaded_processor)).logits)


def test_new_lora_adapters_and_closed_gates_leave_the_lm_bit_identical(backbones):
    from transformers import AutoModelForCausalLM

    lm_path, vision_path = backbones
    model, processor = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    model.set_backbone_training(lora_rank=4)
    batch = _batch(processor)
    plain = AutoModelForCausalLM.from_pretrained(lm_path)
    text_only = batch["input_ids"].clamp(max=plain.config.vocab_size - 1)
    with torch.no_grad():
        ours = model(**batch).logits[..., : plain.config.vocab_size]
        reference = plain(input_ids=text_only, attention_mask=batch["attention_mask"]).logits
    # the gates are 0 and LoRA's B is 0: where the token is the LM's own, the output is the LM's
    own = batch["input_ids"] < plain.config.vocab_size
    first_new = own.long().cumprod(dim=1).bool()  # up to the first added token (<image> changes the context after it)
    assert torch.equal(ours[first_new], reference[first_new])


def test_lora_merged_or_loaded_back_gives_the_same_logits(backbones, tmp_path):
    lm_path, vision_path = backbones
    torch.manual_seed(1)
    model, processor = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    model.set_backbone_training(lora_rank=4, lora_alpha=8.0)
    open_gates(model, 0.7)
    with torch.no_grad():
        for name, p in backbone_state(model).items():
            p.add_(0.05 * torch.randn_like(p))  # B != 0: the adapters change the output
    batch = _batch(processor)
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_flamingo(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**_batch(loaded_processor)).logits, before)
        merge_lora(loaded)
        merged = loaded(**_batch(loaded_processor)).logits
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)


def test_a_fine_tuned_model_cannot_silently_drop_its_trained_weights(backbones):
    lm_path, vision_path = backbones
    model, _ = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    model.set_backbone_training(train_vision_blocks=1)
    model.set_backbone_training(train_vision_blocks=-1)  # more is fine
    with pytest.raises(ValueError, match="must stay in what is trained"):
        model.set_backbone_training(train_vision_blocks=1)
    with pytest.raises(ValueError, match="not backbone-training settings"):
        model.set_backbone_training(xattn_heads=3)
    model.set_backbone_training(lora_rank=2)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        model.set_backbone_training(lora_rank=4)


def test_lr_multipliers_give_each_part_its_learning_rate(backbones):
    lm_path, vision_path = backbones
    model, _ = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    model.set_backbone_training(train_vision_blocks=1, lora_rank=2)
    opt = build_optimizer(
        list(model.trainable_parameters()), lr=1e-3, weight_decay=0.1, lr_multipliers={"vision": 0.1, "lora": 2.0}
    )
    lr_of = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    wd_of = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    assert [lr_of[n] for n in lr_of if n.startswith("vision_encoder.")] == pytest.approx(
        [1e-4] * sum(n.startswith("vision_encoder.") for n in lr_of)
    )
    assert [lr_of[n] for n in lr_of if n.startswith("lora.")] == pytest.approx(
        [2e-3] * sum(n.startswith("lora.") for n in lr_of)
    )
    assert {lr_of[n] for n in lr_of if n.startswith(("resampler.", "xattn."))} == {1e-3}
    assert all(wd_of[n] == 0.0 for n in wd_of if n.startswith("lora."))
    assert any(wd_of[n] == 0.1 for n in wd_of if n.startswith("vision_encoder.") and n.endswith("weight"))
    with pytest.raises(ValueError, match="unknown part"):
        build_optimizer(list(model.trainable_parameters()), lr=1e-3, weight_decay=0.1, lr_multipliers={"bridge": 1.0})


def test_position_interpolation_at_the_original_resolution_changes_nothing(backbones):
    lm_path, vision_path = backbones
    model, _ = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    encoder = model.vision_encoder
    size = encoder.preprocessing.image_size
    pixels = torch.randn(3, 3, size, size)
    with torch.no_grad():
        plain = encoder(pixels)
        interpolated = encoder.model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
    assert torch.equal(plain, interpolated)


def test_a_higher_input_resolution_is_used_and_saved_with_the_processor(backbones, tmp_path):
    from flamingo_vlm.training.config import load_train_config
    from flamingo_vlm.training.finetune import apply_finetuning

    lm_path, vision_path = backbones
    model, processor = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    old = model.vision_encoder.preprocessing.image_size
    patch = model.vision_encoder.model.config.patch_size
    new = old + 2 * patch
    config = load_train_config(
        {
            "datasets": [{"name": "x", "format": "pairs", "paths": ["x.tar"], "batch_size": 1}],
            "image_size": new,
            "train_vision_blocks": -1,
        }
    )
    apply_finetuning(model, processor, config)
    assert processor.image_transform.size == new and model.config.vision_image_size == new
    batch = processor([image(RED, size=(50, 40)), "Output:"])
    assert batch["pixel_values"].shape[-2:] == (new, new)
    with torch.no_grad():
        features = model.encode_vision(batch["pixel_values"])
    assert features.shape[2] == (new // patch) ** 2  # more patches, position embeddings interpolated
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_flamingo(tmp_path)
    assert loaded.config.vision_image_size == new and loaded_processor.image_transform.size == new
    with torch.no_grad():
        assert torch.equal(
            loaded(**loaded_processor([image(RED), "Output:"])).logits,
            model(**processor([image(RED), "Output:"])).logits,
        )
    with pytest.raises(ValueError, match="multiple of the encoder's patch size"):
        model.set_backbone_training(vision_image_size=new + 1)


def test_a_resolution_the_resamplers_spatial_positions_cannot_take_is_refused(backbones):
    lm_path, vision_path = backbones
    model, _ = build_flamingo(lm_path, vision_path, **{**SMALL_BRIDGE, "resampler_spatial_positions": 16})
    with pytest.raises(ValueError, match="learned spatial positions"):
        model.set_backbone_training(vision_image_size=48)
    assert model.config.vision_image_size is None and model.vision_encoder.preprocessing.image_size == 32


@pytest.mark.parametrize("policy", [{"train_lm_layers": 1}, {"train_vision_blocks": 1}, {"lora_rank": 2}], ids=str)
def test_bf16_frozen_backbones_around_trained_layers_train_under_autocast_and_are_refused_without(backbones, policy):
    from flamingo_vlm.training.distributed import autocast_context, cast_frozen, check_mixed_backbone

    lm_path, vision_path = backbones
    model, processor = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    model.set_backbone_training(**policy)
    if "lora_rank" in policy:
        check_mixed_backbone(model.config, "bf16", "fp32")  # LoRA casts its own inputs
    else:
        with pytest.raises(ValueError, match="needs precision: bf16"):
            check_mixed_backbone(model.config, "bf16", "fp32")
    cast_frozen(model, torch.bfloat16)
    assert all(p.dtype == torch.float32 for _, p in model.trainable_parameters())
    with autocast_context("bf16", torch.device("cpu")):
        loss = model(**_batch(processor)).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.trainable_parameters() if ".lora_A." not in n)


def test_lora_dropout_follows_train_mode_while_the_lm_stays_in_eval(backbones):
    lm_path, vision_path = backbones
    model, processor = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    model.set_backbone_training(lora_rank=4, lora_dropout=0.5)
    with torch.no_grad():
        for p in backbone_state(model).values():
            p.add_(0.1 * torch.randn_like(p))
    batch = _batch(processor)
    model.train()
    assert not model.lm.training and all(
        m.training for layer in model.lm.model.layers for n, m in layer.named_modules() if n.endswith("lora_dropout")
    )
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, model(**batch).logits)  # dropout on the adapters' inputs
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model(**batch).logits)
