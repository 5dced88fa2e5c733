"""Our side of ``flamingo bench``: build_flamingo on random-init backbones of the preset's sizes.

    python -m flamingo_vlm.benchmark.ours --spec spec.json --workload train --out result.json
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from ..modeling.loss import IGNORE_INDEX
from ..training.optim import build_optimizer
from .measure import autocast, random_pixels, word_tokenizer, worker_main


def build_backbones(spec: dict[str, Any]):
    """(LlamaForCausalLM, CLIPVisionModel, tokenizer), random init, sizes from the preset."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    lm_config = LlamaConfig(**spec["lm"], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    lm_config._attn_implementation = "sdpa"
    torch.manual_seed(spec["seed"])
    lm = LlamaForCausalLM(lm_config).eval()
    v = spec["vision"]
    vision_config = CLIPVisionConfig(
        hidden_size=v["width"], intermediate_size=4 * v["width"], num_hidden_layers=v["layers"],
        num_attention_heads=v["heads"], image_size=v["image_size"], patch_size=v["patch_size"], hidden_act="gelu",
    )
    vision_config._attn_implementation = "sdpa"
    vision = CLIPVisionModel(vision_config).eval()
    return lm, vision, word_tokenizer(spec["lm"]["vocab_size"])


class OurSide:
    """flamingo_vlm's FlamingoModel; frozen backbones in bf16 when the preset's precision is bf16, its dense
    per-layer work under ``torch.compile`` when the preset's ``compile`` is set."""

    def __init__(self, spec: dict[str, Any], device: torch.device) -> None:
        from .. import build_flamingo

        self.spec, self.device = spec, device
        lm, vision, tokenizer = build_backbones(spec)
        if spec["precision"] == "bf16":
            lm.to(torch.bfloat16)
            vision.to(torch.bfloat16)
        torch.manual_seed(spec["seed"] + 1)
        self.model, _ = build_flamingo(lm, vision, tokenizer, **spec["flamingo"])
        self.model.to(device)
        if spec.get("compile"):
            from ..training.distributed import apply_compile

            apply_compile(self.model, vision=True)
        self.media_token_id = self.model.config.media_token_id
        self.eoc_token_id = self.model.config.end_of_chunk_token_id

    def info(self) -> dict[str, Any]:
        m = self.model
        bridge = sum(p.numel() for p in m.resampler.parameters()) + sum(p.numel() for b in m.xattn_blocks for p in b.parameters())
        return {
            "side": "flamingo_vlm",
            "total_params": sum(p.numel() for p in m.parameters()),
            "trainable_params": sum(p.numel() for _, p in m.trainable_parameters()),
            "bridge_params": bridge,
            "vision_params": sum(p.numel() for p in m.vision_encoder.parameters()),
        }

    def train_step(self, input_ids: torch.Tensor, num_images: int) -> Callable[[], None]:
        model = self.model.train()
        optimizer = build_optimizer(list(model.trainable_parameters()), lr=1e-4, weight_decay=0.1)  # the training loop's AdamW
        pixels = random_pixels(input_ids.shape[0] * num_images, self.spec, self.device)
        labels = input_ids.masked_fill(input_ids == self.media_token_id, IGNORE_INDEX)
        mask = torch.ones_like(input_ids)

        def step() -> None:
            with autocast(self.spec):
                # as the training loop does: the loss fused with the LM head, no [B, L, V] logits kept
                loss = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, labels=labels, return_logits=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def generate(self, input_ids: torch.Tensor, num_images: int, num_beams: int) -> Callable[[int], torch.Tensor]:
        model = self.model.eval()
        pixels = random_pixels(num_images, self.spec, self.device)
        mask = torch.ones_like(input_ids)

        def generate(new_tokens: int) -> torch.Tensor:
            with torch.inference_mode(), autocast(self.spec):
                return model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, num_beams=num_beams,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

        return generate

    def cross_attention(self, input_ids: torch.Tensor, num_images: int) -> Callable[[], None]:
        """One xattn layer's masked cross-attention over the prompt, routing and media K/V included."""
        model = self.model.eval()
        block = model.xattn_blocks[0]
        with torch.inference_mode():
            visual = model.encode_media(random_pixels(num_images, self.spec, self.device)[:, None])
        hidden = torch.randn(*input_ids.shape, model.lm_hidden_size, device=self.device)

        def run() -> None:
            with torch.inference_mode(), autocast(self.spec):
                context = model.media_context(input_ids, visual)
                block.attn(hidden, block.media_kv(visual), context.routing)

        return run

    def vision(self, num_images: int) -> Callable[[], None]:
        pixels = random_pixels(num_images, self.spec, self.device)[:, None]

        def run() -> None:
            with torch.inference_mode(), autocast(self.spec):
                self.model.encode_media(pixels)

        return run


if __name__ == "__main__":
    sys.exit(worker_main(OurSide))
