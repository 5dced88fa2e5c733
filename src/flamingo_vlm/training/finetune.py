"""Fine-tuning settings of a TrainConfig applied to the model it trains (and the processor saved with it)."""

from __future__ import annotations

from ..processing import ImageTransform


def apply_finetuning(model, processor, config) -> None:
    """Train the backbone parts ``config`` names (``train_vision_blocks``, ``train_lm_layers``, ``lora``) and
    run the encoder at ``image_size``; the processor's image transform follows the new size, so the saved
    model's processor feeds it what it was fine-tuned on. Nothing to do when the config names none."""
    changes = config.backbone_training()
    if not changes:
        return
    model.set_backbone_training(**changes)
    if "vision_image_size" in changes and processor is not None:
        processor.image_transform = ImageTransform.for_encoder(model.vision_encoder)


__all__ = ["apply_finetuning"]
