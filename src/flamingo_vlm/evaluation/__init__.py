"""Few-shot evaluation on the standard benchmarks, in their official formats (Flamingo, appendix B).

    from flamingo_vlm.evaluation import CocoCaptioning, VQATask, evaluate, format_results_table
    tasks = [CocoCaptioning("coco", "dataset_coco.json", "coco/"), VQATask("vqav2", ...)]
    results = evaluate(model, processor, tasks, shots=[0, 4, 8], seeds=[0, 1, 2], results_path="eval.json")
    print(format_results_table(results))

See docs/evaluation.md for the tasks, file formats, prompts, metrics and the ``flamingo eval`` config.
"""

from ..inference import MediaEncoder, candidate_log_likelihoods, continuation_token_ids, encode_prompts, generate_texts, load_video, rank_scores
from .metrics import bleu4, cider, exact_match_accuracy, ptb_tokenize, roc_auc, top_k_accuracy, vqa_accuracy, vqa_normalize
from .prompts import build_prompt
from .protocol import PROTOCOLS, Protocol, get_protocol
from .runner import evaluate, format_results_table, summarize
from .shots import RICES, ShotPool, sample_random_shots, shot_permutations
from .task import TASK_TYPES, Example, Prediction, Task, build_task, register_task
from .tasks import (
    OKVQA,
    Captioning,
    Classification,
    CocoCaptioning,
    Flickr30KCaptioning,
    HatefulMemes,
    TextVQA,
    VideoCaptioning,
    VideoQA,
    VizWiz,
    VQATask,
)

__all__ = [
    "OKVQA", "PROTOCOLS", "Protocol", "RICES", "TASK_TYPES", "Captioning", "Classification", "CocoCaptioning", "Example", "Flickr30KCaptioning",
    "HatefulMemes", "MediaEncoder", "Prediction", "Task", "TextVQA", "VQATask", "VideoCaptioning", "VideoQA", "VizWiz",
    "bleu4", "build_prompt", "build_task", "candidate_log_likelihoods", "cider", "continuation_token_ids",
    "encode_prompts", "evaluate", "exact_match_accuracy", "format_results_table", "generate_texts", "get_protocol", "load_video",
    "ptb_tokenize", "rank_scores", "register_task", "roc_auc", "sample_random_shots", "ShotPool", "shot_permutations", "summarize",
    "top_k_accuracy", "vqa_accuracy", "vqa_normalize",
]
