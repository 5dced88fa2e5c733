"""Preprocessing, one of each: the image decoder and transform (:mod:`.images`), the video frame sampler
(:mod:`.video`), the label rule (:mod:`.labels`), and the processor that turns interleaved text and
media into model inputs (:mod:`.processor`).

Sits above ``modeling`` (it reads an encoder's :class:`~flamingo_vlm.modeling.vision.ImagePreprocessing`)
and below ``data`` / ``inference``, which decode through it.
"""

from .images import ImageDecodeError, ImageTooLarge, ImageTransform, decode_image, load_image, open_image
from .labels import make_labels
from .processor import PROCESSOR_CONFIG_NAME, FlamingoProcessor, Video, add_special_tokens, stack_media
from .video import VIDEO_EXTENSIONS, VIDEO_SUFFIXES, VideoDecodeError, frame_indices, is_video_path, load_video, rgb_images

__all__ = [
    "PROCESSOR_CONFIG_NAME", "VIDEO_EXTENSIONS", "VIDEO_SUFFIXES", "FlamingoProcessor", "ImageDecodeError", "ImageTooLarge",
    "ImageTransform", "Video", "VideoDecodeError", "add_special_tokens", "decode_image", "frame_indices", "is_video_path",
    "load_image", "load_video", "make_labels", "open_image", "rgb_images", "stack_media",
]
