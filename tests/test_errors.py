"""Bad model inputs and bad builds: each a ValueError that names the problem."""

import pytest
import torch
from torch import nn

from flamingo_vlm import FlamingoConfig, FlamingoModel, build_flamingo
from flamingo_vlm.tiny import make_tiny_clip, make_tokenizer

from helpers import BLUE, GREEN, RED, build, image


@pytest.fixture(scope="module")
def built():
    return build("llama")


@pytest.fixture(scope="module")
def batch(built):
    _, processor = built
    return processor([["a", image(RED), "b", image(BLUE), "c"], ["d", image(GREEN), "e"]])


# ---- <image> tokens vs media ----------------------------------------------------------------------
def test_too_many_media_tokens(built, batch):
    model, _ = built
    with pytest.raises(ValueError, match=r"3 <image> token\(s\) \(per row: \[2, 1\]\) but 2 media were given"):
        model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"][:2])


def test_too_few_media_tokens(built, batch):
    model, _ = built
    extra = torch.cat([batch["pixel_values"], batch["pixel_values"][:1]])
    with pytest.raises(ValueError, match=r"3 <image> token\(s\) \(per row: \[2, 1\]\) but 4 media were given"):
        model(batch["input_ids"], batch["attention_mask"], pixel_values=extra)
    with pytest.raises(ValueError, match=r"0 <image> token\(s\) \(per row: \[0\]\) but 1 media"):
        model(torch.tensor([[5, 6, 7]]), pixel_values=batch["pixel_values"][:1])


def test_media_tokens_without_pixel_values(built, batch):
    model, _ = built
    with pytest.raises(ValueError, match=r"3 <image> token\(s\) but no media were given \(pixel_values=None\)"):
        model(batch["input_ids"], batch["attention_mask"])
    with pytest.raises(ValueError, match="no media were given"):
        model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=1)


def test_only_one_kind_of_media(built, batch):
    model, _ = built
    tokens = torch.zeros(3, model.config.resampler_num_latents, model.vision_encoder.hidden_size)
    with pytest.raises(ValueError, match=r"only one of pixel_values, vision_features, visual_tokens"):
        model(batch["input_ids"], pixel_values=batch["pixel_values"], visual_tokens=tokens)


# ---- pixel_values shapes and types ----------------------------------------------------------------
@pytest.mark.parametrize(
    "shape",
    [(3, 32, 32), (3, 1, 32, 32), (3, 1, 1, 32, 32), (3, 1, 4, 32, 32), (3, 1, 3, 32), (1, 3, 1, 1, 3, 32, 32)],
    ids=["CHW", "C=1", "T-C=1", "C=4", "rank4-wrong", "rank7"],
)
def test_pixel_values_of_wrong_shape(built, batch, shape):
    model, _ = built
    with pytest.raises(ValueError, match=r"pixel_values must be \[M, C, H, W\], \[M, T, C, H, W\] or \[B, N, T, C, H, W\] with C=3"):
        model(batch["input_ids"], pixel_values=torch.randn(shape))


def test_integer_pixel_values(built, batch):
    model, _ = built
    with pytest.raises(ValueError, match="pixel_values must be a float tensor.*torch.uint8"):
        model(batch["input_ids"], pixel_values=torch.zeros(3, 1, 3, 32, 32, dtype=torch.uint8))


def test_image_layouts_that_are_accepted(built, batch):
    """[M, C, H, W] and [B, N, T, C, H, W] (N media in every row) give the logits of [M, T, C, H, W]."""
    model, processor = built
    two = processor([["a", image(RED), "b"], ["c", image(BLUE), "d"]])
    pv = two["pixel_values"]
    with torch.no_grad():
        ref = model(two["input_ids"], two["attention_mask"], pixel_values=pv).logits
        flat = model(two["input_ids"], two["attention_mask"], pixel_values=pv[:, 0]).logits
        grouped = model(two["input_ids"], two["attention_mask"], pixel_values=pv[:, None]).logits
    assert torch.equal(flat, ref) and torch.equal(grouped, ref)


