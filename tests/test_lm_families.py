"""Every LM family people pair with a vision encoder, at the config shape of a released checkpoint.

Each LM is built from its transformers config class with the released checkpoint's settings (tied or
untied embeddings, grouped-query head ratios, RoPE scaling dicts, partial rotary, parallel attention,
ALiBi, logit soft-capping, QK norms, padding rows of the vocabulary past the tokenizer's entries) and only
the sizes shrunk: width 48-64, 2 layers, and sliding windows shortened below the test prompts' length
so that they bind. The tokenizer is the tiny test tokenizer (259 entries); the LM gets as many embedding
rows past it as the checkpoint has past its own tokenizer, so OpenFlamingo's three new tokens land in
those padding rows and ids above the new tokens stay the LM's own (Pythia, OPT, Qwen2/3, MPT, Phi-3).

For each family: gate 0 is the bare LM to the bit, the media context reaches every cross-attention block,
cached generation equals recomputation, save/load is exact, a training step moves only the bridge, and
padding-row ids above the new tokens run in forward and in generation.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from flamingo_vlm import FlamingoModel, build_flamingo
from flamingo_vlm.tiny import make_tiny_clip, make_tokenizer
from flamingo_vlm.training.distributed import apply_activation_checkpointing

from helpers import GREEN, RED, SMALL_BRIDGE, image, randomize_bridge
from test_generation import _greedy_by_recomputation, _prompts

TOKENIZER_LEN = len(make_tokenizer())
NUM_NEW = 3  # <|endofchunk|>, <image>, <PAD>: ids TOKENIZER_LEN .. TOKENIZER_LEN + 2
WINDOW = 8  # sliding windows shortened from 4096 (Mistral, Gemma 2) / 512 (Gemma 3) so they bind here
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# model_type, the checkpoint's embedding rows past its tokenizer's entries, config kwargs (the checkpoint's,
# sizes shrunk).
FAMILIES: dict[str, tuple[str, int, dict]] = {
    # EleutherAI/pythia-410m (and RedPajama-INCITE-3B, OpenFlamingo-4B's LM): 50304 rows, 50277 tokens;
    # rotary on a quarter of each head, attention and MLP in parallel, untied head (embed_out)
    "pythia": ("gpt_neox", 27, dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
        rotary_emb_base=10000, use_parallel_residual=True, tie_word_embeddings=False, max_position_embeddings=2048,
    )),
    # facebook/opt-125m: 50272 rows, 50265 tokens; tied; learned positions offset by 2; pre-LayerNorm
    "opt": ("opt", 7, dict(
        hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
        do_layer_norm_before=True, tie_word_embeddings=True, max_position_embeddings=2048, pad_token_id=2,
    )),
    # Qwen/Qwen2-0.5B: 151936 rows, 151665 tokens; tied; 14 query heads on 2 key/value heads (7:1); qkv bias
    "qwen2": ("qwen2", 271, dict(
        hidden_size=56, intermediate_size=128, num_hidden_layers=2, num_attention_heads=7, num_key_value_heads=1,
        tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
    )),
    # Qwen/Qwen3-0.6B: 151936 rows, 151669 tokens; tied; QK RMSNorm; head_dim set apart from hidden/heads
    "qwen3": ("qwen3", 267, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
    )),
    # mosaicml/mpt-7b (OpenFlamingo-9B's LM): 50432 rows, 50277 tokens; ALiBi, no biases, tied
    "mpt": ("mpt", 155, dict(
        d_model=64, n_heads=4, n_layers=2, expansion_ratio=4, max_seq_len=2048, no_bias=True,
        attn_config={"alibi": True, "alibi_bias_max": 8}, tie_word_embeddings=True,
    )),
    # meta-llama/Llama-3.1-8B: 128256 rows = tokens; 32 query heads on 8 (4:1); llama3 RoPE scaling; untied
    "llama3.1": ("llama", 0, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )),
    # meta-llama/Llama-3.2-1B: as 3.1 with tied embeddings and RoPE factor 32
    "llama3.2": ("llama", 0, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072, tie_word_embeddings=True,
    )),
    # HuggingFaceTB/SmolLM-135M (Llama architecture): 49152 rows = tokens; 9 heads on 3 (3:1); tied
    "smollm": ("llama", 0, dict(
        hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
        tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=2048,
    )),
    # mistralai/Mistral-7B-v0.1: 32000 rows = tokens; 32 heads on 8 (4:1); sliding-window attention; untied
    "mistral": ("mistral", 0, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        sliding_window=WINDOW, rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=32768,
    )),
    # google/gemma-2-2b: 256000 rows = tokens; tied; embeddings scaled by sqrt(d); attention and final logit
    # soft-capping; local (sliding) and global layers alternating; head_dim and query scale set apart
    "gemma2": ("gemma2", 0, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
    )),
    # google/gemma-3-1b-pt (text): 262144 rows; tied; QK norms; 5 local : 1 global layers (here 1 : 1), each
    # with its own RoPE base; one key/value head
    "gemma3": ("gemma3_text", 0, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
        rope_theta=1000000.0, rope_local_base_freq=10000.0, tie_word_embeddings=True,
    )),
    # microsoft/Phi-3-mini-4k-instruct: 32064 rows, 32011 tokens; fused qkv / gate_up; untied; partial rotary
    # as Phi-4-mini (0.75)
    "phi3": ("phi3", 53, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        partial_rotary_factor=0.75, tie_word_embeddings=False, max_position_embeddings=4096, pad_token_id=2,
    )),
    # tiiuae/falcon-7b: 65024 rows = tokens; one key/value head (multi-query), attention and MLP in parallel,
    # rotary, no biases, tied
    "falcon": ("falcon", 0, dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, parallel_attn=True,
        new_decoder_architecture=False, alibi=False, bias=False, tie_word_embeddings=True,
    )),
    # tiiuae/falcon-rw-1b: ALiBi, sequential attention and MLP, biases, multi-head
    "falcon-rw": ("falcon", 0, dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=False, parallel_attn=False,
        new_decoder_architecture=False, alibi=True, bias=True, tie_word_embeddings=True,
    )),
    # openai-community/gpt2: 50257 rows = tokens; learned positions; tied
    "gpt2": ("gpt2", 0, dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, activation_function="gelu_new")),
}
PADDED = [name for name, (_, padding, _) in FAMILIES.items() if padding > NUM_NEW]


def bare_lm(family: str, seed: int = 0):
    """The family's LM, random weights of ``seed`` (the same LM every call)."""
    model_type, padding, kwargs = FAMILIES[family]
    kwargs = {"bos_token_id": 0, "eos_token_id": 1, **kwargs}
    config = AutoConfig.for_model(model_type, vocab_size=TOKENIZER_LEN + padding, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def build(family: str):
    torch.manual_seed(1)
    model, processor = build_flamingo(bare_lm(family), make_tiny_clip(), make_tokenizer(), **SMALL_BRIDGE)
    assert list(model.config.new_token_ids) == list(range(TOKENIZER_LEN, TOKENIZER_LEN + NUM_NEW))
    return model, processor


def padding_ids(family: str) -> list[int]:
    """Ids of the LM's own rows above the new tokens (padding rows of its vocabulary)."""
    return list(range(TOKENIZER_LEN + NUM_NEW, TOKENIZER_LEN + FAMILIES[family][1]))


def text_batch(processor, family: str):
    """Right-padded text the bare LM reads too (EOS in the masked padding), with padding-row ids in it."""
    tok = processor.tokenizer
    batch = tok(["two cats sit on the mat. the dog runs", "Question: what colour is the ball? Answer:"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ids[mask == 0] = tok.eos_token_id
    extra = padding_ids(family)[-2:]
    if extra:
        ids[0, 3 : 3 + len(extra)] = torch.tensor(extra)
    return ids, mask


def logits_without_new_columns(logits: torch.Tensor) -> torch.Tensor:
    return torch.cat([logits[..., :TOKENIZER_LEN], logits[..., TOKENIZER_LEN + NUM_NEW :]], dim=-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_zero_is_the_bare_lm(family):
    model, processor = build(family)
    bare = bare_lm(family)
    ids, mask = text_batch(processor, family)
    with torch.no_grad():
        ours = model(ids, mask).logits
        ref = bare(input_ids=ids, attention_mask=mask).logits
    assert ours.shape[-1] == max(ref.shape[-1], TOKENIZER_LEN + NUM_NEW)
    assert torch.equal(logits_without_new_columns(ours), logits_without_new_columns(ref[..., : ours.shape[-1]]))
    # with images in the prompt, closed gates give the logits of the same ids with no media routed
    batch = processor([[image(RED), "a red circle<|endofchunk|>", image(GREEN), "two cats"], ["the dog", image(GREEN), "Output:"]], padding_side="right")
    with torch.no_grad():
        lm_only = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(model(**batch).logits, lm_only)


@pytest.mark.parametrize("family", FAMILIES)
def test_new_tokens_start_at_the_mean_embedded_token(family):
    """The new rows embed as the mean of the LM's own embedded vocabulary, whatever the embedding module does
    to its rows (Gemma 3 scales them by sqrt(d))."""
    model, _ = build(family)
    embed = model.lm.get_input_embeddings()
    with torch.no_grad():  # the mean over every row the LM has (padding rows too), as the new rows start
        mean = embed.base(torch.arange(embed.base.weight.shape[0])[None])[0].mean(0)
        new = embed(torch.arange(TOKENIZER_LEN, TOKENIZER_LEN + NUM_NEW)[None])[0]
    torch.testing.assert_close(new, mean.expand_as(new), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_receives_the_media(family):
    """Fails for a family whose layers do not get the media context: each block must attend to the images."""
    model, processor = build(family)
    randomize_bridge(model)
    calls = []
    for block in model.xattn_blocks:
        block.register_forward_hook(lambda module, args, out: calls.append((id(module), len(args))))
    batch = _prompts(processor)
    with torch.no_grad():
        with_media = model(**batch).logits
    assert sorted(calls) == sorted((id(b), 3) for b in model.xattn_blocks)  # (hidden, media kv, routing) each
    other = {**batch, "pixel_values": batch["pixel_values"].flip(0)}
    with torch.no_grad():
        assert (model(**other).logits - with_media).abs().max() > 1e-3  # the images matter


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_recomputation(family):
    model, processor = build(family)
    randomize_bridge(model)
    batch = _prompts(processor)
    extra = padding_ids(family)
    if extra:  # a padding-row id in the prompt, after the first image
        batch["input_ids"][0, -2] = extra[-1]
    steps = 5
    out = model.generate(  # use_cache explicitly: MPT's config turns the KV cache off by default
        **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True, use_cache=True
    )
    ref_ids, ref_logits = _greedy_by_recomputation(model, batch, steps)
    assert torch.equal(out.sequences, ref_ids)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), ref_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", PADDED)
def test_padding_row_ids_run_in_generation(family):
    """Generation made to emit an id above the new tokens runs it at the next step as the LM would."""
    model, processor = build(family)
    randomize_bridge(model)
    batch = _prompts(processor)
    target = padding_ids(family)[-1]
    out = model.generate(
        **batch, max_new_tokens=3, do_sample=False, sequence_bias={(target,): 1e4}, return_dict_in_generate=True, output_logits=True,
        use_cache=True,
    )
    assert bool((out.sequences[:, -3:] == target).all())
    # each step's logits (the KV cache holding the emitted ids) equal a full recomputation's
    mask = torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, -3:])], dim=1)
    with torch.no_grad():
        full = model(out.sequences, mask, pixel_values=batch["pixel_values"]).logits
    prompt_len = batch["input_ids"].shape[1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full[:, prompt_len - 1 : -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_is_exact(family, tmp_path):
    model, processor = build(family)
    randomize_bridge(model)
    batch = _prompts(processor)
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded = FlamingoModel.from_pretrained(tmp_path, lm=bare_lm(family), vision=make_tiny_clip())
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, before)
    with pytest.raises(ValueError, match="not the one this bridge was trained on"):
        FlamingoModel.from_pretrained(tmp_path, lm=bare_lm(family, seed=5), vision=make_tiny_clip())


def _lm_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.lm.named_parameters() if ".gated_xattn." not in name and not name.endswith(("new.weight", "new_weight"))}


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_moves_only_the_bridge(family):
    model, processor = build(family)
    randomize_bridge(model)
    model.train()
    batch = _prompts(processor)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    lm_before = _lm_state(model)
    trained = dict(model.trainable_parameters())
    bridge_before = {name: p.detach().clone() for name, p in trained.items()}
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-3)
    loss = model(**batch, labels=labels, return_logits=False).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    lm_after = _lm_state(model)
    assert lm_after.keys() == lm_before.keys() and all(torch.equal(lm_after[k], v) for k, v in lm_before.items())
    moved = [name for name, p in trained.items() if not torch.equal(p.detach(), bridge_before[name])]
    assert any(n.startswith("resampler.") for n in moved)
    # the media reached every block: its cross-attention (not only its feed-forward) was trained
    assert all(f"xattn.{k}.attn.to_kv.weight" in moved for k in range(len(model.xattn_blocks)))
    assert "new_token_embeddings.weight" in moved


