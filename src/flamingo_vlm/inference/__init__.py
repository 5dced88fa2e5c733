"""Inference on interleaved prompts, shared by evaluation and serving.

    media = MediaEncoder(model, processor)                        # each distinct medium encoded once
    texts = generate_texts(model, processor, prompts, media=media, num_beams=3)
    scores = candidate_log_likelihoods(model, processor, prompts, candidates, media=media)

A prompt is a list of interleaved items (text, PIL images, paths, :class:`~flamingo_vlm.Video`). A prompt
batch (:func:`encode_prompts`) holds its media's visual tokens and each block's keys/values once, for
every forward, decoding step, beam and candidate computed on it.
"""

from .few_shot import few_shot, few_shot_prompt
from .generation import generate_texts
from .media import MediaEncoder, load_video
from .prompts import PromptBatch, encode_prompts
from .scoring import candidate_log_likelihoods, continuation_token_ids, rank_scores

__all__ = [
    "MediaEncoder", "PromptBatch", "candidate_log_likelihoods", "continuation_token_ids", "encode_prompts",
    "few_shot", "few_shot_prompt", "generate_texts", "load_video", "rank_scores",
]
