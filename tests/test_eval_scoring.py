"""Close-ended scoring from the prompt's KV cache equals one-at-a-time and uncached scoring; batched
generation equals per-prompt generation; each medium is encoded once."""

import pytest
import torch

from helpers import BLUE, GREEN, RED, WHITE, build, image, open_gates
from eval_fixtures import one_torch_thread  # noqa: F401  (autouse: one torch thread for these tests)
from flamingo_vlm.evaluation import MediaEncoder, candidate_log_likelihoods, continuation_token_ids, generate_texts, rank_scores

EOC = "<|endofchunk|>"


def _prompts():
    red, green, blue, white = image(RED), image(GREEN), image(BLUE), image(WHITE)
    prompts = [
        [red, f"Output: a red circle.{EOC}", blue, f"Output: a blue square.{EOC}", white, "Output:"],  # long, 3 media
        [green, "Question: what colour? Answer:"],  # short: left-padded in the batch
        ["the dog runs.", red, "Output:"],  # text before the first image
    ]
    continuations = [
        [f" white{EOC}", f" a small yellow triangle{EOC}", " x"],  # 1-token and long candidates
        [" green", f" two cats sit on the mat{EOC}"],
        [f" red{EOC}", f" the quick brown fox jumps over the lazy dog{EOC}", " red", f" a blue square.{EOC}"],
    ]
    return prompts, continuations


def _uncached_log_likelihood(model, processor, prompt, continuation):
    """Reference: one unpadded forward over prompt + candidate through model.forward, no cache."""
    batch = processor(prompt)
    tokens = continuation_token_ids(processor.tokenizer, prompt[-1], [continuation])[0]
    ids = torch.cat([batch["input_ids"], torch.tensor([tokens])], dim=1)
    with torch.no_grad():
        logprobs = model(ids, pixel_values=batch["pixel_values"]).logits[0].float().log_softmax(-1)
    start = batch["input_ids"].shape[1] - 1
    return sum(float(logprobs[start + i, t]) for i, t in enumerate(tokens)), len(tokens)


@pytest.mark.parametrize("lm_type", ["llama", "gpt2", "opt", "gpt_neox", "qwen2", "mistral"])  # rotary, learned absolute, OPT offset positions
def test_batched_scoring_equals_one_at_a_time_and_uncached(lm_type):
    model, processor = build(lm_type)
    open_gates(model, 0.7)  # the images really change the scores
    prompts, continuations = _prompts()
    batched = candidate_log_likelihoods(model, processor, prompts, continuations, max_rows=3)  # several row chunks
    for prompt, conts, (total, count) in zip(prompts, continuations, batched):
        alone_total, alone_count = candidate_log_likelihoods(model, processor, [prompt], [conts])[0]
        torch.testing.assert_close(total, alone_total, atol=1e-4, rtol=1e-5)
        assert torch.equal(count, alone_count)
        for c, got, n in zip(conts, total.tolist(), count.tolist()):
            expected, expected_n = _uncached_log_likelihood(model, processor, prompt, c)
            assert n == expected_n
            assert got == pytest.approx(expected, abs=1e-4)


def test_scores_depend_on_the_image_and_normalisation():
    model, processor = build("llama")
    open_gates(model, 1.0)
    conts = [[f" red{EOC}", f" a blue square{EOC}"]]
    (a, n), = candidate_log_likelihoods(model, processor, [[image(RED), "Output:"]], conts)
    (b, _), = candidate_log_likelihoods(model, processor, [[image(WHITE), "Output:"]], conts)
    assert not torch.allclose(a, b)
    mean, total = rank_scores([(a, n)], True)[0], rank_scores([(a, n)], False)[0]
    torch.testing.assert_close(mean, a / n)
    torch.testing.assert_close(total, a)
    assert n.tolist()[1] > n.tolist()[0]


def test_continuation_tokens_follow_the_context():
    _, processor = build("llama")
    tok = processor.tokenizer
    ids = continuation_token_ids(tok, "Output:", [" red circle", f" red{EOC}"])
    assert ids[0] == tok("Output: red circle", add_special_tokens=False)["input_ids"][len(tok("Output:", add_special_tokens=False)["input_ids"]):]
    assert ids[1][-1] == tok.convert_tokens_to_ids(EOC)


def test_batched_generation_equals_one_at_a_time():
    model, processor = build("llama")
    open_gates(model, 0.7)
    prompts, _ = _prompts()
    kw = dict(max_new_tokens=6, num_beams=3)
    batched = generate_texts(model, processor, prompts, **kw)
    alone = [generate_texts(model, processor, [p], **kw)[0] for p in prompts]
    assert batched == alone
    assert all(isinstance(t, str) and EOC not in t for t in batched)


def test_each_medium_is_encoded_once():
    model, processor = build("llama")
    media = MediaEncoder(model, processor)
    red, blue = image(RED), image(BLUE)
    seen = []
    handle = model.vision_encoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    prompts = [[red, f"Output: red{EOC}", blue, "Output:"], [blue, f"Output: blue{EOC}", red, "Output:"]]
    generate_texts(model, processor, prompts, media=media, max_new_tokens=3, num_beams=3)
    candidate_log_likelihoods(model, processor, prompts, [[" red", " blue"]] * 2, media=media)
    handle.remove()
    assert seen == [2]  # two distinct images, one encoder call, for two prompts, beams and scoring
    # and the cached visual tokens are those the model computes from pixels
    tokens = media.visual_tokens([red, blue])
    pixels = processor([red, "x", blue])["pixel_values"]
    torch.testing.assert_close(tokens, model.encode_media(pixels), atol=1e-5, rtol=1e-5)
