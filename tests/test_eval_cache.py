"""Work done once per evaluation run: support media's visual tokens and xattn keys/values cached across
prompt batches with outputs unchanged, and shot sampling whose cost does not grow with the support set."""

import random
import time

import torch

from eval_fixtures import solid
from eval_fixtures import one_torch_thread  # noqa: F401  (autouse: one torch thread for these tests)
from helpers import build, open_gates
from flamingo_vlm.evaluation import Example, MediaEncoder, ShotPool, Task, evaluate, generate_texts, sample_random_shots

EOC = "<|endofchunk|>"


# ---- shot sampling -----------------------------------------------------------------------------------
def reference_shots(pool, n, rng, exclude_id=None):
    """The definition: every example but the query, then ``n`` of them drawn by ``random.sample``."""
    candidates = [ex for ex in pool if exclude_id is None or ex.id != exclude_id]
    return rng.sample(candidates, min(n, len(candidates)))


def test_indexed_sampling_draws_the_shots_of_the_definition():
    # small pools take random.sample's copying branch, large ones its set branch; the query anywhere,
    # absent, or present twice (a repeated id); n larger than the pool
    for size in (1, 5, 40, 300, 5000):
        examples = [Example(f"e{i}", [], {}) for i in range(size)]
        if size > 3:
            examples[size // 2] = Example("e0", [], {})  # "e0" twice
        pool = ShotPool(examples)
        for seed in range(6):
            for n in (0, 1, 4, 32, size + 3):
                for exclude in (None, "e0", f"e{size - 1}", "absent"):
                    a, b = random.Random(f"{seed}/{n}"), random.Random(f"{seed}/{n}")
                    got = pool.sample(n, a, exclude_id=exclude)
                    want = reference_shots(examples, n, b, exclude_id=exclude)
                    assert [id(x) for x in got] == [id(x) for x in want], (size, seed, n, exclude)
                    assert a.random() == b.random()  # the generator is left in the same state too
    # a plain list still works (indexed on the call)
    examples = [Example(i, [], {}) for i in range(50)]
    assert sample_random_shots(examples, 5, random.Random(3), exclude_id=7) == reference_shots(examples, 5, random.Random(3), 7)


def test_shot_sampling_over_443k_questions_is_under_a_millisecond_per_query():
    support = [Example(i, [], {}) for i in range(443_757)]  # VQAv2 train's question count
    pool = ShotPool(support)  # once per run
    queries = 300
    start = time.perf_counter()
    for q in range(queries):
        pool.sample(32, random.Random(f"0/vqav2/32/{q}"), exclude_id=q * 1000)
    per_query = (time.perf_counter() - start) / queries
    assert per_query < 1e-3, f"{per_query * 1e3:.3f} ms per query"


# ---- the media cache ---------------------------------------------------------------------------------
def _reference_tokens_and_kv(model, processor, images):
    """Visual tokens and each block's keys/values straight from the model, on the stacked pixels."""
    pixels = torch.stack([processor.media_tensor(img) for img in images])  # [M, 1, C, H, W]
    with torch.no_grad():
        tokens = model.encode_media(pixels)
        return tokens, model.media_kv(tokens)


def test_cached_tokens_and_keys_values_are_the_models():
    model, processor = build("llama")
    images = [solid(i) for i in range(5)]
    media = MediaEncoder(model, processor)
    media.visual_tokens(images[:2])  # part of them cached from an earlier batch
    media.media_kv(images[1:3])
    order = [images[3], images[0], images[3], images[2], images[4], images[1]]  # repeats, mixed cached/new
    tokens, kv = _reference_tokens_and_kv(model, processor, order)
    torch.testing.assert_close(media.visual_tokens(order), tokens, atol=1e-5, rtol=1e-5)
    got = media.media_kv(order)
    assert len(got) == len(kv) == len(model.xattn_blocks)
    for (k, v), (rk, rv) in zip(got, kv):
        torch.testing.assert_close(k, rk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, rv, atol=1e-5, rtol=1e-5)


def _count_work(model):
    """Images through the vision encoder, and media rows through block 0's key/value projection."""
    counts = {"vision": 0, "kv": 0}
    hooks = [
        model.vision_encoder.register_forward_hook(lambda m, i, o: counts.__setitem__("vision", counts["vision"] + i[0].shape[0])),
        model.xattn_blocks[0].attn.to_kv.register_forward_hook(lambda m, i, o: counts.__setitem__("kv", counts["kv"] + i[0].shape[0])),
    ]
    return counts, hooks


def _kshot_prompts(support, queries, k, seed=0):
    pool = ShotPool(support)
    prompts = []
    for q, img in enumerate(queries):
        shots = pool.sample(k, random.Random(f"{seed}/{q}"))
        items = []
        for s in shots:
            items += [s.media[0], f"Output: {s.fields['answer']}{EOC}"]
        prompts.append(items + [img, "Output:"])
    return prompts


def test_support_media_are_encoded_once_per_run_and_predictions_do_not_change():
    model, processor = build("llama")
    open_gates(model)  # the media really move the logits
    support = [Example(f"s{i}", [solid(i, size=(40 + i, 36))], {"answer": f"colour {i}"}) for i in range(8)]
    queries = [solid(i, size=(30, 30 + i)) for i in range(6)]
    prompts = _kshot_prompts(support, queries, 4)
    kw = dict(max_new_tokens=4, num_beams=2)

    cached = MediaEncoder(model, processor)
    counts, hooks = _count_work(model)
    with_cache = [t for b in range(0, 6, 2) for t in generate_texts(model, processor, prompts[b : b + 2], media=cached, **kw)]
    for h in hooks:
        h.remove()
    shown = {id(x) for p in prompts for x in p if not isinstance(x, str)}
    assert counts == {"vision": len(shown), "kv": len(shown)}  # once per distinct medium over three batches

    uncached = MediaEncoder(model, processor, cache_size=0)
    counts, hooks = _count_work(model)
    without = [t for b in range(0, 6, 2) for t in generate_texts(model, processor, prompts[b : b + 2], media=uncached, **kw)]
    for h in hooks:
        h.remove()
    per_batch = sum(len({id(x) for p in prompts[b : b + 2] for x in p if not isinstance(x, str)}) for b in range(0, 6, 2))
    assert counts["vision"] == per_batch > len(shown)  # the baseline redoes the shared support images
    assert with_cache == without
    # and both are what each prompt gets alone from a fresh encoder
    assert without == [generate_texts(model, processor, [p], **kw)[0] for p in prompts]


def test_key_value_budget_bounds_the_cache_and_keeps_outputs():
    model, processor = build("llama")
    images = [solid(i) for i in range(6)]
    one = MediaEncoder(model, processor).media_kv(images[:1])
    per_medium = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in one)
    media = MediaEncoder(model, processor, kv_cache_bytes=2 * per_medium)
    got = media.media_kv(images)
    assert len(media._kv) == 2 and media._kv.bytes <= 2 * per_medium  # the last two, within budget
    _, kv = _reference_tokens_and_kv(model, processor, images)
    for (k, v), (rk, rv) in zip(got, kv):
        torch.testing.assert_close(k, rk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, rv, atol=1e-5, rtol=1e-5)
    none = MediaEncoder(model, processor, kv_cache_bytes=0)
    for (k, _), (rk, _) in zip(none.media_kv(images), kv):
        torch.testing.assert_close(k, rk, atol=1e-5, rtol=1e-5)
    assert len(none._kv) == 0