def test_grouped_pixel_values_with_a_different_media_count_per_row(built, batch):
    model, _ = built
    pv = batch["pixel_values"]  # [3, 1, C, H, W]; rows hold 2 and 1 <image> tokens
    grouped = torch.stack([pv[:2], pv[1:]])  # [B=2, N=2, T, C, H, W]
    with pytest.raises(ValueError, match=r"has 2 media per row but the rows hold \[2, 1\] <image> tokens"):
        model(batch["input_ids"], pixel_values=grouped)


def test_frame_mask_of_wrong_shape(built, batch):
    model, _ = built
    with pytest.raises(ValueError, match=r"frame_mask must be \[M, T\] = \(3, 1\), got \(3, 2\)"):
        model(batch["input_ids"], pixel_values=batch["pixel_values"], frame_mask=torch.ones(3, 2, dtype=torch.bool))


def test_precomputed_features_of_wrong_rank(built, batch):
    model, _ = built
    d = model.vision_encoder.hidden_size
    with pytest.raises(ValueError, match=r"vision_features must be \[M, T, S, d\]"):
        model(batch["input_ids"], vision_features=torch.randn(3, 16, d))
    with pytest.raises(ValueError, match=r"visual_tokens must be \[M, n, d\]"):
        model(batch["input_ids"], visual_tokens=torch.randn(3, 1, 8, d))


# ---- input_ids, devices, labels -------------------------------------------------------------------
def test_input_ids_of_wrong_rank_or_type(built, batch):
    model, _ = built
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \[batch, seq_len\], got \(5,\)"):
        model(batch["input_ids"][0])
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(batch["input_ids"].float())
    with pytest.raises(ValueError, match="input_ids must be an integer tensor.*list"):
        model([[1, 2, 3]])


def test_inputs_on_another_device(built, batch):
    model, _ = built
    with pytest.raises(ValueError, match=r"input_ids are on meta but the model is on cpu.*\.to\(model\.device\)"):
        model(batch["input_ids"].to("meta"), pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match=r"pixel_values is on meta but the model is on cpu"):
        model(batch["input_ids"], pixel_values=batch["pixel_values"].to("meta"))
    tokens = torch.zeros(3, model.config.resampler_num_latents, model.vision_encoder.hidden_size, device="meta")
    with pytest.raises(ValueError, match=r"visual_tokens is on meta but the model is on cpu"):
        model(batch["input_ids"], visual_tokens=tokens)


def test_labels_of_the_wrong_shape(built, batch):
    model, _ = built
    ids = batch["input_ids"]
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \(2, 5\), got \(2, 4\)"):
        model(ids, batch["attention_mask"], pixel_values=batch["pixel_values"], labels=ids[:, :-1])
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model(ids, batch["attention_mask"], pixel_values=batch["pixel_values"], labels=ids.flatten())


# ---- building -------------------------------------------------------------------------------------
class _Config:
    hidden_size = 32
    num_hidden_layers = 2

    def get_text_config(self):
        return self


class OpaqueLM(nn.Module):
    """Causal-LM-like, but its decoder layers are not a ModuleList of num_hidden_layers elements."""

    def __init__(self, vocab_size: int, layers_as_list_of: int | None = None):
        super().__init__()
        self.config = _Config()
        self.embed = nn.Embedding(vocab_size, 32)
        if layers_as_list_of is None:
            self.block_a, self.block_b = nn.Linear(32, 32), nn.Linear(32, 32)
        else:
            self.blocks = nn.ModuleList(nn.Linear(32, 32) for _ in range(layers_as_list_of))
        self.head = nn.Linear(32, vocab_size)

    def forward(self, input_ids, **kwargs):
        return self.head(self.embed(input_ids))


@pytest.mark.parametrize("layers_as_list_of", [None, 3], ids=["no-modulelist", "wrong-length"])
def test_lm_whose_decoder_layers_cannot_be_found(layers_as_list_of):
    tokenizer = make_tokenizer()
    lm = OpaqueLM(len(tokenizer), layers_as_list_of)
    with pytest.raises(ValueError, match=r"cannot find the decoder layers of OpaqueLM.*num_hidden_layers=2.*decoder_layers_attr="):
        build_flamingo(lm, make_tiny_clip(), tokenizer, resampler_depth=1, resampler_num_latents=4)


