"""Built-in benchmark tasks (importing this package registers them for :func:`build_task`)."""

from .captioning import Captioning, CocoCaptioning, Flickr30KCaptioning, VideoCaptioning, read_karpathy, read_video_captions
from .classification import Classification, read_class_folder, read_list_file
from .hateful_memes import HatefulMemes, read_hateful_memes
from .video_qa import VideoQA, read_video_qa
from .vqa import OKVQA, TextVQA, VizWiz, VQATask, read_vqa

__all__ = [
    "Captioning", "Classification", "CocoCaptioning", "Flickr30KCaptioning", "HatefulMemes", "OKVQA", "TextVQA",
    "VQATask", "VideoCaptioning", "VideoQA", "VizWiz", "read_class_folder", "read_hateful_memes", "read_karpathy",
    "read_list_file", "read_video_captions", "read_video_qa", "read_vqa",
]
