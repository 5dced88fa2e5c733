"""Tiny random-initialised backbones, saved with ``save_pretrained`` like any real checkpoint.

For tests, examples and benchmarks on machines without downloads: the models are loaded back through
the same ``from_pretrained`` path as a hub model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Small configs of the LM architectures the adapter is tested on (kwargs for AutoConfig.for_model).
TINY_LM_CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=512),
}

_CORPUS = [
    "a red circle and a blue square on a green background",
    "two cats sit on the mat. the dog runs in the park.",
    "Question: what colour is the ball? Answer: red",
    "Output: a small yellow triangle next to a large purple star",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9",
]


def make_tokenizer(vocab_size: int = 256):
    """A byte-level BPE tokenizer trained on a few sentences, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_tiny_lm(model_type: str = "llama", vocab_size: int = 256, seed: int = 0, **overrides):
    """A random-init causal LM of ``model_type`` from :data:`TINY_LM_CONFIGS`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in TINY_LM_CONFIGS:
        raise ValueError(f"no tiny config for {model_type!r}; known: {sorted(TINY_LM_CONFIGS)}")
    kwargs = {**TINY_LM_CONFIGS[model_type], "vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 1, **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def make_tiny_clip(image_size: int = 32, patch_size: int = 8, hidden_size: int = 48, seed: int = 0):
    """A random-init ``CLIPVisionModel`` (image_size/patch_size)^2 patch tokens of width hidden_size."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=hidden_size,
    )
    torch.manual_seed(seed)
    return CLIPVisionModel(config).eval()


def create_tiny_backbones(directory: str | os.PathLike, lm_type: str = "llama", seed: int = 0) -> tuple[str, str]:
    """Save a tiny LM (+ tokenizer) and a tiny CLIP vision model under ``directory``; return their paths."""
    directory = Path(directory)
    lm_dir, vision_dir = directory / f"tiny-{lm_type}", directory / "tiny-clip"
    if not (lm_dir / "config.json").is_file():
        tokenizer = make_tokenizer()
        make_tiny_lm(lm_type, vocab_size=len(tokenizer), seed=seed).save_pretrained(lm_dir)
        tokenizer.save_pretrained(lm_dir)
    if not (vision_dir / "config.json").is_file():
        make_tiny_clip(seed=seed).save_pretrained(vision_dir)
    return str(lm_dir), str(vision_dir)