@pytest.mark.parametrize("family", ["mpt", "falcon"])
def test_relayed_context_survives_activation_checkpointing(family):
    """MPT and Falcon get the media context through a relay; checkpointed layers recompute with it."""
    grads = []
    for checkpointed in (False, True):
        model, processor = build(family)
        randomize_bridge(model)
        if checkpointed:
            apply_activation_checkpointing(model)
        model.train()
        batch = _prompts(processor)
        model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.trainable_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("xattn.0.attn") for n in grads[0])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["mpt", "falcon"])
@pytest.mark.parametrize("use_cache", [True, None])
def test_relayed_beam_search_cached_equals_uncached(family, use_cache):
    """Beam search runs each prompt once and copies its KV cache (FlamingoModel._prompt_cache): through the relay
    too, and not when the LM's generation config turns the cache off (MPT's: None = its default)."""
    model, processor = build(family)
    randomize_bridge(model)
    batch = _prompts(processor)
    kw = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, return_dict_in_generate=True, output_scores=True)
    cached = model.generate(**batch, **({} if use_cache is None else {"use_cache": use_cache}), **kw)
    recomputed = model.generate(**batch, use_cache=False, cache_media_kv=False, **kw)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mpt", "gpt2"])
def test_an_lm_built_on_the_meta_device_gets_the_media(family):
    """Sharded construction builds the LM on the meta device, where the route cannot be probed: once its weights
    are materialised the model computes what one built on the CPU does (images included)."""
    model, processor = build(family)
    randomize_bridge(model)
    _, padding, kwargs = FAMILIES[family]
    config = AutoConfig.for_model(FAMILIES[family][0], vocab_size=TOKENIZER_LEN + padding, bos_token_id=0, eos_token_id=1, **kwargs)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config).eval()
    meta_model, _ = build_flamingo(lm, make_tiny_clip(), make_tokenizer(), **SMALL_BRIDGE)
    meta_model.lm.to_empty(device="cpu")  # the LM with its xattn blocks, and the resampler, which followed it
    meta_model.resampler.to_empty(device="cpu")
    meta_model.load_state_dict(model.state_dict())
    batch = _prompts(processor)
    with torch.no_grad():
        assert torch.equal(meta_model(**batch).logits, model(**batch).logits)


