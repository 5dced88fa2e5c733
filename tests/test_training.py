"""Gradients reach only the trainable parameters; frozen really means frozen."""

import torch

from helpers import BLUE, GREEN, RED, build, image


def _batch(processor):
    return processor(
        [[image(RED), "Output: a red circle.<|endofchunk|>", image(BLUE), "Output: a blue square.<|endofchunk|>"],
         ["two cats", image(GREEN), "Output: a green star.<|endofchunk|>"]],
        padding_side="right", return_labels=True,
    )


def test_gradients_reach_only_trainable_parameters():
    model, processor = build("llama")
    model.train()
    out = model(**_batch(processor))
    out.loss.backward()
    trainable = {id(p) for _, p in model.trainable_parameters()}
    assert trainable, "nothing to train"
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # at gate 0 the gates themselves get a signal (the only way the bridge can open)
    assert all(b.attn_gate.grad.abs().item() > 0 for b in model.xattn_blocks)
    # the new tokens' rows are trained, the LM's vocabulary is not
    assert model.lm.get_input_embeddings().new.weight.grad.abs().sum() > 0


def test_training_lowers_the_loss_and_leaves_the_lm_bit_identical():
    model, processor = build("gpt2")
    frozen = {k: v.clone() for k, v in model.lm.state_dict().items() if "gated_xattn" not in k and ".new" not in k}
    vision = {k: v.clone() for k, v in model.vision_encoder.state_dict().items()}
    batch = _batch(processor)
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=3e-3)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(torch.equal(v, model.lm.state_dict()[k]) for k, v in frozen.items())
    assert all(torch.equal(v, model.vision_encoder.state_dict()[k]) for k, v in vision.items())
    assert any(b.attn_gate.item() != 0 for b in model.xattn_blocks)


def test_backbones_stay_in_eval_mode():
    model, _ = build("gpt2")
    model.train()
    assert model.resampler.training and all(b.training for b in model.xattn_blocks)
    assert not model.lm.transformer.h[0].decoder_layer.training
    assert not model.vision_encoder.training
