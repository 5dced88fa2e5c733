from .flamingo import FlamingoModel, FlamingoOutput
from .resampler import PerceiverResampler
from .vision import ImagePreprocessing, VisionEncoder, load_vision_encoder
from .xattn import GatedCrossAttentionBlock

__all__ = ["FlamingoModel", "FlamingoOutput", "PerceiverResampler", "ImagePreprocessing", "VisionEncoder", "load_vision_encoder", "GatedCrossAttentionBlock"]