class _CustomCodeLM(torch.nn.Module):
    """A causal LM as custom (``trust_remote_code``) code may write one: a forward with a fixed signature (no
    ``**kwargs``, as MosaicGPT's for OpenFlamingo-3B's MPT-1B), and optionally a layer loop that calls each
    block's ``forward`` method directly instead of the module."""

    def __init__(self, call_forward_directly: bool = False) -> None:
        super().__init__()
        self.inner = bare_lm("llama3.1")
        self.config = self.inner.config
        self.call_forward_directly = call_forward_directly

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def set_input_embeddings(self, e):
        self.inner.set_input_embeddings(e)

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def set_output_embeddings(self, e):
        self.inner.set_output_embeddings(e)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=False, position_ids=None):
        if not self.call_forward_directly:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        model = self.inner.model
        hidden = model.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1])[None]
        rotary = model.rotary_emb(hidden, positions)
        for layer in model.layers:
            hidden = layer.forward(hidden, position_embeddings=rotary)
        return self.inner.lm_head(model.norm(hidden))


def test_a_custom_forward_without_keyword_arguments_gets_the_context_relayed():
    model, processor = build_flamingo(_CustomCodeLM(), make_tiny_clip(), make_tokenizer(), **SMALL_BRIDGE)
    randomize_bridge(model)
    calls = []
    for block in model.xattn_blocks:
        block.register_forward_hook(lambda module, args, out: calls.append(len(args)))
    with torch.no_grad():
        model(**_prompts(processor))
    assert calls == [3] * len(model.xattn_blocks)


def test_an_lm_the_context_cannot_reach_is_refused():
    with pytest.raises(ValueError, match="_CustomCodeLM's forward never called its decoder layers .* as modules"):
        build_flamingo(_CustomCodeLM(call_forward_directly=True), make_tiny_clip(), make_tokenizer(), **SMALL_BRIDGE)
