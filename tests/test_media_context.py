"""FlamingoModel.media_context, the one way to build a call's media context, and what a text-only call runs."""

from __future__ import annotations

import pytest
import torch

from flamingo_vlm.modeling.context import NO_MEDIA, StepMedia
from helpers import RED, build, image


def _gates(model, attn: float, ff: float) -> None:
    with torch.no_grad():
        for block in model.xattn_blocks:
            block.attn_gate.fill_(attn)
            block.ff_gate.fill_(ff)


def test_text_only_batch_runs_every_feed_forward_and_no_cross_attention():
    """The paper's y + tanh(a_dense) * ffw(y) applies to every token; the cross-attention term is exactly 0."""
    model, processor = build("llama")
    batch = processor([["two cats sit on the mat"], ["the dog runs"]], padding_side="right")
    with torch.no_grad():
        lm_only = model(**batch).logits  # gates 0: the LM
        _gates(model, attn=0.8, ff=0.0)
        assert torch.equal(model(**batch).logits, lm_only)
        _gates(model, attn=0.0, ff=0.8)
        with_ff = model(**batch).logits
    assert not torch.allclose(with_ff, lm_only, atol=1e-3)


def test_media_context_of_a_text_only_batch_has_no_media():
    model, processor = build("gpt2")
    ids = processor(["a red circle"])["input_ids"]
    assert model.media_context(ids) is NO_MEDIA


def test_media_context_checks_media_against_image_tokens():
    model, processor = build("gpt2")
    batch = processor([[image(RED), "a red circle", image(RED), "again"]])
    visual = model.encode_media(batch["pixel_values"])
    with pytest.raises(ValueError, match="no media were given"):
        model.media_context(batch["input_ids"])
    with pytest.raises(ValueError, match="need 2 media but 1 were given"):
        model.media_context(batch["input_ids"], visual[:1])
    with pytest.raises(ValueError, match="need 3 media"):  # rows sharing media: offsets past the end
        model.media_context(batch["input_ids"], visual, media_offsets=torch.tensor([1]))
    context = model.media_context(batch["input_ids"], visual)
    assert context.has_media and context.visual_tokens is visual


def test_decoder_layers_refuse_a_generation_media_object():
    """StepMedia describes a whole generation; passed to the LM as a context it must not silently disable
    cross-attention."""
    model, processor = build("llama")
    batch = processor([image(RED), "a red circle"])
    visual = model.encode_media(batch["pixel_values"])
    step = StepMedia(build=lambda *a, **k: model.media_context(*a, visual_tokens=visual, **k), prompt_offsets=torch.tensor([0]))
    with pytest.raises(TypeError, match="MediaContext"):
        model.lm(input_ids=batch["input_ids"], flamingo_context=step)
    # what generation hands the LM at each step is the context forward builds
    with torch.no_grad():
        stepped = model.lm(input_ids=batch["input_ids"], flamingo_context=step.context(batch["input_ids"], batch["input_ids"].shape[1]))
        torch.testing.assert_close(stepped.logits, model(**batch).logits, atol=0, rtol=0)
