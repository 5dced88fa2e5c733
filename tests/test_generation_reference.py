"""model.generate against full-forward recomputation, with open gates, for the routing rules that
generation must apply to the tokens it adds: the EOS reset (reset_media_at_eos) and media_attention="all".

Reference: each row alone, unpadded, the whole sequence recomputed by model(...) at every step (no KV
cache, no media key/value cache); the forward itself is checked against the paper in
test_bridge_reference.py. Greedy: every step's logits and the argmax token. Beam search: every returned
beam's score is the sum of its tokens' log-probabilities under the recomputation (length_penalty=0).
"""

from __future__ import annotations

import pytest
import torch

from helpers import build, encode_pieces, randomize_bridge
from train_fixtures import single_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

NEW_TOKENS = 5


def make_model(lm_type: str, mode: str, reset: bool):
    model, processor = build(lm_type, seed=0, media_attention=mode, reset_media_at_eos=reset)
    randomize_bridge(model, seed=3, gate_range=(1.0, 2.0))
    return model.eval(), processor


# Prompts whose continuation depends on the rule: after "EOS" a new document starts (with the reset, the
# new tokens see no earlier image, or only the new document's); with three images before the end, "all"
# and "last" differ. Each row's media are given in the order of its <image> tokens.
PROMPTS = [
    ["IMG", "a red circle", "EOC", "EOS", "the dog"],
    ["IMG", "two cats", "EOC", "EOS", "IMG", "Output:"],
    ["IMG", "a red", "IMG", " and a blue", "IMG", "Output: a"],
]
MEDIA_PER_PROMPT = [1, 2, 3]


def prompt_batch(processor, model):
    """Left-padded input_ids / attention_mask [3, P], each row's ids unpadded, and the media [6, 3, 32, 32]."""
    rows = [encode_pieces(processor, model, p) for p in PROMPTS]
    length = max(map(len, rows))
    pad = model.config.pad_token_id
    ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(sum(MEDIA_PER_PROMPT), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return ids, mask, rows, pixels


def row_media(pixels: torch.Tensor, b: int) -> torch.Tensor:
    start = sum(MEDIA_PER_PROMPT[:b])
    return pixels[start : start + MEDIA_PER_PROMPT[b]]


def stop_ids(model) -> set[int]:
    return {model.config.end_of_chunk_token_id, model.config.eos_token_id}


def recomputed_logits(model, ids: list[int], media: torch.Tensor) -> torch.Tensor:
    """[V] next-token logits of the whole sequence, recomputed from scratch."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=media).logits[0, -1].double()


def greedy_choice(model, logits: torch.Tensor) -> int:
    """The argmax over every token but <image>, which generation never emits."""
    return int(logits.masked_fill(torch.arange(len(logits)) == model.config.media_token_id, -float("inf")).argmax())


CASES = [("llama", "last", True), ("llama", "all", False), ("llama", "all", True), ("gpt2", "all", True)]


@pytest.mark.parametrize("lm_type,mode,reset", CASES)
def test_greedy_generation_equals_stepwise_argmax_of_the_forward(lm_type, mode, reset):
    model, processor = make_model(lm_type, mode, reset)
    ids, mask, rows, pixels = prompt_batch(processor, model)
    out = model.generate(
        ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=NEW_TOKENS, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    pad, stops = model.config.pad_token_id, stop_ids(model)
    for b, prompt in enumerate(rows):
        seq, generated = list(prompt), out.sequences[b, ids.shape[1] :].tolist()
        for step, token in enumerate(generated):
            if seq[-1] in stops and len(seq) > len(prompt):
                assert token == pad, f"row {b} went on after its stop token"
                continue
            want = recomputed_logits(model, seq, row_media(pixels, b))
            torch.testing.assert_close(out.logits[step][b].double(), want, atol=2e-4, rtol=1e-4, msg=f"row {b}, step {step}")
            assert token == greedy_choice(model, want), f"row {b}, step {step}"
            seq.append(token)


@pytest.mark.parametrize("lm_type,mode,reset", CASES[:3])
def test_beam_scores_are_the_forwards_log_probabilities(lm_type, mode, reset):
    model, processor = make_model(lm_type, mode, reset)
    ids, mask, rows, pixels = prompt_batch(processor, model)
    beams = 3
    out = model.generate(
        ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=NEW_TOKENS, num_beams=beams, num_return_sequences=beams,
        length_penalty=0.0, do_sample=False, output_scores=True, return_dict_in_generate=True,
    )
    stops = stop_ids(model)
    assert out.sequences.shape[0] == len(rows) * beams
    for r in range(out.sequences.shape[0]):
        b = r // beams
        seq, total = list(rows[b]), 0.0
        for token in out.sequences[r, ids.shape[1] :].tolist():
            # transformers normalises over the whole vocabulary, then masks <image>: log_softmax of the raw logits
            logprobs = torch.log_softmax(recomputed_logits(model, seq, row_media(pixels, b)), dim=-1)
            total += float(logprobs[token])
            seq.append(token)
            if token in stops:
                break
        assert float(out.sequences_scores[r]) == pytest.approx(total, abs=1e-3), f"beam {r} of prompt {b}"


@pytest.mark.parametrize("lm_type,mode,reset", CASES)
def test_the_prompts_make_the_rule_matter(lm_type, mode, reset):
    """For each rule in force, the recomputation differs on the generated positions from the one a model
    without that rule gives (no EOS reset; "last" instead of "all"): the tests above can fail."""
    model, processor = make_model(lm_type, mode, reset)
    _, _, rows, pixels = prompt_batch(processor, model)
    continuation = encode_pieces(processor, model, [" on the mat"])
    rivals = ([(mode, False)] if reset else []) + ([("last", reset)] if mode == "all" else [])
    assert rivals
    for rival_mode, rival_reset in rivals:
        rival, _ = build(lm_type, seed=0, media_attention=rival_mode, reset_media_at_eos=rival_reset)
        rival.load_flamingo_state_dict(model.flamingo_state_dict())
        gap = 0.0
        for b, prompt in enumerate(rows):
            seq = torch.tensor([prompt + continuation])
            with torch.no_grad():
                ours = model(input_ids=seq, pixel_values=row_media(pixels, b)).logits[0, len(prompt) - 1 :]
                theirs = rival(input_ids=seq, pixel_values=row_media(pixels, b)).logits[0, len(prompt) - 1 :]
            gap = max(gap, float((ours - theirs).abs().max()))
        assert gap > 1e-2, (rival_mode, rival_reset)
