"""At initialisation (alpha = 0) the Flamingo model IS the LM, to the last bit (fp32)."""

import pytest
import torch

from flamingo_vlm.tiny import make_tiny_lm, make_tokenizer

from helpers import GREEN, LM_TYPES, RED, build, image, open_gates

TEXT = ["two cats sit on the mat. the dog runs", "Question: what colour is the ball? Answer:"]


def _bare_lm(lm_type, vocab=None):
    return make_tiny_lm(lm_type, vocab_size=vocab or len(make_tokenizer()), seed=0)


def _text_batch(processor, texts, padding_side="right"):
    """Padded text the bare LM can read too: padding positions hold EOS (masked) instead of the new pad token."""
    tok = processor.tokenizer
    batch = tok(texts, padding=True, padding_side=padding_side, return_tensors="pt")
    batch["input_ids"][batch["attention_mask"] == 0] = tok.eos_token_id
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@pytest.mark.parametrize("lm_type", LM_TYPES)
def test_text_logits_equal_bare_lm(lm_type):
    model, processor = build(lm_type)
    bare = _bare_lm(lm_type)
    batch = _text_batch(processor, TEXT)
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"]).logits
        ref = bare(**batch).logits
    v = ref.shape[-1]
    assert ours.shape[-1] == v + len(model.config.new_token_ids)
    assert torch.equal(ours[..., :v], ref)


@pytest.mark.parametrize("lm_type", LM_TYPES)
def test_images_change_nothing_at_gate_zero(lm_type):
    """With images in the prompt, closed gates give exactly the logits of the same ids without media routing."""
    model, processor = build(lm_type)
    batch = processor([["a red", image(RED), "circle<|endofchunk|>", image(GREEN), "two cats"], ["dog", image(GREEN), "Output:"]], padding_side="right")
    with torch.no_grad():
        with_media = model(**batch).logits
        lm_only = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(with_media, lm_only)
    open_gates(model)  # not vacuous: the same images do change the logits once the gates open
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, lm_only)


def test_padded_vocabulary_keeps_base_logits():
    """An LM whose embedding matrix is larger than its tokenizer (e.g. Qwen's padded vocab)."""
    model, processor = build("qwen2", lm_vocab=320)
    bare = _bare_lm("qwen2", vocab=320)
    first_new = model.config.new_token_ids[0]
    assert first_new < 320
    batch = _text_batch(processor, TEXT, padding_side="left")
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        ours = model(batch["input_ids"], mask, position_ids=positions).logits
        ref = bare(**batch, position_ids=positions).logits
    assert ours.shape[-1] == 320
    assert torch.equal(ours[..., :first_new], ref[..., :first_new])
    # the new tokens are embedded by their own rows, not by the LM's unused padding rows
    batch = processor([image(RED), "Output: a red circle<|endofchunk|>"])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_lm_text_loss_at_init_equals_bare_lm():
    """The LM's own text loss, over its own vocabulary, is unchanged by the bridge at initialisation.

    (Over the extended vocabulary the new tokens' rows also take some probability mass.)"""
    from flamingo_vlm.modeling.loss import causal_lm_loss

    model, processor = build("gpt2")
    bare = _bare_lm("gpt2")
    batch = _text_batch(processor, TEXT[:1])
    labels = batch["input_ids"]
    with torch.no_grad():
        logits = model(**batch).logits
        ref = bare(**batch, labels=labels).loss
    assert torch.equal(causal_lm_loss(logits[..., : bare.config.vocab_size], labels), ref)


def test_padded_vocabulary_ids_above_the_new_tokens_run_as_the_lm_runs_them():
    """A tiny Llama with 299 embedding rows and new tokens at 259-261: ids 262..298 are the LM's own (padding)
    rows. They embed as in the bare LM, in forward and when generation emits one."""
    model, processor = build("llama", lm_vocab=299)
    bare = _bare_lm("llama", vocab=299)
    assert list(model.config.new_token_ids) == [259, 260, 261]
    ids = torch.tensor([[5, 280, 298, 7, 262]])
    with torch.no_grad():
        ours = model(ids).logits
        ref = bare(ids).logits
    assert torch.equal(ours[..., :259], ref[..., :259]) and torch.equal(ours[..., 262:], ref[..., 262:])
    embed = model.lm.get_input_embeddings()
    assert torch.equal(embed(ids), bare.get_input_embeddings()(ids))
    assert embed.num_embeddings == 299
    # generation may emit such an id (its logit is finite); the next step must run it
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert out.shape == (1, 8)
