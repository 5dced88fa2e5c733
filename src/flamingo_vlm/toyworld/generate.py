"""Write the toy world to disk in the formats real data comes in.

    world/
      world.json                      what was generated (seed, sizes, the benchmarks' annotators' words)
      text/lm_corpus.txt              text-only documents for the frozen LM's pretraining (blank-line separated)
      pairs/shard-*.tar               webdataset image-text pairs: {key}.png + {key}.txt (LAION/img2dataset layout)
      interleaved/shard-*.tar         MMC4 webdataset repack: {key}.json with text_list + image_info (base64 images)
      videos/shard-*.tar              webdataset video-text pairs: {key}.mp4 + {key}.txt
      eval/coco/                      Karpathy-split captions json (dataset_coco.json) + images/
      eval/vqa/                       VQAv2 questions/annotations json (train = shots, val = queries) + images/
      eval/classification/            ImageNet-style list files (train.txt, val.txt: "relative/path label") + classnames.txt
      eval/videoqa/                   MSVD-QA style json (train_qa.json, test_qa.json) + videos/
      eval/heldout/scenes.json        scene attributes of held-out query/support images (+ images/)
"""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import webdataset as wds
from tqdm import tqdm

from . import text as T
from .world import COLOURS, SHAPES, Scene, render_scene, render_video, sample_scene, sample_video_scene

WORLD_VERSION = 11


