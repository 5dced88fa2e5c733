"""Every row of a batch gets the answer it would get alone, and an image never changes what comes before it.

Properties over random layouts (rows with 0..3 images, text before the first image or not, ``<|endofchunk|>``
and EOS inside rows, left and right padding) with random, non-zero gates, so the whole bridge contributes:
forward logits, greedy and beam tokens, candidate log-likelihoods and continuation from a KV cache.
"""

from __future__ import annotations

import random

import pytest
import torch

from flamingo_vlm.inference import candidate_log_likelihoods
from helpers import build, image

LM_TYPES = ["llama", "gpt2", "opt"]
WORDS = "a red circle blue square two cats sit on the mat dog runs Output: Question: what colour Answer: green".split()
ATOL = 1e-5


def randomise_gates(model, rng: random.Random) -> None:
    """Non-zero gates of both signs (tanh(alpha) in about [-0.76, 0.76]), none near 0."""
    with torch.no_grad():
        for block in model.xattn_blocks:
            for gate in (block.attn_gate, block.ff_gate):
                gate.fill_(rng.choice([-1, 1]) * rng.uniform(0.3, 1.0))


def random_text(rng: random.Random, min_words: int = 1, max_words: int = 5) -> str:
    return " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))


def random_row(rng: random.Random, eos: str, max_images: int = 3) -> list:
    """Interleaved items: optional text, then chunks of (image, text, maybe <|endofchunk|> / EOS), ending in
    at least 3 words of text (so a tail without images can be split off for the cache test)."""
    row: list = []
    if rng.random() < 0.5:
        row.append(random_text(rng))
    for _ in range(rng.randint(0, max_images)):
        colour = tuple(rng.randrange(256) for _ in range(3))
        row.append(image(colour, size=(rng.randint(20, 48), rng.randint(20, 48))))
        text = random_text(rng)
        if rng.random() < 0.5:
            text += "<|endofchunk|>"
        if rng.random() < 0.3:
            text += eos
        row.append(text)
    row.append(random_text(rng, 3, 6))
    return row


def setup(lm_type: str, seed: int, **config):
    rng = random.Random(seed)
    model, processor = build(lm_type, seed=seed, **config)
    randomise_gates(model, rng)
    rows = [random_row(rng, processor.tokenizer.eos_token) for _ in range(4)]
    rows[0] = [x for x in rows[0] if isinstance(x, str)]  # always a row without any image
    rng.shuffle(rows)
    return model, processor, rows, rng


def real_positions(mask_row: torch.Tensor) -> torch.Tensor:
    return mask_row.nonzero().squeeze(1)


CASES = [(lm, seed, side) for lm in LM_TYPES for seed, side in ((0, "left"), (1, "right"), (2, "left"))]


