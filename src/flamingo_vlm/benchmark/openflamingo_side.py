"""The OpenFlamingo 2.0.1 side of ``flamingo bench``, run as a script in OpenFlamingo's own environment.

    /path/to/ofenv/bin/python openflamingo_side.py --spec spec.json --workload train --out result.json

It imports only torch, transformers (< 4.47), open_clip, open_flamingo and the sibling ``measure``
module, never flamingo_vlm (which needs transformers 5). The model is built the way OpenFlamingo's own
``create_model_and_transforms`` builds it: a random-init open_clip ViT of the preset's sizes
(``pretrained=None``) and a random-init Llama saved with ``save_pretrained`` and loaded by path.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

if __package__:
    from .measure import autocast, random_pixels, word_tokenizer, worker_main
else:  # run as a script: this directory is on sys.path
    from measure import autocast, random_pixels, word_tokenizer, worker_main

# The bridge hyper-parameters OpenFlamingo 2.0.1 hard-codes (open_flamingo/src/helpers.py, flamingo.py).
OPENFLAMINGO_BRIDGE = dict(resampler_depth=6, resampler_num_latents=64, resampler_heads=8, resampler_dim_head=64,
                           resampler_ff_mult=4, xattn_heads=8, xattn_dim_head=64, xattn_ff_mult=4,
                           ff_activation="gelu", xattn_norm_media=False)


def check_equal_bridge(flamingo: dict[str, Any]) -> None:
    """The preset's bridge must be OpenFlamingo's, or the comparison is not at equal configuration."""
    different = {k: (flamingo.get(k), v) for k, v in OPENFLAMINGO_BRIDGE.items() if flamingo.get(k, v) != v}
    if different:
        raise ValueError(f"OpenFlamingo fixes these bridge settings; the preset differs (preset, OpenFlamingo): {different}")


def backbone_dir(spec: dict[str, Any]) -> Path:
    """A cache directory holding the random Llama + tokenizer (saved by this environment's transformers)
    and the open_clip model config, keyed by the sizes and seed."""
    import transformers

    key = json.dumps([spec["lm"], spec["vision"], spec["seed"], transformers.__version__], sort_keys=True)
    root = Path(spec.get("cache_dir") or Path.home() / ".cache" / "flamingo-vlm" / "bench")
    path = root / f"openflamingo-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (path / "done").is_file():
        return path
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec["seed"])
    lm = LlamaForCausalLM(LlamaConfig(**spec["lm"], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
    lm.save_pretrained(path / "lm")
    word_tokenizer(spec["lm"]["vocab_size"]).save_pretrained(path / "lm")
    v = spec["vision"]
    if v["width"] % v["heads"]:
        raise ValueError(f"vision width {v['width']} is not divisible by heads {v['heads']}")
    clip_config = {
        "embed_dim": 64,  # the text tower and projection are dropped by OpenFlamingo: keep them small
        "vision_cfg": {"image_size": v["image_size"], "layers": v["layers"], "width": v["width"],
                       "patch_size": v["patch_size"], "head_width": v["width"] // v["heads"]},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1},
    }
    (path / "bench-vit.json").write_text(json.dumps(clip_config))
    (path / "done").write_text("ok")
    return path


class OpenFlamingoSide:
    """open_flamingo.create_model_and_transforms with random backbones; trainable: perceiver, xattn, input embeddings."""

    def __init__(self, spec: dict[str, Any], device: torch.device) -> None:
        import open_clip
        from open_flamingo import create_model_and_transforms

        check_equal_bridge(spec["flamingo"])
        self.spec, self.device = spec, device
        path = backbone_dir(spec)
        open_clip.add_model_config(path / "bench-vit.json")
        torch.manual_seed(spec["seed"] + 1)
        with open(os.devnull, "w") as quiet, _redirect_stdout(quiet):  # it prints its parameter count
            self.model, _, self.tokenizer = create_model_and_transforms(
                clip_vision_encoder_path="bench-vit", clip_vision_encoder_pretrained=None,
                lang_encoder_path=str(path / "lm"), tokenizer_path=str(path / "lm"), use_local_files=True,
                cross_attn_every_n_layers=spec["flamingo"]["cross_attn_every_n_layers"],
            )
        self.model.to(device)
        self.media_token_id = self.tokenizer.encode("<image>")[-1]
        self.eoc_token_id = self.tokenizer.encode("<|endofchunk|>")[-1]

    def info(self) -> dict[str, Any]:
        m = self.model
        bridge = sum(p.numel() for p in m.perceiver.parameters()) + sum(
            p.numel() for layer in m.lang_encoder.gated_cross_attn_layers if layer is not None for p in layer.parameters())
        import open_flamingo

        return {
            "side": "open_flamingo",
            "version": getattr(open_flamingo, "__version__", "2.0.1"),
            "total_params": sum(p.numel() for p in m.parameters()),
            "trainable_params": sum(p.numel() for p in m.parameters() if p.requires_grad),
            "bridge_params": bridge,
            "vision_params": sum(p.numel() for p in m.vision_encoder.parameters()),
        }

    def _vision_x(self, batch: int, num_images: int) -> torch.Tensor:
        """[B, N, 1, C, H, W], OpenFlamingo's layout (every row holds the same number of images)."""
        pixels = random_pixels(batch * num_images, self.spec, self.device)
        return pixels.view(batch, num_images, 1, *pixels.shape[1:])

    def train_step(self, input_ids: torch.Tensor, num_images: int) -> Callable[[], None]:
        """As open_flamingo/train/train_utils.py: loss, backward, mask the embedding gradient to the new
        tokens' rows, AdamW step (gradient clipping left out on both sides)."""
        model = self.model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        vision_x = self._vision_x(input_ids.shape[0], num_images)
        labels = input_ids.masked_fill(input_ids == self.media_token_id, -100)
        mask = torch.ones_like(input_ids)
        embedding = model.lang_encoder.get_input_embeddings().weight

        def step() -> None:
            with autocast(self.spec):
                loss = model(vision_x=vision_x, lang_x=input_ids, attention_mask=mask, labels=labels)[0]
            loss.backward()
            zero_mask = torch.zeros_like(embedding.grad)
            zero_mask[self.media_token_id] = 1
            zero_mask[self.eoc_token_id] = 1
            embedding.grad = embedding.grad * zero_mask
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def generate(self, input_ids: torch.Tensor, num_images: int, num_beams: int) -> Callable[[int], torch.Tensor]:
        model = self.model.eval()
        vision_x = self._vision_x(1, num_images)
        mask = torch.ones_like(input_ids)

        def generate(new_tokens: int) -> torch.Tensor:
            with torch.inference_mode(), autocast(self.spec):
                return model.generate(vision_x=vision_x, lang_x=input_ids, attention_mask=mask, num_beams=num_beams,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)

        return generate

    def cross_attention(self, input_ids: torch.Tensor, num_images: int) -> Callable[[], None]:
        """One xattn layer's masked cross-attention over the prompt (its dense mask over every image)."""
        model = self.model.eval()
        attn = next(layer for layer in model.lang_encoder.gated_cross_attn_layers if layer is not None).attn
        with torch.inference_mode():
            vision = model.vision_encoder(self._vision_x(1, num_images).flatten(0, 2))[1]
            media = model.perceiver(vision.view(1, num_images, 1, *vision.shape[1:]))
        hidden = torch.randn(*input_ids.shape, model.lang_dim, device=self.device)
        media_locations = input_ids == self.media_token_id

        def run() -> None:
            with torch.inference_mode(), autocast(self.spec):
                attn(hidden, media, media_locations=media_locations)

        return run

    def vision(self, num_images: int) -> Callable[[], None]:
        model = self.model
        vision_x = self._vision_x(1, num_images)

        def run() -> None:
            with torch.inference_mode(), autocast(self.spec):
                features = model.vision_encoder(vision_x.flatten(0, 2))[1]
                model.perceiver(features.view(1, num_images, 1, *features.shape[1:]))

        return run


def _redirect_stdout(target):
    import contextlib

    return contextlib.redirect_stdout(target)


if __name__ == "__main__":
    sys.exit(worker_main(OpenFlamingoSide))
