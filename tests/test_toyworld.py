"""The toy world generator: deterministic, and written in the formats real data comes in."""

import base64
import collections
import hashlib
import io
import itertools
import json
import random
import re
import tarfile
from pathlib import Path

import av
import pytest
from PIL import Image

from flamingo_vlm.toyworld import text as T
from flamingo_vlm.toyworld.generate import WorldSizes, _document, generate_world
from flamingo_vlm.toyworld.world import COLOURS, SHAPES, sample_scene


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), seed=0, sizes=WorldSizes.tiny(), progress=False)


def test_same_seed_same_bytes_other_seed_other_world(world, tmp_path):
    again = generate_world(tmp_path / "again", seed=0, sizes=WorldSizes.tiny(), progress=False)
    assert _digest(world) == _digest(again)
    other = generate_world(tmp_path / "other", seed=1, sizes=WorldSizes.tiny(), progress=False)
    assert _digest(other)["pairs/shard-00000.tar"] != _digest(world)["pairs/shard-00000.tar"]


def _members(shard: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_pairs_are_webdataset_image_text(world):
    samples = _members(world / "pairs" / "shard-00000.tar")
    assert len(samples) == WorldSizes.tiny().shard_size
    for sample in samples.values():
        assert {"png", "txt", "json"} <= set(sample)
        img = Image.open(io.BytesIO(sample["png"]))
        assert img.size == (64, 64)
        scene = json.loads(sample["json"])
        assert scene["shape"] in sample["txt"].decode() or T.PLURALS[scene["shape"]] in sample["txt"].decode()


def test_interleaved_documents_are_mmc4_and_bursty(world):
    samples = _members(world / "interleaved" / "shard-00000.tar")
    for sample in samples.values():
        doc = json.loads(sample["json"])
        assert {"text_list", "image_info", "similarity_matrix"} <= set(doc)
        low, high = WorldSizes.tiny().images_per_document
        assert low <= len(doc["image_info"]) <= high
        chunks = []
        for info in doc["image_info"]:
            assert {"image_name", "matched_text_index", "matched_sim", "image_base64"} <= set(info)
            chunks.append(doc["text_list"][info["matched_text_index"]])
        # bursty: every chunk of a document is in the same format (same prefix before the first ':' or word)
        heads = {c.split(":")[0] if ":" in c else " ".join(c.split()[:3]) for c in chunks}
        assert len(heads) == 1, chunks
        assert not any(c.startswith(T.HELDOUT_PREFIX) for c in doc["text_list"])
    # as many images as an 8-shot prompt (9) in some documents: the bridge must see such lengths in training
    assert max(len(json.loads(s["json"])["image_info"]) for s in samples.values()) == 9


def _object_colour(img: Image.Image) -> str:
    """The toy colour most of the image's pixels have exactly (objects are drawn in flat colours)."""
    counts = {name: 0 for name in COLOURS}
    lookup = {rgb: name for name, rgb in COLOURS.items()}
    for pixel in img.convert("RGB").getdata():
        if pixel in lookup:
            counts[lookup[pixel]] += 1
    return max(counts, key=counts.get)


def test_interleaved_naming_documents_bind_one_word_per_colour(world):
    """Naming documents name colours (the toy vision encoder reads them reliably), one word each, words repeating."""
    docs = [json.loads(s["json"]) for shard in sorted((world / "interleaved").glob("shard-*.tar")) for s in _members(shard).values()]
    naming = [d for d in docs if d["format"] == "naming"]
    assert naming
    for doc in naming:
        words: dict[str, str] = {}
        for info in doc["image_info"]:
            colour = _object_colour(Image.open(io.BytesIO(base64.b64decode(info["image_base64"]))))
            word = re.fullmatch(r"This is a (\w+)\.", doc["text_list"][info["matched_text_index"]]).group(1)
            assert words.setdefault(colour, word) == word, doc["text_list"]
        assert len(set(words.values())) == len(words) >= 2
        assert len(doc["image_info"]) > len(words)  # some word comes back: the lookup is learnable


def test_each_page_keeps_its_words_for_colours_and_sizes_and_pages_differ():
    """A caption page names each colour and size with one word of its own (T.WORDS); across pages the words vary."""
    rng = random.Random(0)
    used: dict[str, set[str]] = {}
    pages = 0
    while pages < 40:
        doc = _document(rng, "d", (4, 9))
        if doc["format"] != "caption":
            continue
        pages += 1
        words: dict[str, str] = {}
        for info in doc["image_info"]:
            colour = _object_colour(Image.open(io.BytesIO(base64.b64decode(info["image_base64"]))))
            text = doc["text_list"][info["matched_text_index"]]
            size_word, colour_word = re.fullmatch(r"Output: \w+ (\w+) (\w+) .+\.", text).groups()
            assert colour_word in T.WORDS[colour] and words.setdefault(colour, colour_word) == colour_word, doc["text_list"]
            size = next(v for v in T.SIZES if size_word in T.WORDS[v])
            assert words.setdefault(size, size_word) == size_word, doc["text_list"]
            used.setdefault(colour, set()).add(colour_word)
        colours = [k for k in words if k in COLOURS]
        assert len(colours) <= 3 < len(doc["image_info"])  # a few colours, each shown again: its word can be read
    assert all(len(v) == 3 for v in used.values()) and len(used) == len(COLOURS)


def test_benchmarks_use_their_annotators_words(world):
    """COCO references and VQAv2 answers name colours and sizes in the words world.json records for them."""
    words = json.loads((world / "world.json").read_text())["eval_annotator_words"]
    assert set(words) == set(T.WORDS) and all(words[v] in T.WORDS[v] for v in words)
    ev = world / "eval"
    coco = json.loads((ev / "coco" / "dataset_coco.json").read_text())
    own = set(words.values())
    for im in coco["images"]:
        size_word, colour_word = im["sentences"][0]["raw"].split()[1:3]
        assert size_word in own and colour_word in own, im["sentences"]
    questions = json.loads((ev / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    annotations = json.loads((ev / "vqa" / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    for q, a in zip(questions, annotations):
        if q["question"] == "what colour is the shape?" or q["question"].startswith("is the shape"):
            assert a["multiple_choice_answer"] in own and {x["answer"] for x in a["answers"]} == {a["multiple_choice_answer"]}


def test_videos_decode_to_frames(world):
    samples = _members(world / "videos" / "shard-00000.tar")
    sample = next(iter(samples.values()))
    with av.open(io.BytesIO(sample["mp4"])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (64, 64, 3)
    assert "moves" in sample["txt"].decode()


def test_evaluation_sets_in_official_formats(world):
    ev = world / "eval"
    coco = json.loads((ev / "coco" / "dataset_coco.json").read_text())
    splits = {im["split"] for im in coco["images"]}
    assert splits == {"train", "test"}
    assert all((ev / "coco" / "images" / im["filename"]).is_file() and im["sentences"][0]["raw"] for im in coco["images"])

    questions = json.loads((ev / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    annotations = json.loads((ev / "vqa" / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    assert [q["question_id"] for q in questions] == [a["question_id"] for a in annotations]
    assert all(len(a["answers"]) == 10 for a in annotations)
    assert all((ev / "vqa" / "images" / f"COCO_val2014_{q['image_id']:012d}.jpg").is_file() for q in questions)

    classes = (ev / "classification" / "classnames.txt").read_text().split()
    assert tuple(classes) == SHAPES
    rows = [line.split() for line in (ev / "classification" / "val.txt").read_text().splitlines()]
    assert all((ev / "classification" / path).is_file() and 0 <= int(label) < len(classes) for path, label in rows)

    qa = json.loads((ev / "videoqa" / "test_qa.json").read_text())
    assert all((ev / "videoqa" / "videos" / f"{row['video']}.mp4").is_file() and row["answer"] for row in qa)

    heldout = json.loads((ev / "heldout" / "scenes.json").read_text())
    assert set(heldout) == {"support", "query"}
    assert all((ev / "heldout" / row["image"]).is_file() for row in heldout["query"])


def test_vqa_splits_grow_without_changing_the_other_sets(world, tmp_path):
    """The toy VQAv2 train split (shots and fine-tuning data) has vqa_train questions and its test split vqa_test;
    their first eval_support and vqa_queries (the demo's shots' pool and queries) and every other evaluation set
    are the same whatever their sizes."""
    from dataclasses import replace

    sizes = WorldSizes.tiny()
    grow = {"train2014": 3, "val2014": 2}
    bigger = generate_world(tmp_path / "bigger", seed=0, progress=False, parts=("eval",),
                            sizes=replace(sizes, vqa_train=grow["train2014"] * sizes.vqa_train, vqa_test=grow["val2014"] * sizes.vqa_test))
    ev, big = world / "eval", bigger / "eval"

    def split(root, name):
        questions = json.loads((root / "vqa" / f"v2_OpenEnded_mscoco_{name}_questions.json").read_text())["questions"]
        annotations = json.loads((root / "vqa" / f"v2_mscoco_{name}_annotations.json").read_text())["annotations"]
        return questions, annotations

    for name, n, first in (("train2014", sizes.vqa_train, sizes.eval_support), ("val2014", sizes.vqa_test, sizes.vqa_queries)):
        (q, a), (big_q, big_a) = split(ev, name), split(big, name)
        assert len(q) == len(a) == n and len(big_q) == len(big_a) == grow[name] * n
        assert big_q[:first] == q[:first] and big_a[:first] == a[:first]
        assert len({x["question_id"] for x in big_q}) == len(big_q) and [x["question_id"] for x in big_a] == [x["question_id"] for x in big_q]
        assert all((big / "vqa" / "images" / f"COCO_{name}_{x['image_id']:012d}.jpg").is_file() for x in big_q)
    train_ids = {x["image_id"] for x in split(big, "train2014")[0]}
    assert not train_ids & {x["image_id"] for x in split(big, "val2014")[0]}
    same = ["coco/dataset_coco.json", "classification/val.txt", "videoqa/test_qa.json", "heldout/scenes.json"]
    assert all((ev / f).read_bytes() == (big / f).read_bytes() for f in same)


def test_world_sizes_refuse_vqa_splits_smaller_than_the_demo_uses():
    with pytest.raises(ValueError, match="vqa_test"):
        WorldSizes(vqa_queries=600, vqa_test=500)


def test_lm_corpus_never_contains_the_heldout_formats(world):
    corpus = (world / "text" / "lm_corpus.txt").read_text()
    assert T.HELDOUT_PREFIX + ":" not in corpus
    assert not any(f" {w}." in corpus or f" {w}\n" in corpus for w in T.HELDOUT_NONCE_WORDS)


def test_qa_pages_ask_one_type_or_mix_types_and_answers_fit_their_questions():
    """Half the Q&A pages keep one question type (bursty), half mix them: there every answer needs its question."""
    rng = random.Random(0)
    styles = [T.document_style(rng, "qa") for _ in range(400)]
    assert 150 < sum(st["qa_kind"] is None for st in styles) < 250
    asks = {"what shape": "shape", "what colour": "colour", "is the shape small or large": "size", "is the shape": "colour",
            "how many": "count_word", "where is": "position"}
    asked = {q: 0 for q in asks}
    for _ in range(300):
        scene = sample_scene(rng)
        question, answer = re.fullmatch(r"Question: (.+\?) Answer: (\w+)", T.chunk_text(scene, "qa", {"qa_kind": None})).groups()
        start = next(q for q in asks if question.startswith(q))
        assert answer == getattr(scene, asks[start]), (question, answer, scene)
        asked[start] += 1
    assert min(asked.values()) > 20, asked  # every type of question is asked on mixed pages


def test_colour_choice_names_the_colour_and_another_in_the_page_words():
    rng = random.Random(1)
    orders = set()
    for _ in range(200):
        scene, words = sample_scene(rng), T.wording(rng)
        question, answer = T.question(scene, "colour_choice", words)
        first, second = re.fullmatch(r"is the shape (\w+) or (\w+)\?", question).groups()
        assert answer == words[scene.colour] and answer in (first, second) and first != second
        other = second if answer == first else first
        assert other in {words[c] for c in COLOURS if c != scene.colour}
        orders.add(answer == first)
    assert orders == {True, False}


def test_toy_vqav2_asks_colour_twice_as_often_and_never_a_choice():
    from flamingo_vlm.toyworld.generate import benchmark_question

    rng = random.Random(0)
    words = T.wording(rng)
    kinds = {"what shape": "shape", "what colour": "colour", "is the shape": "size", "how many": "count", "where is": "position"}
    asked = collections.Counter()
    for _ in range(3000):
        question, _ = benchmark_question(rng, sample_scene(rng, count=1), words)
        kind = next(k for start, k in kinds.items() if question.startswith(start))
        if kind == "size":  # the only "is the shape X or Y?" it asks: never which of two colours
            assert question == f"is the shape {words['small']} or {words['large']}?", question
        asked[kind] += 1
    assert set(asked) == set(kinds.values())
    assert 1.7 < asked["colour"] / asked["shape"] < 2.3 and 0.8 < asked["size"] / asked["shape"] < 1.25, asked


def test_naming_documents_bind_few_words_and_repeat_them():
    """The LM can only learn to look a word up in its context from documents that use each word again."""
    rng = random.Random(0)
    for _ in range(50):
        doc = T.naming_text_document(rng, [sample_scene(rng) for _ in range(7)])
        words = re.findall(r"(?:is a |: )(\w+)", doc)
        assert len(words) == 7 and 2 <= len(set(words)) <= 3
        assert not set(words) & set(T.HELDOUT_NONCE_WORDS)


def test_heldout_prefix_is_never_a_generated_prefix():
    """Every word nonce_word can make (1-2 onset-vowel syllables and a coda): the held-out prefix is none of them,
    and it starts with a capital the training pages' prefixes start with (a capital that appears nowhere in the
    LM's text is a token the frozen LM has never seen: docs/toyworld.md)."""
    syllables = [o + v for o in T._ONSETS for v in T._VOWELS]
    made = {"".join(s) + c for n in (1, 2) for s in itertools.product(syllables, repeat=n) for c in T._CODAS}
    assert T.HELDOUT_PREFIX.lower() not in made
    rng = random.Random(0)
    assert T.nonce_word(rng) in made and T.HELDOUT_PREFIX not in {T.nonce_word(rng).capitalize() for _ in range(20000)}
    assert T.HELDOUT_PREFIX[0].lower() in {o[0] for o in T._ONSETS}


def test_new_format_layouts_are_asked_about_every_colour():
    """Query colours come in turn; each layout must get every colour (by id alone, each layout had one colour)."""
    from flamingo_vlm.evaluation import Example
    from flamingo_vlm.toyworld.tasks import LAYOUTS, NewFormatTask

    colours = tuple(COLOURS)
    queries = [Example(id=i, media=[], fields={"colour": colours[i % len(colours)], "size": "small", "position": "left"})
               for i in range(len(colours) * len(LAYOUTS))]
    task = NewFormatTask(scenes_json="unused.json")
    pairs = collections.Counter()
    for q in queries:
        episode, [shot] = task.episode(q, [q], random.Random(0))
        assert shot.fields["layout"] == episode.fields["layout"]
        pairs[episode.fields["layout"], q.fields["colour"]] += 1
    assert set(pairs.values()) == {1} and len(pairs) == len(colours) * len(LAYOUTS)
    for start in range(0, len(queries), len(LAYOUTS)):  # and every run of 6 queries has every layout once
        assert {task.episode(q, [], random.Random(0))[0].fields["layout"] for q in queries[start:start + len(LAYOUTS)]} == set(range(len(LAYOUTS)))


def test_binding_documents_reuse_each_word_for_its_key():
    """Dense bindings: every key keeps one fresh word through the document, and words come back."""
    rng = random.Random(0)
    for _ in range(50):
        doc = T.binding_text_document(rng)
        pairs = re.findall(r"\b(" + "|".join(T.BINDING_KEYS) + r")(?: |: | is )(\w+)", doc)
        bound = {}
        for key, word in pairs:
            assert key in T.BINDING_KEYS and word not in T.HELDOUT_NONCE_WORDS
            assert bound.setdefault(key, word) == word
        assert 2 <= len(bound) <= 5 and len(pairs) > len(bound)


def test_repeated_random_rows_repeat_each_run():
    import torch

    from flamingo_vlm.toyworld.backbones import repeated_random_rows

    gen = torch.Generator().manual_seed(0)
    rows = repeated_random_rows(3, 200, 3, 50, gen)
    assert rows.shape == (3, 200) and rows.min() >= 3 and rows.max() < 50
    # the row is run + run + run' + run' + ...: find the first run by its repetition
    row = rows[0].tolist()
    n = next(n for n in range(4, 16) if row[:n] == row[n : 2 * n])
    assert row[:n] == row[n : 2 * n]


def test_text_binding_probe_scores_an_induction_machine_perfectly():
    """The probe behind the LM's "in-context binding" number: 1.0 for a model that copies what followed the
    last earlier occurrence of its current token, 0.5 for one that ignores the context."""
    from types import SimpleNamespace

    import torch

    from flamingo_vlm.toyworld.backbones import text_binding_accuracy, train_tokenizer

    tok = train_tokenizer(["".join(f" {w}" for w in T.HELDOUT_NONCE_WORDS + tuple(COLOURS)) + "."] * 4, 400)  # whole words

    class Induction(torch.nn.Module):
        def __init__(self, copy: bool):
            super().__init__()
            self.copy, self.w = copy, torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            ids = input_ids[0].tolist()
            logits = torch.zeros(1, len(ids), len(tok))
            earlier = [i for i in range(len(ids) - 1) if ids[i] == ids[-1]]
            if self.copy and earlier:
                logits[0, -1, ids[earlier[-1] + 1]] = 1.0
            return SimpleNamespace(logits=logits)

    assert text_binding_accuracy(Induction(True), tok, trials=40) == 1.0
    assert text_binding_accuracy(Induction(False), tok, trials=40) == 0.5