@pytest.mark.parametrize("lm_type,seed,padding_side", CASES)
@pytest.mark.parametrize("reset_media_at_eos", [False, True])
def test_forward_row_equals_row_alone(lm_type, seed, padding_side, reset_media_at_eos):
    model, processor, rows, _ = setup(lm_type, seed, reset_media_at_eos=reset_media_at_eos)
    batch = processor(rows, padding_side=padding_side)
    with torch.no_grad():
        logits = model(**batch).logits
        for b, row in enumerate(rows):
            alone = model(**processor([row])).logits[0]
            together = logits[b, real_positions(batch["attention_mask"][b])]
            torch.testing.assert_close(together, alone, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("lm_type", LM_TYPES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_row_equals_row_alone(lm_type, num_beams):
    model, processor, rows, _ = setup(lm_type, seed=3 + num_beams)
    kw = dict(max_new_tokens=5, num_beams=num_beams, do_sample=False, return_dict_in_generate=True, output_scores=True)
    batch = processor(rows, padding_side="left")
    together = model.generate(**batch, **kw)
    width = batch["input_ids"].shape[1]
    stops = torch.tensor([model.config.end_of_chunk_token_id, model.config.eos_token_id, model.config.pad_token_id])
    for b, row in enumerate(rows):
        single = processor([row])
        alone = model.generate(**single, **kw)
        new_alone = alone.sequences[0, single["input_ids"].shape[1] :]
        new_together = together.sequences[b, width : width + len(new_alone)]
        # after a row stops, the batch pads it: compare up to and including its first stop token
        end = int(torch.isin(new_alone, stops).int().argmax()) + 1 if torch.isin(new_alone, stops).any() else len(new_alone)
        assert new_together[:end].tolist() == new_alone[:end].tolist()
        if num_beams == 1:
            for step in range(end):
                torch.testing.assert_close(together.scores[step][b], alone.scores[step][0], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("lm_type", LM_TYPES)
def test_candidate_log_likelihoods_row_equals_row_alone(lm_type):
    model, processor, rows, rng = setup(lm_type, seed=7)
    candidates = [[random_text(rng, 1, 3) for _ in range(rng.randint(1, 3))] + ["<|endofchunk|>"] for _ in rows]
    together = candidate_log_likelihoods(model, processor, rows, candidates)
    for row, cands, (total, count) in zip(rows, candidates, together):
        ((total_alone, count_alone),) = candidate_log_likelihoods(model, processor, [row], [cands])
        assert torch.equal(count, count_alone)
        torch.testing.assert_close(total, total_alone, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("lm_type", LM_TYPES)
def test_continuation_from_cache_equals_row_alone(lm_type):
    """A left-padded batch's prefix runs with use_cache; its last k tokens then continue from the cache."""
    model, processor, rows, _ = setup(lm_type, seed=11)
    k = 2  # every row ends in >= 3 words of text: its last 2 tokens hold no image
    batch = processor(rows, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        visual = model.encode_media(batch["pixel_values"])
        prefix = model(ids[:, :-k], mask[:, :-k], visual_tokens=visual, use_cache=True)
        cont = model(ids[:, -k:], mask, visual_tokens=visual, past_input_ids=ids[:, :-k], cache=prefix.cache).logits
        for b, row in enumerate(rows):
            alone = model(**processor([row])).logits[0, -k:]
            torch.testing.assert_close(cont[b], alone, atol=ATOL, rtol=ATOL)


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if len(diff) else n


@pytest.mark.parametrize("lm_type", LM_TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_an_image_changes_nothing_before_its_token(lm_type, seed):
    """Changing an image, or adding one, never changes the logits before its ``<image>`` token."""
    model, processor, rows, rng = setup(lm_type, seed=20 + seed)
    media_id = model.config.media_token_id
    checked = changed = 0
    for row in rows:
        base = processor([row])
        with torch.no_grad():
            base_logits = model(**base).logits[0]
        variants = []  # (items, item index of the added or changed image)
        at = rng.randint(0, len(row))  # add an image between two items
        variants.append((row[:at] + [image((9, 99, 199))] + row[at:], at))
        images = [i for i, x in enumerate(row) if not isinstance(x, str)]
        if images:  # change one image
            i = rng.choice(images)
            variants.append((row[:i] + [image((255 - row[i].getpixel((0, 0))[0], 17, 230))] + row[i + 1 :], i))
        for n, (variant, item) in enumerate(variants):
            other = processor([variant])
            ids = other["input_ids"][0]
            k = sum(not isinstance(x, str) for x in variant[:item])  # the image is the row's k-th medium
            image_position = int((ids == media_id).nonzero()[k])
            # text split by an added image may tokenise differently at the split: compare up to there too
            first = min(image_position, _first_difference(base["input_ids"][0], ids))
            with torch.no_grad():
                other_logits = model(**other).logits[0]
            torch.testing.assert_close(other_logits[:first], base_logits[:first], atol=ATOL, rtol=ATOL)
            checked += first
            if n == 1:  # not vacuous: the changed image does change the logits from its token on
                changed += 1
                assert not torch.allclose(other_logits[first:], base_logits[first:], atol=1e-4)
    assert checked > 0 and changed > 0
