"""The training loss fused with the LM head equals the loss of the logits, value and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import BLUE, LM_TYPES, RED, build, image, open_gates

from flamingo_vlm.modeling.loss import causal_lm_loss, head_cross_entropy


def _batch(processor):
    batch = processor(
        [[image(RED), "Output: a red circle.<|endofchunk|>", image(BLUE), "Output: a blue one"],
         [image(BLUE), "Output: a blue square.<|endofchunk|>"]],
        padding_side="right",
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch, labels


def _loss_and_grads(model, batch, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, labels=labels, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters()}


@pytest.mark.parametrize("lm_type", LM_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_loss_equals_loss_of_logits(lm_type, reduction):
    model, processor = build(lm_type)
    open_gates(model, 0.5)  # the visual pathway must carry gradient too
    model.train()
    assert model.fused_loss_supported
    batch, labels = _batch(processor)
    ref_loss, ref_grads = _loss_and_grads(model, batch, labels, loss_reduction=reduction)
    out = model(**batch, labels=labels, return_logits=False, loss_reduction=reduction)
    assert out.logits is None
    loss, grads = _loss_and_grads(model, batch, labels, return_logits=False, loss_reduction=reduction)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads)
    for name in ref_grads:  # the new token rows (tied to the input embedding for gpt2) included
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "resampler" in n)


def test_fused_loss_in_small_chunks_and_without_targets():
    model, processor = build("llama")
    open_gates(model, 0.5)
    batch, labels = _batch(processor)
    with torch.no_grad():
        hidden = model.lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    head = model.lm.get_output_embeddings()
    hidden.requires_grad_(True)
    ref = causal_lm_loss(head(hidden), labels)
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    fused = head_cross_entropy(hidden, head, labels, chunk_bytes=1)  # 16 rows a chunk: several chunks
    (grad,) = torch.autograd.grad(fused, hidden)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    none = head_cross_entropy(hidden, head, torch.full_like(labels, -100))
    assert none.item() == 0.0 and none.requires_grad


def test_lm_with_logit_transform_falls_back_to_logits():
    """An LM outside the plain-head list (its forward may scale or cap logits) keeps the logits path."""
    model, processor = build("llama")
    model.lm.config.model_type = "gemma2"  # stands for any LM whose logits are not just head(hidden)
    assert not model.fused_loss_supported
    batch, labels = _batch(processor)
    out = model(**batch, labels=labels, return_logits=False)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, labels))


def test_loss_reduction_is_checked():
    model, processor = build("llama")
    batch, labels = _batch(processor)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(**batch, labels=labels, loss_reduction="none")
