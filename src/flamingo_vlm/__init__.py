"""flamingo-vlm: Flamingo (Alayrac et al., 2022) on any Hugging Face causal LM."""

import transformers as _transformers

from ._requirements import check_transformers

check_transformers(_transformers.__version__)

from .builder import build_flamingo, load_flamingo
from .config import FlamingoConfig
from .inference import few_shot
from .modeling import FlamingoModel, FlamingoOutput, GatedCrossAttentionBlock, PerceiverResampler, VisionEncoder, load_vision_encoder
from .processing import FlamingoProcessor, ImageTransform, Video, add_special_tokens

__version__ = "0.1.0"

__all__ = [
    "build_flamingo",
    "load_flamingo",
    "FlamingoConfig",
    "FlamingoModel",
    "FlamingoOutput",
    "FlamingoProcessor",
    "GatedCrossAttentionBlock",
    "ImageTransform",
    "PerceiverResampler",
    "Video",
    "VisionEncoder",
    "add_special_tokens",
    "few_shot",
    "load_vision_encoder",
]
