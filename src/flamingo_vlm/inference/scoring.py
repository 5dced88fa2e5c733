"""Close-ended scoring: the log-likelihood of candidate answers after a prompt, all candidates at once.

Each prompt runs through the model once, keeping the LM's KV cache; the cache rows are then gathered,
one per (prompt, candidate), and every candidate's tokens run in one padded batch from there:

    prompts [B, Lp] (left-padded)  --forward, use_cache-->  cache [B, ...] + next-token log-probs [B, V]
    candidates [R, Lc] (right-padded) + cache rows gathered [R, ...]  -->  log-probs of each candidate token

Exact with padding: positions count real tokens only (as unpadded); candidate padding sits after every
real token, so causal attention never reads it; each candidate token's cross-attention is routed over
the whole row (prompt + candidate), so it sees the prompt's last image as it would unbatched.
"""

from __future__ import annotations

import copy

import torch

from ..modeling.lm import padded_position_ids
from .media import MediaEncoder
from .prompts import encode_prompts


def continuation_token_ids(tokenizer, context: str, continuations: list[str], *, alone: bool = False) -> list[list[int]]:
    """The tokens of each continuation as they follow ``context``.

    As lm-evaluation-harness does: tokenise ``context + continuation`` and drop the context's tokens,
    so a merge at the boundary is tokenised as in running text; if the context's tokens are not a prefix
    (a token spans the boundary), the continuation is tokenised alone. ``alone``: always tokenise the
    continuation by itself (OpenFlamingo's rank classification appends these ids to the prompt's).
    ``tokenizer``: a tokenizer, or a processor's :meth:`~flamingo_vlm.FlamingoProcessor.tokenize`.
    """
    if alone:
        context = ""
    base = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    joined = tokenizer([context + c for c in continuations], add_special_tokens=False)["input_ids"]
    out = []
    for c, ids in zip(continuations, joined):
        if ids[: len(base)] == base and len(ids) > len(base):
            out.append(ids[len(base) :])
        else:
            out.append(tokenizer(c, add_special_tokens=False)["input_ids"])
        if not out[-1]:
            raise ValueError(f"candidate continuation {c!r} has no tokens")
    return out


def select_cache_rows(cache, index: torch.Tensor):
    """A new cache holding rows ``index`` of ``cache`` (which is left untouched)."""
    rows = copy.copy(cache)
    rows.layers = [copy.copy(layer) for layer in cache.layers]  # the layers re-assign, never mutate, their tensors
    rows.batch_select_indices(index)
    return rows


@torch.no_grad()
def candidate_log_likelihoods(
    model,
    processor,
    prompts: list[list],
    continuations: list[list[str]],
    *,
    media: MediaEncoder | None = None,
    num_frames: int = 8,
    max_rows: int = 64,
    tokenize_alone: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each prompt b (interleaved items) and its continuation texts: (summed log-prob [C_b], token count [C_b]).

    The prompt is computed once; all (prompt, candidate) rows are scored from its cache, ``max_rows`` at a time.
    tokenize_alone: each continuation is tokenised by itself, not as it follows the prompt's text.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} candidate lists")
    media = media or MediaEncoder(model, processor)
    batch = encode_prompts(processor, prompts, media, num_frames=num_frames)
    tokens = [continuation_token_ids(processor.tokenize, tail, conts, alone=tokenize_alone) for tail, conts in zip(batch.tails, continuations)]
    device = batch.input_ids.device

    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, visual_tokens=batch.visual_tokens,
        media_kv=batch.media_kv, use_cache=True, logits_to_keep=1,  # only the last position predicts a candidate token
    )
    next_logprobs = out.logits[:, -1].float().log_softmax(-1)  # [B, V]
    cache = out.cache

    rows = [(b, t) for b, cand in enumerate(tokens) for t in cand]
    prompt_of = torch.tensor([b for b, _ in rows], device=device)
    totals = next_logprobs[prompt_of, torch.tensor([t[0] for _, t in rows], device=device)]
    lengths = torch.tensor([len(t) for _, t in rows], device=device)

    longer = sorted((r for r, (_, t) in enumerate(rows) if len(t) > 1), key=lambda r: -len(rows[r][1]))
    if longer:
        pad = model.config.pad_token_id
        for start in range(0, len(longer), max_rows):
            chunk = longer[start : start + max_rows]
            index = prompt_of[chunk]
            width = len(rows[chunk[0]][1]) - 1  # sorted by length: the first is the longest
            inputs = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)
            targets = torch.zeros_like(inputs)
            valid = torch.zeros_like(inputs)
            for j, r in enumerate(chunk):  # one row per candidate (not per token): fills the padded batch
                t = torch.tensor(rows[r][1], device=device)
                inputs[j, : len(t) - 1], targets[j, : len(t) - 1], valid[j, : len(t) - 1] = t[:-1], t[1:], 1
            mask = torch.cat([batch.attention_mask[index], valid], dim=1)
            context = model.media_context(
                torch.cat([batch.input_ids[index], inputs], dim=1), batch.visual_tokens,
                media_kv=batch.media_kv, media_offsets=batch.media_offsets[index], last_positions=width,
            )
            logits = model.lm(
                input_ids=inputs, attention_mask=mask, position_ids=padded_position_ids(mask, width),
                cache=select_cache_rows(cache, index), use_cache=True, flamingo_context=context,
            ).logits
            logprobs = logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
            totals[chunk] += (logprobs * valid).sum(-1)

    sizes = [len(c) for c in tokens]
    return list(zip(totals.cpu().split(sizes), lengths.cpu().split(sizes)))


def rank_scores(log_likelihoods: list[tuple[torch.Tensor, torch.Tensor]], length_normalize: bool = True) -> list[torch.Tensor]:
    """(summed log-prob, token count) -> per-candidate scores: the mean token log-prob, or the sum."""
    return [total / count if length_normalize else total for total, count in log_likelihoods]