@dataclass
class WorldSizes:
    """How much of each kind of data to write."""

    pairs: int = 12000
    documents: int = 4000
    videos: int = 1200
    lm_documents: int = 12000
    eval_queries: int = 240
    # VQA scores one short answer 0 or 1 (all 10 annotators agree): at 200 queries its standard error is ~3
    # points, more than the few points that shots add to it
    vqa_queries: int = 600
    eval_support: int = 400
    # the toy VQAv2's training split (its first eval_support questions as before): the shots' pool and the data
    # that fine-tuning trains on (docs/training.md); like VQAv2's, larger than its test split. 4000 questions
    # were too few for the vision encoder: unfrozen, it fitted their pictures (shape 94% on them, 82% on the test's)
    vqa_train: int = 16000
    # the toy VQAv2's whole test split: the demo scores its first vqa_queries, fine-tuning all (per question
    # kind: ~550 shape questions, where 600 hold ~110)
    vqa_test: int = 3000
    # up to 9 images: an 8-shot prompt holds 9, and a bridge trained on fewer degrades with more shots
    images_per_document: tuple[int, int] = (2, 9)
    shard_size: int = 1000

    def __post_init__(self) -> None:
        if self.vqa_test < self.vqa_queries or self.vqa_train < self.eval_support:
            raise ValueError(f"vqa_test ({self.vqa_test}) must be >= vqa_queries ({self.vqa_queries}) and vqa_train ({self.vqa_train}) "
                             f">= eval_support ({self.eval_support}): the demo's sets are their first questions")

    @classmethod
    def quick(cls) -> "WorldSizes":
        return cls(pairs=8000, documents=2000, videos=400, lm_documents=6000, eval_queries=200, vqa_queries=200, eval_support=200, vqa_train=200, vqa_test=200)

    @classmethod
    def tiny(cls) -> "WorldSizes":
        return cls(pairs=48, documents=32, videos=16, lm_documents=200, eval_queries=12, vqa_queries=12, eval_support=16, vqa_train=16, vqa_test=12, shard_size=32)


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(frames, fps: int = 4, codec: str = "mpeg4", container: str = "mp4") -> bytes:
    """Encode PIL frames as a video (MPEG-4 in mp4 by default) with PyAV."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}  # near-lossless: colours must survive the codec
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


class _ShardWriter:
    """webdataset ShardWriter into ``directory/shard-%05d.tar``."""

    def __init__(self, directory: Path, shard_size: int):
        directory.mkdir(parents=True, exist_ok=True)
        # mtime=0: byte-identical shards for the same seed
        self.writer = wds.ShardWriter(str(directory / "shard-%05d.tar"), maxcount=shard_size, verbose=0, mtime=0.0)

    def __enter__(self):
        return self.writer

    def __exit__(self, *exc):
        self.writer.close()


def _document(rng: random.Random, key: str, images: tuple[int, int]) -> dict:
    """One bursty MMC4-style document: a title, then ``images`` (min, max) images each followed by a chunk in
    one format (naming documents have at least 4, so that their words come back)."""
    fmt = rng.choice(T.DOC_FORMATS)
    n = rng.randint(*images) if fmt != "naming" else rng.randint(max(4, images[0]), max(4, images[1]))
    if fmt == "naming":  # a few colours per document, each bound to a word for this document only
        # Colours, not shapes: colours are what the toy CLIP reads most reliably, and words bound to values the
        # encoder cannot tell apart teach the bridge only to guess the most recent word (docs/toyworld.md).
        # The held-out task binds colours too.
        attribute = "colour"
        values = rng.sample(tuple(COLOURS), k=rng.choice((2, 2, 3)))
        style = T.document_style(rng, fmt, attribute, values)
        scenes = [sample_scene(rng, **{attribute: v}) for v in T.spread(rng, values, n)]
    else:
        style, scenes = T.document_style(rng, fmt), []
        # Caption and Q&A pages show 2-3 colours, each again and again, and name each colour in the page's own
        # word: after a colour's first picture its word can be read from the page, as the shots of a
        # benchmark show its annotators' words.
        colours = T.spread(rng, rng.sample(tuple(COLOURS), k=rng.choice((2, 3))), n) if "words" in style else [None] * n
        while len(scenes) < n:
            s = sample_scene(rng, colour=colours[len(scenes)])
            if T.chunk_text(s, fmt, style) is not None:
                scenes.append(s)
    title = rng.choice(T.DOC_TITLES)
    text_list = [title] if title else []
    image_info = []
    for i, s in enumerate(scenes):
        image_info.append({
            "image_name": f"{key}-{i}.png",
            "raw_url": f"toy://{key}/{i}",
            "matched_text_index": len(text_list),
            "matched_sim": round(rng.uniform(0.28, 0.4), 4),
            "image_base64": base64.b64encode(png_bytes(render_scene(s))).decode(),
        })
        text_list.append(T.chunk_text(s, fmt, style))
    return {"url": f"toy://{key}", "text_list": text_list, "image_info": image_info, "similarity_matrix": [], "format": fmt}


def lm_corpus(rng: random.Random, num_documents: int) -> list[str]:
    """Text-only documents for pretraining the toy LM: structured lines, naming, Q&A, descriptions, and
    (one more for every three of those) dense word bindings, shuffled."""
    docs = []
    for _ in range(num_documents):
        kind = rng.random()
        scenes = [sample_scene(rng) for _ in range(rng.randint(4, 9))]
        if kind < 0.35:
            docs.append(T.structured_lines_document(rng, scenes))
        elif kind < 0.65:
            docs.append(T.naming_text_document(rng, scenes + [sample_scene(rng) for _ in range(3)]))
        elif kind < 0.85:
            fmt = rng.choice([f for f in T.DOC_FORMATS if f != "naming"])
            style = T.document_style(rng, fmt)
            lines = [T.chunk_text(s, fmt, style) for s in scenes]
            docs.append("\n".join(x for x in lines if x))
        elif kind < 0.95:
            words = T.wording(rng)
            docs.append(" ".join(T.caption(s, words).capitalize() for s in scenes))
        else:
            videos = [sample_video_scene(rng) for _ in range(3)]
            docs.append(" ".join(T.video_caption(v).capitalize() for v in videos))
    docs += [T.binding_text_document(rng) for _ in range(num_documents // 3)]
    rng.shuffle(docs)
    return docs


def _write_images(scenes: list[Scene], directory: Path, prefix: str) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i, s in enumerate(scenes):
        name = f"{prefix}_{i:06d}.png"
        render_scene(s).save(directory / name)
        names.append(name)
    return names


def benchmark_question(rng: random.Random, scene: Scene, words: dict[str, str]) -> tuple[str, str]:
    """A toy VQAv2 (question, answer) about ``scene`` in the annotators' ``words``, of a type drawn by
    :data:`~flamingo_vlm.toyworld.text.BENCHMARK_QUESTION_WEIGHTS` among those that apply."""
    kinds = [k for k in T.BENCHMARK_QUESTION_WEIGHTS if T.question(scene, k) is not None]
    kind = rng.choices(kinds, weights=[T.BENCHMARK_QUESTION_WEIGHTS[k] for k in kinds])[0]
    return T.question(scene, kind, words)


def _write_eval(rng: random.Random, root: Path, sizes: WorldSizes) -> tuple[dict, dict]:
    """Write the evaluation sets; returns (their paths, the words their annotators use for colours and sizes)."""
    out = {}
    n_q, n_s = sizes.eval_queries, sizes.eval_support
    # One pool of annotators writes the captions and answers the questions, in words of their own (T.WORDS):
    # a convention the support examples in a prompt show, and a model without them can only guess.
    annotators = T.wording(rng)
    # Captioning, Karpathy json: test images are queries, train images the support pool.
    coco = root / "coco"
    scenes = [sample_scene(rng) for _ in range(n_s + n_q)]
    names = _write_images(scenes, coco / "images", "toy")
    images = [
        {"filename": n, "filepath": "images", "imgid": i, "cocoid": i, "split": "train" if i < n_s else "test",
         "sentences": [{"raw": c, "tokens": c.rstrip(".").split(), "imgid": i, "sentid": i}], "sentids": [i]}
        for i, (n, s, c) in enumerate(zip(names, scenes, (T.caption(s, annotators) for s in scenes)))
    ]
    (coco / "dataset_coco.json").write_text(json.dumps({"dataset": "toy", "images": images}))
    out["coco"] = str(coco)

    # VQAv2: questions + annotations with 10 answers; train2014 = support (and fine-tuning data), val2014 = queries.
    vqa = root / "vqa"
    (vqa / "images").mkdir(parents=True, exist_ok=True)
    ids = {"train2014": range(sizes.vqa_train), "val2014": range(100000, 100000 + sizes.vqa_test)}  # disjoint image ids
    # the demo's sets (shots' pool, queries) first; the rest of each split at the end, from generators of its own
    first = {"train2014": n_s, "val2014": sizes.vqa_queries}
    splits = {split: _vqa_questions(rng, vqa, split, ids[split][: first[split]], annotators) for split in ids}
    out["vqa"] = str(vqa)

    # Classification (shape), ImageNet-style list files.
    cls = root / "classification"
    for split, count in (("train", n_s), ("val", n_q)):
        scenes = [sample_scene(rng, shape=SHAPES[i % len(SHAPES)]) for i in range(count)]
        rng.shuffle(scenes)
        names = _write_images(scenes, cls / split, split)
        (cls / f"{split}.txt").write_text("".join(f"{split}/{n} {SHAPES.index(s.shape)}\n" for n, s in zip(names, scenes)))
    (cls / "classnames.txt").write_text("\n".join(SHAPES) + "\n")
    out["classification"] = str(cls)

    # Video QA, MSVD-QA style.
    vq = root / "videoqa"
    (vq / "videos").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_s), ("test", n_q)):
        rows = []
        for i in range(count):
            v = sample_video_scene(rng)
            name = f"{split}_{i:05d}"
            (vq / "videos" / f"{name}.mp4").write_bytes(mp4_bytes(render_video(v)))
            q, a = T.video_question(v, rng.choice(T.VIDEO_QUESTION_TYPES))
            rows.append({"video": name, "video_id": i, "question": q, "answer": a, "id": i})
        (vq / f"{split}_qa.json").write_text(json.dumps(rows))
    out["videoqa"] = str(vq)

    # Held-out tasks: scene attributes of support/query images (the tasks build their prompts).
    ho = root / "heldout"
    meta = {}
    for split, count in (("support", n_s), ("query", n_q)):
        # one object, so every attribute is defined; colours in turn, so every colour has support images
        scenes = [sample_scene(rng, count=1, colour=tuple(COLOURS)[i % len(COLOURS)]) for i in range(count)]
        names = _write_images(scenes, ho / "images", split)
        meta[split] = [{"image": f"images/{n}", **s.to_dict()} for n, s in zip(names, scenes)]
    (ho / "scenes.json").write_text(json.dumps(meta))
    out["heldout"] = str(ho)

    # The rest of the VQA splits (the training one, as VQAv2's, larger than the test one: enough to fine-tune on),
    # each from its own generator after everything else, so that the sets above do not depend on their sizes.
    for split in ids:
        extra = _vqa_questions(random.Random(rng.randrange(2**31)), vqa, split, ids[split][first[split]:], annotators)
        splits[split] = tuple(a + b for a, b in zip(splits[split], extra))
    for split, (qs, anns) in splits.items():
        (vqa / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split, "questions": qs}))
        (vqa / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"data_type": "mscoco", "data_subtype": split, "annotations": anns}))
    return out, annotators


def _vqa_questions(rng: random.Random, vqa: Path, split: str, image_ids: range, annotators: dict[str, str]) -> tuple[list, list]:
    """Toy VQAv2 (questions, annotations) of one split, one question per image, each image written as COCO names it."""
    questions, annotations = [], []
    for image_id in image_ids:
        s = sample_scene(rng)
        render_scene(s).save(vqa / "images" / f"COCO_{split}_{image_id:012d}.jpg", quality=95)
        q, a = benchmark_question(rng, s, annotators)
        qid = image_id * 10
        questions.append({"image_id": image_id, "question": q, "question_id": qid})
        answers = [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)]
        annotations.append({"question_id": qid, "image_id": image_id, "question_type": q.split()[0], "answer_type": "other",
                            "multiple_choice_answer": a, "answers": answers})
    return questions, annotations


WORLD_PARTS = ("text", "pairs", "interleaved", "videos", "eval")


def generate_world(
    directory: str | Path, *, seed: int = 0, sizes: WorldSizes | None = None, progress: bool = True, parts: tuple[str, ...] = WORLD_PARTS,
) -> Path:
    """Write the toy world under ``directory`` (deterministic in ``seed``); returns the path.

    parts: which of :data:`WORLD_PARTS` to write (each has its own generator: a part is the same whether or not
    the others are written); world.json is written with the whole world only.
    """
    unknown = set(parts) - set(WORLD_PARTS)
    if unknown:
        raise ValueError(f"unknown toy world parts {sorted(unknown)}: expected some of {WORLD_PARTS}")
    root = Path(directory)
    sizes = sizes or WorldSizes()
    rng = random.Random(seed)
    bar = tqdm(total=len(parts), desc="toy world", disable=not progress, unit="part")

    text_seed = rng.randrange(2**31)
    if "text" in parts:
        corpus = lm_corpus(random.Random(text_seed), sizes.lm_documents)
        (root / "text").mkdir(parents=True, exist_ok=True)
        (root / "text" / "lm_corpus.txt").write_text("\n\n".join(corpus) + "\n")
        bar.update()

    def pair(r: random.Random, i: int) -> dict:
        s = sample_scene(r)
        text = T.caption(s, T.wording(r))  # alt-text: every pair has its own writer
        return {"__key__": f"pair{i:07d}", "png": png_bytes(render_scene(s)), "txt": text, "json": json.dumps(s.to_dict())}

    def document(r: random.Random, i: int) -> dict:
        return {"__key__": f"doc{i:07d}", "json": json.dumps(_document(r, f"doc{i:07d}", sizes.images_per_document))}

    def video(r: random.Random, i: int) -> dict:
        v = sample_video_scene(r)
        return {"__key__": f"video{i:07d}", "mp4": mp4_bytes(render_video(v)), "txt": T.video_caption(v), "json": json.dumps(v.to_dict())}

    for name, count, make in (("pairs", sizes.pairs, pair), ("interleaved", sizes.documents, document), ("videos", sizes.videos, video)):
        part_rng = random.Random(rng.randrange(2**31))  # one generator per part: parts do not shift each other
        if name in parts:
            with _ShardWriter(root / name, sizes.shard_size) as sink:
                for i in range(count):
                    sink.write(make(part_rng, i))
            bar.update()

    eval_rng = random.Random(rng.randrange(2**31))
    if "eval" in parts:
        eval_paths, annotators = _write_eval(eval_rng, root / "eval", sizes)
        bar.update()
    bar.close()
    if set(parts) != set(WORLD_PARTS):
        return root  # world.json describes a whole world only
    eval_paths = {k: str(Path(v).relative_to(root)) for k, v in eval_paths.items()}  # relative: the world can move
    manifest = {"version": WORLD_VERSION, "seed": seed, "sizes": sizes.__dict__, "eval": eval_paths, "eval_annotator_words": annotators}
    (root / "world.json").write_text(json.dumps(manifest, indent=2, default=list))
    return root
