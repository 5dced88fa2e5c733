"""Build a Flamingo model and its processor from backbones (objects, local paths or hub names)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .config import FlamingoConfig
from .modeling.backbones import load_lm, local_path
from .modeling.flamingo import FlamingoModel
from .modeling.vision import load_vision_encoder
from .processing import PROCESSOR_CONFIG_NAME, FlamingoProcessor, ImageTransform, add_special_tokens


def _load_tokenizer(tokenizer: Any, lm_path: Any):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    source = tokenizer if tokenizer is not None else lm_path
    if source is None:
        raise ValueError("no tokenizer given and the LM was passed as an object: pass tokenizer=")
    return AutoTokenizer.from_pretrained(source)


def build_flamingo(
    lm: Any,
    vision: Any,
    tokenizer: Any = None,
    *,
    lm_kwargs: dict[str, Any] | None = None,
    vision_kwargs: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> tuple[FlamingoModel, FlamingoProcessor]:
    """A new Flamingo model (bridge freshly initialised) and its processor.

    lm: an ``AutoModelForCausalLM`` object, local path or hub name. vision: a CLIP/SigLIP vision model,
    a path, a hub/open_clip/timm name (with ``vision_type=``), or a :class:`VisionEncoder`.
    tokenizer: object or path (default: the LM's path). ``config_overrides``: any FlamingoConfig field.
    """
    lm_path = lm if isinstance(lm, (str, os.PathLike)) else getattr(lm, "name_or_path", None) or None
    lm_model = load_lm(lm, **(lm_kwargs or {}))
    tokenizer = _load_tokenizer(tokenizer, lm_path)
    requested = FlamingoConfig(**config_overrides)  # the caller's choices; what the backbones decide is set below
    encoder = load_vision_encoder(
        vision, requested.vision_type if "vision_type" in config_overrides else None, feature_layer=requested.vision_feature_layer,
        post_norm=requested.vision_post_norm, keep_cls=requested.vision_keep_cls, **(vision_kwargs or {}),
    )
    new_token_ids = add_special_tokens(
        tokenizer, media_token=requested.media_token, end_of_chunk_token=requested.end_of_chunk_token, pad_token=requested.pad_token
    )
    config = dataclasses.replace(
        requested,
        vision_type=encoder.vision_type,
        lm_name_or_path=local_path(str(lm_path)) if lm_path else None,
        vision_name_or_path=local_path(encoder.name_or_path),
        new_token_ids=new_token_ids,
        media_token_id=tokenizer.convert_tokens_to_ids(requested.media_token),
        end_of_chunk_token_id=tokenizer.convert_tokens_to_ids(requested.end_of_chunk_token),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = FlamingoModel(config, lm_model, encoder)
    model._set_trainable()
    processor = FlamingoProcessor(
        tokenizer, ImageTransform.for_encoder(encoder), media_token=config.media_token, end_of_chunk_token=config.end_of_chunk_token
    )
    return model, processor


def load_flamingo(directory: str | os.PathLike, *, lm: Any = None, vision: Any = None, tokenizer: Any = None, **kwargs: Any) -> tuple[FlamingoModel, FlamingoProcessor]:
    """A saved Flamingo model and its processor (saved beside it, or rebuilt from the LM's tokenizer).

    ``kwargs`` go to :meth:`FlamingoModel.from_pretrained` (``lm_kwargs``, ``vision_kwargs``, and ``check_lm=False``
    to load the bridge onto an LM other than the one it was saved with).
    """
    model = FlamingoModel.from_pretrained(directory, lm=lm, vision=vision, **kwargs)
    config = model.config
    if tokenizer is None and os.path.isfile(os.path.join(directory, PROCESSOR_CONFIG_NAME)):
        processor = FlamingoProcessor.from_pretrained(directory)
    else:
        tok = _load_tokenizer(tokenizer, config.lm_name_or_path)
        add_special_tokens(tok, media_token=config.media_token, end_of_chunk_token=config.end_of_chunk_token, pad_token=config.pad_token)
        processor = FlamingoProcessor(
            tok, ImageTransform.for_encoder(model.vision_encoder), media_token=config.media_token,
            end_of_chunk_token=config.end_of_chunk_token, media_wrapper_token=config.media_wrapper_token,
        )
    if processor.media_token_id != config.media_token_id or processor.end_of_chunk_token_id != config.end_of_chunk_token_id:
        raise ValueError(
            f"the tokenizer's special token ids ({processor.media_token_id}, {processor.end_of_chunk_token_id}) differ from "
            f"the model's ({config.media_token_id}, {config.end_of_chunk_token_id}): wrong tokenizer for this checkpoint"
        )
    return model, processor
