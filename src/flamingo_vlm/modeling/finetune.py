"""Backbone weights trained with the bridge when fine-tuning (paper section 3.2), and the input resolution.

Pretraining trains the bridge only. Fine-tuning may also train, as the model's :class:`FlamingoConfig` says:

- ``train_vision_blocks``: the vision encoder's last n transformer blocks that its features use (-1: every
  weight of the encoder the features depend on, patch and position embeddings included; the paper
  unfreezes the whole encoder);
- ``train_lm_layers``: the LM's last n decoder layers (their own weights, not the LM's embeddings or head);
- ``lora_rank`` > 0: LoRA adapters (``peft``) on the LM's decoder layers, ``lora_target_modules`` in each
  (default: peft's choice for the LM's model type, e.g. q_proj / v_proj for Llama). B starts at zero, so a
  new adapter leaves the LM's output unchanged;
- ``vision_image_size``: the encoder's input resolution (paper: higher for fine-tuning), its position
  embeddings interpolated on the fly (transformers' ``interpolate_pos_encoding=True``, bicubic over the patch
  grid, exactly the stored table when the grid is the encoder's own), so the stored table, the checkpoint
  and every frozen weight keep their shapes.

Whatever is trained is part of :meth:`FlamingoModel.flamingo_state_dict` under the names below, so
training, checkpoints, ``save_pretrained`` and ``from_pretrained`` handle it as they handle the bridge:

    vision_encoder.<name>   a trained vision-encoder weight (its name inside the VisionEncoder)
    lm_layers.<i>.<name>    a weight of decoder layer i (the LM's own layer, inside the Flamingo wrapper)
    lora.<i>.<name>         a LoRA adapter weight in decoder layer i

Everything else stays frozen (``requires_grad=False``), as before.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .lm import find_decoder_layers

LORA_MARKER = "lora_"


def vision_blocks(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of the vision encoder's transformer blocks: its longest ModuleList of one layer type."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        return []
    return [(f"{best[0]}.{i}", block) for i, block in enumerate(best[1])]


def _unused_vision_parameters(encoder: nn.Module) -> set[str]:
    """Names of encoder weights the features never depend on (a transformers CLIP/SigLIP tower: the blocks after
    ``feature_layer``, ``post_layernorm`` when it is not applied, SigLIP's pooling head): never trained."""
    hf = getattr(encoder, "model", None)
    if getattr(encoder, "vision_type", "") not in ("clip", "siglip") or hf is None:
        return set()
    blocks = vision_blocks(encoder)
    feature_layer = getattr(encoder, "feature_layer", -1)
    used = len(blocks) + 1 + feature_layer if feature_layer < 0 else feature_layer  # hidden_states[0]: the embeddings
    unused_prefixes = [prefix + "." for prefix, _ in blocks[used:]]
    native_norm = encoder.vision_type == "siglip" and feature_layer == -1
    names = set()
    for name, _ in encoder.named_parameters():
        module_path = name.rsplit(".", 1)[0]
        if any(name.startswith(p) for p in unused_prefixes) or ".head." in f".{module_path}.":
            names.add(name)
        elif "post_layernorm" in module_path and getattr(encoder, "post_norm", None) is None and not native_norm:
            names.add(name)
    return names


def _inner_layers(model) -> list[nn.Module]:
    """The LM's own decoder layers (inside the Flamingo wrappers), in order."""
    _, layers = find_decoder_layers(model.lm, model.decoder_layers_attr)
    return [getattr(layer, "decoder_layer", layer) for layer in layers]


def backbone_state(model) -> dict[str, nn.Parameter]:
    """The trained backbone parameters under their saved names (see the module docstring)."""
    config = model.config
    state: dict[str, nn.Parameter] = {}
    if config.train_vision_blocks:
        unused = _unused_vision_parameters(model.vision_encoder)
        params = {k: p for k, p in model.vision_encoder.named_parameters() if k not in unused}
        if config.train_vision_blocks < 0:
            state.update({f"vision_encoder.{k}": p for k, p in params.items()})
        else:
            blocks = [
                (prefix, b)
                for prefix, b in vision_blocks(model.vision_encoder)
                if any(k.startswith(prefix + ".") for k in params)
            ]
            for prefix, _ in blocks[-config.train_vision_blocks :]:
                state.update({f"vision_encoder.{k}": p for k, p in params.items() if k.startswith(prefix + ".")})
    layers = _inner_layers(model)
    first_trained = len(layers) - config.train_lm_layers
    for i, layer in enumerate(layers):
        for k, p in layer.named_parameters():
            if LORA_MARKER in k and config.lora_rank:
                state[f"lora.{i}.{k}"] = p
            elif i >= first_trained and config.train_lm_layers:
                state[f"lm_layers.{i}.{k}"] = p
    return state


def lora_dropouts(model) -> list[nn.Module]:
    """The LoRA adapters' dropout modules (they follow ``model.train(mode)``; the LM around them stays in eval)."""
    if not model.config.lora_rank:
        return []
    return [m for layer in _inner_layers(model) for name, m in layer.named_modules() if name.endswith("lora_dropout")]


def _lora_config(model):
    from peft import LoraConfig

    config = model.config
    targets = list(config.lora_target_modules)
    if not targets:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        model_type = model.lm.config.get_text_config().model_type
        if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            raise ValueError(
                f"peft has no default LoRA target modules for a {model_type!r} LM: set lora_target_modules"
            )
        targets = list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    return LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=targets
    )


