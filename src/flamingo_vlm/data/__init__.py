"""Training data: readers for image-text pairs, interleaved documents (MMC4, OBELICS) and videos,
the paper's text layout and loss masking, and resumable streaming of a dataset mixture."""

from .images import ImageFilter
from .instruct import InstructFormat
from .interleaved import InterleavedBuilder, MMC4Format, ObelicsFormat
from .labels import IGNORE_INDEX, collate, make_labels
from .mixture import DEFAULT_MAX_TOKENS, FORMATS, Mixture, dataset_shards, make_format
from .pairs import PairsFormat
from .samples import SKIP_REASONS, Sample, SkipSample
from .sources import JsonlSource, ParquetSource, ShardError, TarSource, expand_paths
from .stream import DatasetStream, Lane, LaneState, StreamSpec, default_lanes
from .text import TokenLayout
from .video import VideoFormat, decode_video

__all__ = [
    "DEFAULT_MAX_TOKENS", "FORMATS", "IGNORE_INDEX", "SKIP_REASONS",
    "DatasetStream", "ImageFilter", "InstructFormat", "InterleavedBuilder", "JsonlSource", "Lane", "LaneState", "MMC4Format", "Mixture",
    "ObelicsFormat", "PairsFormat", "ParquetSource", "Sample", "ShardError", "SkipSample", "StreamSpec", "TarSource",
    "TokenLayout", "VideoFormat", "collate", "dataset_shards", "decode_video", "default_lanes", "expand_paths",
    "make_format", "make_labels",
]