def test_ambiguous_decoder_layers_list_the_candidates():
    tokenizer = make_tokenizer()
    lm = OpaqueLM(len(tokenizer), layers_as_list_of=2)
    lm.other = nn.ModuleList(nn.ReLU() for _ in range(2))
    with pytest.raises(ValueError, match=r"candidate ModuleLists: blocks \(2 x Linear\), other \(2 x ReLU\).*decoder_layers_attr"):
        build_flamingo(lm, make_tiny_clip(), tokenizer, resampler_depth=1, resampler_num_latents=4)


@pytest.mark.parametrize(
    "attr, message",
    [("model.blocks", r"decoder_layers_attr='model.blocks': LlamaModel has no attribute 'blocks'"),
     ("layers", r"LlamaForCausalLM has no attribute 'layers'"),
     ("model.norm", r"decoder_layers_attr='model.norm' names a LlamaRMSNorm, not an nn.ModuleList")],
)
def test_wrong_decoder_layers_attr(attr, message):
    with pytest.raises(ValueError, match=message):
        build("llama", decoder_layers_attr=attr)


def test_correct_decoder_layers_attr_works(built, batch):
    model, _ = built
    named, _ = build("llama", decoder_layers_attr="model.layers")
    assert named.decoder_layers_attr == model.decoder_layers_attr == "model.layers"
    assert len(named.xattn_blocks) == 2
    with torch.no_grad():
        assert torch.equal(named(**batch).logits, model(**batch).logits)


def test_wrapping_an_already_wrapped_lm(built):
    model, processor = built
    with pytest.raises(ValueError, match="already a Flamingo LM"):
        build_flamingo(model.lm, model.vision_encoder, processor.tokenizer)


def test_failed_rewrap_leaves_the_model_unchanged():
    model, processor = build("llama")
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    batch = processor([image(RED), "Output: a red"])
    with torch.no_grad():
        before = model(**batch).logits
    with pytest.raises(ValueError, match="already a Flamingo LM"):
        FlamingoModel(model.config, model.lm, model.vision_encoder)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize(
    "overrides, message",
    [(dict(media_attention="foo"), "media_attention must be 'last' or 'all', got 'foo'"),
     (dict(ff_activation="tanh"), "ff_activation must be 'squared_relu', 'gelu', 'silu' or 'relu', got 'tanh'"),
     (dict(xattn_gate="matrix"), "xattn_gate must be one of \\('scalar', 'vector'\\), got 'matrix'"),
     (dict(gate_init="ones"), "gate_init must be 'zeros' or 'normal', got 'ones'"),
     (dict(cross_attn_every_n_layers=0), "cross_attn_every_n_layers must be >= 1"),
     (dict(resampler_num_latents=0), "resampler_num_latents must be >= 1, got 0"),
     (dict(max_num_frames=0), "max_num_frames must be >= 1, got 0")],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        FlamingoConfig(**overrides)


def test_bad_config_values_through_the_builder():
    tokenizer = make_tokenizer()
    lm = OpaqueLM(len(tokenizer))
    with pytest.raises(ValueError, match="media_attention must be 'last' or 'all', got 'foo'"):
        build_flamingo(lm, make_tiny_clip(), tokenizer, media_attention="foo")
    with pytest.raises(ValueError, match=r"unknown FlamingoConfig key\(s\) 'not_a_field'; known keys: "):
        FlamingoConfig.from_dict({**FlamingoConfig().to_dict(), "not_a_field": 1})


def test_transformers_older_than_the_cache_rename_is_refused():
    """Before 5.24 the LM's KV cache was `past_key_values`: our `cache=` would be dropped silently."""
    from flamingo_vlm._requirements import check_transformers

    with pytest.raises(ImportError, match=r"transformers>=5\.24.*found 5\.17\.0"):
        check_transformers("5.17.0")
    check_transformers("5.24.0")
    check_transformers("5.31.0.dev0")
