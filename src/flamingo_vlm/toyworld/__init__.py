"""The built-in toy world: a procedural multimodal world, its own backbones, and ``flamingo demo``."""

from .cache import ensure_toyworld
from .generate import WorldSizes, generate_world

__all__ = ["ensure_toyworld", "generate_world", "WorldSizes"]
