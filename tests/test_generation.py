"""Cached generation (LM KV cache + media keys/values computed once) equals full recomputation."""

import pytest
import torch

from helpers import BLUE, GREEN, RED, WHITE, build, image, open_gates

MAX_NEW = 6


def _prompts(processor):
    return processor(
        [
            [image(RED), "Output: a red circle.<|endofchunk|>", image(BLUE), "Output:"],
            ["the dog", image(GREEN), "Question: what colour? Answer:"],
        ],
        padding_side="left",
    )


def _greedy_by_recomputation(model, batch, steps):
    """Greedy decoding that re-runs the whole sequence through model.forward at every step (no caches)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    c = model.config
    all_logits = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, mask, pixel_values=batch["pixel_values"]).logits[:, -1]
        all_logits.append(logits)
        scores = logits.clone()
        scores[:, [c.media_token_id, c.end_of_chunk_token_id, c.eos_token_id]] = -float("inf")  # suppressed / min length
        nxt = scores.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids, torch.stack(all_logits, dim=1)


@pytest.mark.parametrize("lm_type", ["llama", "gpt2", "gpt_neox", "opt", "qwen2", "mistral"])
def test_greedy_cached_equals_recomputation(lm_type):
    model, processor = build(lm_type)
    open_gates(model, 0.7)
    batch = _prompts(processor)
    out = model.generate(
        **batch, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
        return_dict_in_generate=True, output_logits=True,
    )
    ref_ids, ref_logits = _greedy_by_recomputation(model, batch, MAX_NEW)
    assert torch.equal(out.sequences, ref_ids)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), ref_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lm_type", ["llama", "gpt2"])
def test_beam_search_cached_equals_uncached(lm_type):
    model, processor = build(lm_type)
    open_gates(model, 0.7)
    batch = _prompts(processor)
    kw = dict(max_new_tokens=MAX_NEW, num_beams=3, num_return_sequences=2, do_sample=False, return_dict_in_generate=True, output_scores=True)
    cached = model.generate(**batch, **kw)
    recomputed = model.generate(**batch, use_cache=False, cache_media_kv=False, **kw)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, atol=1e-5, rtol=1e-5)


def test_sampling_cached_equals_uncached():
    model, processor = build("llama")
    open_gates(model, 0.7)
    batch = _prompts(processor)
    torch.manual_seed(3)
    a = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=True, top_k=20)
    torch.manual_seed(3)
    b = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=True, top_k=20, use_cache=False, cache_media_kv=False)
    assert torch.equal(a, b)


def test_media_matter_in_generation():
    model, processor = build("llama")
    open_gates(model, 1.0)
    a = processor([image(RED), "Output:"])
    b = processor([image(WHITE), "Output:"])
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    la = model.generate(**a, **kw).logits[0]
    lb = model.generate(**b, **kw).logits[0]
    assert not torch.allclose(la, lb)


def test_vision_encoder_runs_once_per_image_not_per_beam():
    model, processor = build("llama")
    batch = _prompts(processor)
    seen = []
    handle = model.vision_encoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    model.generate(**batch, max_new_tokens=4, num_beams=3)
    handle.remove()
    assert seen == [3]  # three images in the two prompts, one encoder call, whatever the beams and steps


def test_generation_stops_at_end_of_chunk():
    model, processor = build("gpt2")
    eoc = model.config.end_of_chunk_token_id

    def prefer_eoc_after_two(module, inputs, logits):  # <|endofchunk|> becomes the best 3rd token
        if logits.shape[1] == 1 and getattr(prefer_eoc_after_two, "steps", 0) >= 1:
            logits[..., eoc] += 1e4
        prefer_eoc_after_two.steps = getattr(prefer_eoc_after_two, "steps", -1) + 1
        return logits

    handle = model.lm.get_output_embeddings().register_forward_hook(prefer_eoc_after_two)
    batch = processor([image(RED), "Output:"])
    out = model.generate(**batch, max_new_tokens=10, do_sample=False)
    handle.remove()
    new = out[0, batch["input_ids"].shape[1]:].tolist()
    assert len(new) == 3 and new[-1] == eoc and eoc not in new[:-1]


def test_forward_continuing_from_a_cache_sees_the_prefix_images():
    """prefix through forward(use_cache) + the rest with past_input_ids == the whole sequence at once."""
    model, processor = build("llama")
    open_gates(model, 0.7)
    batch = processor([image(RED), "Output: a red circle.<|endofchunk|>", image(BLUE), "Output: a blue square"], padding_side="right")
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    split = ids.shape[1] - 3  # the last tokens come after both images
    with torch.no_grad():
        whole = model(ids, pixel_values=pixels).logits
        prefix = model(ids[:, :split], pixel_values=pixels, use_cache=True)
        rest = model(ids[:, split:], visual_tokens=prefix.visual_tokens, cache=prefix.cache, past_input_ids=ids[:, :split]).logits
    torch.testing.assert_close(rest, whole[:, split:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lm_type, lm_vocab", [("llama", None), ("gpt2", 600)])
def test_lm_config_vocab_size_is_the_logits_width(lm_type, lm_vocab):
    """transformers' beam search (before 5.2x) reshapes scores by config.vocab_size: it must count the new tokens."""
    model, processor = build(lm_type, lm_vocab=lm_vocab)
    with torch.no_grad():
        logits = model(**processor([image(RED), "Output:"])).logits
    assert model.lm.config.get_text_config().vocab_size == logits.shape[-1]


def test_generate_default_mask_keeps_real_eos_when_pad_is_eos():
    """A tokenizer whose pad token is its EOS: a prompt's real EOS tokens (packed documents) stay attended."""
    from flamingo_vlm import build_flamingo
    from flamingo_vlm.tiny import make_tiny_clip, make_tiny_lm, make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    model, processor = build_flamingo(make_tiny_lm("llama", vocab_size=len(tokenizer)), make_tiny_clip(), tokenizer, resampler_depth=1)
    assert model.config.pad_token_id == model.config.eos_token_id
    batch = processor([image(RED), "a red circle</s>", image(BLUE), "Output:"])
    assert (batch["input_ids"] == model.config.eos_token_id).any()
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)
    default = model.generate(batch["input_ids"], pixel_values=batch["pixel_values"], **kw)
    explicit = model.generate(**batch, **kw)
    assert torch.equal(default.sequences, explicit.sequences)
    torch.testing.assert_close(torch.stack(default.scores), torch.stack(explicit.scores), atol=0, rtol=0)


def test_more_layers_between_blocks_than_the_lm_has_is_refused():
    with pytest.raises(ValueError, match="cross_attn_every_n_layers=3 is more than the LM's 2 decoder layers"):
        build("llama", cross_attn_every_n_layers=3)
