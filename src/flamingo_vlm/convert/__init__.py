"""Converters between flamingo_vlm models and other Flamingo implementations' checkpoints."""

from .clip_vision import clip_vision_from_open_clip, open_clip_to_clip_vision_state
from .idefics import convert_idefics, export_idefics, load_idefics
from .openflamingo import (
    ConversionReport,
    add_openflamingo_tokens,
    export_openflamingo,
    inspect_checkpoint,
    load_openflamingo,
    load_openflamingo_weights,
    read_openflamingo_checkpoint,
)

__all__ = [
    "ConversionReport",
    "add_openflamingo_tokens",
    "clip_vision_from_open_clip",
    "convert_idefics",
    "export_idefics",
    "export_openflamingo",
    "inspect_checkpoint",
    "load_idefics",
    "load_openflamingo",
    "load_openflamingo_weights",
    "open_clip_to_clip_vision_state",
    "read_openflamingo_checkpoint",
]