class Colours(Task):
    prompt = "Output:"
    max_new_tokens = 3
    num_beams = 1

    def __init__(self, support, queries):
        super().__init__("colours")
        self._support, self._queries = support, queries

    def support(self):
        return self._support

    def queries(self):
        return self._queries


def test_an_evaluation_run_encodes_each_support_image_once():
    model, processor = build("llama")
    support = [Example(f"s{i}", [solid(i, size=(36, 36 + i))], {"answer": str(i)}) for i in range(10)]
    queries = [Example(f"q{i}", [solid(i, size=(50, 40 + i))], {"answer": str(i)}) for i in range(6)]
    counts, hooks = _count_work(model)
    results = evaluate(model, processor, [Colours(support, queries)], shots=[4, 8], seeds=[0, 1], batch_size=2, progress=False)
    for h in hooks:
        h.remove()
    used = {s for run in results["runs"] for p in run["predictions"] for s in p["shots"]}
    distinct = len(used) + len(queries)  # query images are shared by the runs too
    assert counts == {"vision": distinct, "kv": distinct}  # four runs, 12 batches, 6 x 2 x (4 + 8) + 24 media shown


def test_a_rices_query_image_goes_through_the_vision_encoder_once():
    model, processor = build("llama")
    open_gates(model)
    support = [Example(f"s{i}", [solid(i, size=(36, 36 + i))], {"answer": str(i)}) for i in range(10)]
    queries = [Example(f"q{i}", [solid(i + 3, size=(50, 40 + i))], {"answer": str(i)}) for i in range(6)]
    task = Colours(support, queries)
    counts, hooks = _count_work(model)
    results = evaluate(model, processor, [task], shots=[3], selection="rices", batch_size=4, progress=False)
    for h in hooks:
        h.remove()
    shown = {s for p in results["runs"][0]["predictions"] for s in p["shots"]}
    # the support once for retrieval, the shots shown once more for their tokens, each query image once
    assert counts["vision"] == len(support) + len(shown) + len(queries)
    assert counts["kv"] == len(shown) + len(queries)
    # the tokens kept from the retrieval pass are the ones a fresh encoder computes
    baseline = evaluate(model, processor, [task], shots=[3], selection="rices", batch_size=4, progress=False)
    assert [p["prediction"] for p in baseline["runs"][0]["predictions"]] == [p["prediction"] for p in results["runs"][0]["predictions"]]
    media = MediaEncoder(model, processor)
    media.embeddings([q.media[0] for q in queries], keep_visual_tokens=True)
    fresh = MediaEncoder(model, processor).visual_tokens([q.media[0] for q in queries])
    torch.testing.assert_close(media.visual_tokens([q.media[0] for q in queries]), fresh, atol=1e-6, rtol=1e-6)


def test_kshot_benchmark_runs_both_sides_and_compares_predictions():
    from flamingo_vlm.benchmark.cli import resolve_preset
    from flamingo_vlm.benchmark.kshot import run_kshot, table
    from flamingo_vlm.benchmark.spec import load_bench_config

    spec = load_bench_config(resolve_preset("tiny")).to_dict()
    result = run_kshot(spec, shots=(3,), queries=3, support=6, batch_size=1, new_tokens=3, num_beams=2)
    (row,) = result["rows"]
    assert row["identical_predictions"] is True
    for side in ("without", "with"):
        parts = row[side]
        assert parts["total"] > 0 and parts["prefill"] > 0
        assert abs(parts["vision_resampler"] + parts["media_kv"] + parts["prefill"] + parts["decode_other"] - parts["total"]) < 1e-6
    # per query: the baseline encodes and projects the shots and the query, the cache only the query
    assert row["without"]["images_encoded"] == row["without"]["images_projected"] > row["with"]["images_encoded"] == 1
    assert row["with"]["images_projected"] == 1 and row["support_images_encoded"] == 6 and "| 3 | with |" in table(result)
