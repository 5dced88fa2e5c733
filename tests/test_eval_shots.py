"""Shot selection: RICES order and caching, random shots, permutations, the paper's text-only 0-shot prompts."""

import random

import pytest
import torch

from eval_fixtures import solid
from eval_fixtures import one_torch_thread  # noqa: F401  (autouse: one torch thread for these tests)
from helpers import build
from flamingo_vlm.evaluation import RICES, Example, MediaEncoder, Task, build_prompt, sample_random_shots, shot_permutations


class Colours(Task):
    prompt = "Output:"

    def __init__(self, support, queries=(), **kw):
        super().__init__("colours", **kw)
        self._support, self._queries = support, list(queries)

    def support(self):
        return self._support

    def queries(self):
        return self._queries


@pytest.fixture(scope="module")
def model_and_processor():
    return build("llama")


def _support():
    return [Example(f"s{i}", [solid(i)], {"answer": f"colour {i}"}) for i in range(8)]


def test_rices_returns_the_most_similar_last(model_and_processor):
    model, processor = model_and_processor
    support = _support()
    task = Colours(support)
    media = MediaEncoder(model, processor)
    rices = RICES(task, media, progress=False)
    queries = [Example("q5", [solid(5)], {}), Example("q2", [solid(2)], {})]  # same pixels as s5 / s2
    selected = rices.select(queries, 3)
    embeddings = media.embeddings([ex.media[0] for ex in support])
    for query, shots in zip(queries, selected):
        q = media.embeddings(query.media)[0]
        sims = (embeddings @ q).tolist()
        expected = sorted(range(len(support)), key=lambda j: sims[j])[-3:]  # the 3 best, ascending
        assert [s.id for s in shots] == [support[j].id for j in expected]
        assert shots[-1].id == "s" + query.id[1:]  # an identical image is the most similar: last
    assert rices.select(queries, 0) == [[], []]


def test_rices_never_retrieves_the_query_itself(model_and_processor):
    model, processor = model_and_processor
    support = _support()
    rices = RICES(Colours(support), MediaEncoder(model, processor), progress=False)
    shots = rices.select([support[3]], 7)[0]
    assert len(shots) == 7 and "s3" not in [s.id for s in shots]


def test_rices_caches_support_embeddings_on_disk(model_and_processor, tmp_path):
    model, processor = model_and_processor
    task = Colours(_support())
    first = RICES(task, MediaEncoder(model, processor), cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("rices-colours-*.pt"))) == 1
    calls = []
    handle = model.vision_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    second = RICES(task, MediaEncoder(model, processor), cache_dir=tmp_path, progress=False)  # fresh media cache
    handle.remove()
    assert calls == []  # loaded, not recomputed
    torch.testing.assert_close(first.support_embeddings, second.support_embeddings)
    # another support set is another cache entry
    RICES(Colours(_support()[:5]), MediaEncoder(model, processor), cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("rices-colours-*.pt"))) == 2


def test_random_shots_are_seeded_distinct_and_exclude_the_query():
    pool = _support()
    a = sample_random_shots(pool, 4, random.Random("0/x"), exclude_id="s1")
    b = sample_random_shots(pool, 4, random.Random("0/x"), exclude_id="s1")
    c = sample_random_shots(pool, 4, random.Random("1/x"), exclude_id="s1")
    assert [s.id for s in a] == [s.id for s in b] != [s.id for s in c]
    assert len({s.id for s in a}) == 4 and "s1" not in {s.id for s in a}
    assert len(sample_random_shots(pool, 20, random.Random(0))) == 8


def test_shot_permutations():
    shots = _support()[:3]
    orders = shot_permutations(shots, 6, random.Random(0))
    assert orders[0] == shots and len(orders) == 6  # 3! orders, all distinct
    assert len({tuple(s.id for s in o) for o in orders}) == 6
    assert len(shot_permutations(shots[:2], 6, random.Random(0))) == 2
    assert shot_permutations(shots, 1, random.Random(0)) == [shots]


def test_prompts_with_and_without_the_shots_images():
    support = _support()
    task = Colours(support)
    query = Example("q", [solid(1)], {})
    items = build_prompt(task, query, support[:2])
    assert [type(x).__name__ for x in items] == ["Image", "str", "Image", "str", "Image", "str"]
    assert items[1] == "Output: colour 0<|endofchunk|>" and items[-1] == "Output:"
    text_only = build_prompt(task, query, support[:2], text_only_shots=True)
    assert text_only[:2] == ["Output: colour 0<|endofchunk|>", "Output: colour 1<|endofchunk|>"]
    assert sum(not isinstance(x, str) for x in text_only) == 1  # only the query's image