def _inject_lora(model) -> None:
    """LoRA adapters on every decoder layer of the LM (once): peft replaces the target linears in place."""
    try:
        from peft import inject_adapter_in_model
    except ImportError as e:
        raise ImportError("LoRA adapters need peft: pip install 'flamingo-vlm[peft]'") from e
    lora = _lora_config(model)
    for layer in _inner_layers(model):
        if any(LORA_MARKER in k for k, _ in layer.named_parameters()):
            continue
        try:
            inject_adapter_in_model(lora, layer)
        except ValueError as e:  # no module of the layer matches the targets
            raise ValueError(f"LoRA: {e} (lora_target_modules={list(lora.target_modules)})") from e


def set_image_size(encoder: nn.Module, image_size: int) -> None:
    """Run a transformers CLIP/SigLIP encoder at ``image_size`` (pixels per side), its position embeddings
    interpolated per forward; its ``preprocessing`` (and so the processor built from it) uses the new size."""
    hf = getattr(encoder, "model", None)
    config = getattr(hf, "config", None)
    if encoder.vision_type not in ("clip", "siglip") or config is None:
        raise ValueError(
            f"vision_image_size: only transformers CLIP/SigLIP encoders interpolate position embeddings, not {encoder.vision_type!r}"
        )
    patch = int(config.patch_size)
    if image_size < patch or image_size % patch:
        raise ValueError(f"vision_image_size={image_size} must be a multiple of the encoder's patch size {patch}")
    old = encoder.preprocessing
    resize = None if old.resize_size is None else round(old.resize_size * image_size / old.image_size)
    encoder.preprocessing = dataclasses.replace(old, image_size=image_size, resize_size=resize)
    encoder.interpolate_pos_encoding = image_size != int(config.image_size)


def apply_backbone_training(model) -> None:
    """Make the model match its config: LoRA adapters injected, the named backbone weights trainable, the
    encoder at ``vision_image_size``. Idempotent; called by FlamingoModel's constructor."""
    config = model.config
    if config.lora_rank:
        _inject_lora(model)
    if config.vision_image_size is not None:
        spatial = getattr(model.resampler, "spatial_embeddings", None)
        encoder = model.vision_encoder
        if spatial is not None and hasattr(
            getattr(encoder, "model", None), "config"
        ):  # checked before anything changes
            patch = int(encoder.model.config.patch_size)
            features = (config.vision_image_size // patch) ** 2 + int(
                encoder.vision_type == "clip" and not encoder.drop_cls
            )
            if spatial.shape[0] != features:
                raise ValueError(
                    f"vision_image_size={config.vision_image_size} gives {features} features per image, but the resampler has "
                    f"{spatial.shape[0]} learned spatial positions (resampler_spatial_positions): keep the encoder's size"
                )
        set_image_size(encoder, config.vision_image_size)
    for p in backbone_state(model).values():
        p.requires_grad_(True)


def merge_lora(model) -> None:
    """Fold every LoRA adapter into its base weight (W + scale * B A), in place; the adapters then add nothing.

    For inference speed. The model keeps its LoRA modules (their ``merged`` flag set), so its weights
    are no longer the LM checkpoint's: save the LoRA-trained model before merging."""
    for layer in _inner_layers(model):
        for module in layer.modules():
            if hasattr(module, "merge") and hasattr(module, "lora_A"):
                module.merge()


__all__ = [
    "apply_backbone_training",
    "backbone_state",
    "lora_dropouts",
    "merge_lora",
    "set_image_size",
    "vision_blocks",
]
