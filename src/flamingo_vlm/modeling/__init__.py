from .context import MediaContext, MediaKV
from .flamingo import FlamingoModel, FlamingoOutput
from .loss import IGNORE_INDEX, causal_lm_loss
from .resampler import PerceiverResampler
from .vision import ImagePreprocessing, VisionEncoder, load_vision_encoder
from .xattn import GatedCrossAttentionBlock

__all__ = [
    "IGNORE_INDEX", "FlamingoModel", "FlamingoOutput", "GatedCrossAttentionBlock", "ImagePreprocessing", "MediaContext",
    "MediaKV", "PerceiverResampler", "VisionEncoder", "causal_lm_loss", "load_vision_encoder",
]
