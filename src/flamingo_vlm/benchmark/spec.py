"""BenchConfig: the backbone sizes, bridge and workloads of one ``flamingo bench`` run (a YAML preset)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..yaml_config import apply_overrides, from_dict, read_yaml_mapping

WORKLOADS = ("train", "generate", "scaling")


@dataclass
class BenchConfig:
    """One benchmark preset. Both sides (ours, OpenFlamingo) build random-init backbones of these sizes."""

    name: str = "bench"
    # Llama-style LM (transformers LlamaConfig fields).
    lm: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        vocab_size=32000, max_position_embeddings=2048))
    # ViT (CLIP vision tower): width, layers, heads, image size, patch size. Ours: HF CLIPVisionModel;
    # OpenFlamingo: an open_clip model config of the same sizes (random init, pretrained=None).
    vision: dict[str, Any] = field(default_factory=lambda: dict(width=768, layers=12, heads=12, image_size=224, patch_size=32))
    # FlamingoConfig fields for our side; the OpenFlamingo side reads the ones it has (resampler depth /
    # latents, xattn heads / dim_head / ff_mult are fixed in its code at 6 / 64 / 8 / 64 / 4).
    flamingo: dict[str, Any] = field(default_factory=lambda: dict(
        cross_attn_every_n_layers=1, resampler_depth=6, resampler_num_latents=64, resampler_heads=8,
        resampler_dim_head=64, resampler_ff_mult=4, xattn_heads=8, xattn_dim_head=64, xattn_ff_mult=4,
        ff_activation="gelu", xattn_norm_media=False))

    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))
    # Training step: batch x seq_len tokens, images_per_row images in each row; AdamW on trainable params.
    train_batch: int = 4
    train_seq_len: int = 128
    train_images_per_row: int = 3
    # Generation: one prompt of prompt_len tokens with prompt_images images; new_tokens generated (forced).
    prompt_len: int = 200
    prompt_images: int = 5
    new_tokens: int = 32
    num_beams: int = 3
    # Scaling: prompts of n images and n * tokens_per_shot tokens; prefill, decode and xattn cost per token.
    scaling_images: list[int] = field(default_factory=lambda: [1, 5, 17, 33])
    tokens_per_shot: int = 40
    scaling_new_tokens: int = 8

    warmup: int = 1
    repeats: int = 3
    rounds: int = 2  # our/peer subprocess pairs per workload, interleaved (ABAB); medians over all runs
    threads: int | None = None  # torch.set_num_threads on both sides (default: torch's choice)
    device: str = "cpu"
    precision: str = "fp32"  # "fp32" or "bf16" (frozen backbones in bf16 + autocast; OpenFlamingo: autocast)
    # torch.compile our dense per-layer work (training's apply_compile; the vision encoder's blocks too).
    # OpenFlamingo has no such option: its side stays eager, so the table's ratios then include compile.
    compile: bool = False
    peak_tflops: float | None = None  # for MFU; on CUDA guessed from the device name when None
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.workloads) - set(WORKLOADS))
        if unknown:
            raise ValueError(f"unknown workloads {unknown}: expected some of {list(WORKLOADS)}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        for name in ("train_batch", "train_seq_len", "prompt_len", "new_tokens", "num_beams", "repeats", "rounds", "tokens_per_shot"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_images_per_row < 1 or self.train_seq_len < 2 * self.train_images_per_row:
            raise ValueError("train_seq_len must leave at least 2 tokens per image (<image> ... <|endofchunk|>)")
        if self.prompt_images < 1 or self.prompt_len < 2 * self.prompt_images:
            raise ValueError("prompt_len must leave at least 2 tokens per image")
        if any(n < 1 for n in self.scaling_images) or self.tokens_per_shot < 2:
            raise ValueError("scaling_images must be >= 1 and tokens_per_shot >= 2")
        if self.new_tokens < 2 or self.scaling_new_tokens < 2:
            raise ValueError("new_tokens and scaling_new_tokens must be >= 2 (decode speed is measured past the first)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def load_bench_config(path: str | Path | None, overrides: Sequence[str] = ()) -> BenchConfig:
    """A BenchConfig from a YAML preset (or the defaults when None), with ``key=value`` overrides."""
    data = read_yaml_mapping(path, "bench config") if path is not None else {}
    apply_overrides(data, overrides)
    defaults = BenchConfig()
    for key in ("lm", "vision", "flamingo"):  # a preset names only the sizes it changes: the rest stay the defaults'
        if isinstance(data.get(key), dict):
            data[key] = {**getattr(defaults, key), **data[key]}
    return from_dict(BenchConfig, data)
