"""Language about the toy world: captions, questions, and the prompt formats documents are written in."""

from __future__ import annotations

import random
from dataclasses import replace

from .world import COLOURS, COUNTS, PLURALS, SHAPES, SIZES, Scene, VideoScene

# Words bound to shapes inside one document (training) or one prompt (the held-out label-mapping task).
# Training documents use fresh random nonce words, so the skill learned is to read the binding from the
# context, not to remember a pool; the held-out words below are never generated for training.
HELDOUT_NONCE_WORDS = ("gorp", "jiba", "plonk", "hisk", "vatu", "nelb", "crade", "fosk", "muzz", "tibe", "wroke", "yelp")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "bl", "tr", "sn", "gl", "pr", "st")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "k", "p", "x", "n", "m", "sh", "rt", "ld")


def nonce_word(rng: random.Random) -> str:
    """A random pronounceable non-word (never a held-out evaluation word)."""
    while True:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((1, 2)))) + rng.choice(_CODAS)
        if word not in HELDOUT_NONCE_WORDS and len(word) >= 3:
            return word


def nonce_words(rng: random.Random, k: int) -> list[str]:
    words: list[str] = []
    while len(words) < k:
        w = nonce_word(rng)
        if w not in words:
            words.append(w)
    return words


MOTION_WORDS = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}


# Writers differ in their words for colours and sizes. Each writer (a web page, a pair's caption, the annotators
# of a benchmark) uses one word per value, drawn from these: a page is consistent, the web as a whole is not.
# So a benchmark's words are a convention of its own, which the in-context examples show (what few-shot
# prompting adapts to on COCO and VQAv2: their annotators' conventions differ from web text's).
WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "navy", "azure"),
    "yellow": ("yellow", "gold", "lemon"),
    "purple": ("purple", "violet", "lilac"),
    "orange": ("orange", "amber", "tangerine"),
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}
assert set(WORDS) == set(COLOURS) | set(SIZES)


def wording(rng: random.Random) -> dict[str, str]:
    """One writer's words: for each colour and size, one of its :data:`WORDS`, each drawn on its own."""
    return {value: rng.choice(words) for value, words in WORDS.items()}


def word(value: str, words: dict[str, str] | None) -> str:
    """What a writer whose words are ``words`` (from :func:`wording`) calls ``value``; without them, its own name."""
    return (words or {}).get(value, value)


def caption(scene: Scene, words: dict[str, str] | None = None) -> str:
    """A one-sentence description, colours and sizes named in ``words`` (from :func:`wording`)."""
    size, colour = word(scene.size, words), word(scene.colour, words)
    if scene.count == 1:
        return f"a {size} {colour} {scene.shape} on the {scene.position}."
    return f"{COUNTS[scene.count - 1]} {size} {colour} {PLURALS[scene.shape]}."


def video_caption(video: VideoScene) -> str:
    return f"a {video.size} {video.colour} {video.shape} moves {MOTION_WORDS[video.motion]}."


# The toy VQAv2 asks these, colour twice as often as each other type: colour answers are where its annotators'
# words show (VQAv2's own "what color" questions are among its most common).
BENCHMARK_QUESTION_WEIGHTS = {"shape": 1, "colour": 2, "size": 1, "count": 1, "position": 1}
# Web Q&A pages also ask which of two colours a shape is, in the page's words: the bridge learns to pick, of the
# colour words on the page, the one that names what it sees, as for sizes ("is the shape tiny or large?");
# without them the word a same-coloured shot shows is seldom carried into the VQA answer (docs/toyworld.md).
QUESTION_TYPES = tuple(BENCHMARK_QUESTION_WEIGHTS) + ("colour_choice",)


def question(scene: Scene, kind: str, words: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(question, answer) of one type about the scene; None when it does not apply (position of a group).

    ``words`` (from :func:`wording`) names colours and sizes, in the question and in the answer.
    """
    if kind == "shape":
        return "what shape is in the picture?", scene.shape
    if kind == "colour":
        return "what colour is the shape?", word(scene.colour, words)
    if kind == "colour_choice":  # the other colour and the order follow from the scene's layout seed, as all else here
        others = [c for c in COLOURS if c != scene.colour]
        pair = [scene.colour, others[(scene.layout_seed >> 8) % len(others)]]
        if (scene.layout_seed >> 12) % 2:
            pair.reverse()
        return f"is the shape {word(pair[0], words)} or {word(pair[1], words)}?", word(scene.colour, words)
    if kind == "size":
        return f"is the shape {word('small', words)} or {word('large', words)}?", word(scene.size, words)
    if kind == "count":
        return "how many shapes are there?", scene.count_word
    if kind == "position":
        return ("where is the shape?", scene.position) if scene.count == 1 else None
    raise ValueError(f"unknown question type {kind!r}")


VIDEO_QUESTION_TYPES = ("motion", "shape", "colour")


def video_question(video: VideoScene, kind: str) -> tuple[str, str]:
    if kind == "motion":
        return "which way does the shape move?", video.motion
    if kind == "shape":
        return "what shape moves?", video.shape
    if kind == "colour":
        return "what colour is the moving shape?", video.colour
    raise ValueError(f"unknown video question type {kind!r}")


# ---- formats of interleaved documents ------------------------------------------------------------
# Documents are bursty: every chunk of one document is written in the same format (without that,
# nothing is learned in context). The held-out evaluation formats are not in this list. Caption and Q&A
# pages come twice as often as the rest: from them the bridge learns to take a page's words for colours
# and sizes (with one share each, that is not learned reliably).
ATTRIBUTE_FORMATS = {"Colour": "colour", "Shape": "shape", "Size": "size", "Count": "count_word"}


def chunk_text(scene: Scene, fmt: str, style: dict | None = None) -> str | None:
    """The text after one image in a document of format ``fmt``; None if the scene does not fit it.

    ``style`` holds what one document fixes for all its chunks (see :func:`document_style`); a Q&A page
    whose ``qa_kind`` is None asks each scene its own type of question.
    """
    style = style or {}
    if fmt == "caption":
        return f"Output: {caption(scene, style.get('words'))}"
    if fmt == "qa":
        kind = style["qa_kind"]
        if kind is None:  # a page of mixed questions: each scene's own type, drawn from its layout seed
            kinds = [k for k in QUESTION_TYPES if question(scene, k) is not None]
            kind = kinds[scene.layout_seed % len(kinds)]
        qa = question(scene, kind, style.get("words"))
        return None if qa is None else f"Question: {qa[0]} Answer: {qa[1]}"
    if fmt in ATTRIBUTE_FORMATS:
        return f"{fmt}: {getattr(scene, ATTRIBUTE_FORMATS[fmt])}"
    if fmt == "naming":
        return f"This is a {style['names'][getattr(scene, style['attribute'])]}."
    if fmt == "structured":
        values = [getattr(scene, a) for a in style["order"]]
        return None if None in values else f"{style['prefix']}: " + " ".join(values)
    raise ValueError(f"unknown document format {fmt!r}")


DOC_FORMATS = ("caption", "caption", "qa", "qa", "Colour", "Shape", "Size", "Count", "naming", "naming", "structured", "structured")
DOC_TITLES = ("my shapes.", "a page of pictures.", "look at these.", "shapes i drew today.", "picture notes.", "")
STRUCTURED_ATTRIBUTES = ("size", "colour", "shape", "count_word", "position")


def document_style(rng: random.Random, fmt: str, attribute: str | None = None, values: list[str] | None = None) -> dict:
    """What a document keeps the same in every chunk: its words for colours and sizes, its question type, its
    nonce words, its prefix and order."""
    if fmt == "caption":  # the page's words for colours and sizes
        return {"words": wording(rng)}
    if fmt == "qa":
        # Half the Q&A pages ask one type of question throughout, half mix the types. On one-type pages only
        # the first chunk needs the question read (after it the answer's type follows from the page), so
        # with those alone reading the question is not learned reliably (answers of the wrong type); mixed
        # pages make every chunk depend on its question.
        return {"qa_kind": rng.choice(QUESTION_TYPES) if rng.random() < 0.5 else None, "words": wording(rng)}
    if fmt == "naming":  # words bound to the values of one attribute in this document (colours: see generate._document)
        return {"attribute": attribute, "names": dict(zip(values, nonce_words(rng, len(values))))}
    if fmt == "structured":  # a random non-word prefix, attributes in a random order
        return {"prefix": nonce_word(rng).capitalize(), "order": rng.sample(STRUCTURED_ATTRIBUTES, k=rng.choice((2, 3, 3, 3)))}
    return {}


# The new format's prefix: a capitalised non-word that no training page uses (its ending "lt" is none of _CODAS,
# so nonce_word never makes it), starting with a capital the training pages' prefixes start with. A prefix
# whose capital appears nowhere in the LM's text ("Item", "Hob", "Wex": no I, H or W) is a token the frozen LM
# has never seen, and the bridge copies the shots' order after it far less reliably (docs/toyworld.md).
HELDOUT_PREFIX = "Balt"


def structured_lines_document(rng: random.Random, scenes: list[Scene]) -> str:
    """Text-only LM pretraining: lines that repeat one structure (a prefix, then attributes in a fixed order).

    The frozen LM must have seen such documents to carry a new format from the shots to the answer.
    Prefixes are random capitalised non-words, so what is learned is to copy whatever prefix and order
    the document uses; the held-out prefix itself never appears.
    """
    prefix = nonce_word(rng).capitalize()
    order = rng.sample(STRUCTURED_ATTRIBUTES, k=rng.choice((2, 3, 3, 3)))
    sep = rng.choice((" ", " ", ", "))
    rows = [[getattr(s, a) for a in order] for s in scenes]
    return "\n".join(f"{prefix}: " + sep.join(row) for row in rows if None not in row)


def spread(rng: random.Random, values: list[str], n: int) -> list[str]:
    """n values in random order: each of ``values`` at least once (n >= len(values)), the rest drawn again."""
    out = list(values) + [rng.choice(values) for _ in range(n - len(values))]
    rng.shuffle(out)
    return out


def naming_text_document(rng: random.Random, scenes: list[Scene]) -> str:
    """Text-only LM pretraining: fresh nonce words bound to 2-3 shapes or colours within the document.

    Each word comes back several times: only repetition teaches the LM to look a binding up in its
    context (the held-out label-mapping task needs exactly that); words named once teach nothing.
    """
    attribute = rng.choice(("shape", "colour"))
    values = rng.sample(SHAPES if attribute == "shape" else tuple(COLOURS), k=rng.choice((2, 2, 3)))
    names = dict(zip(values, nonce_words(rng, len(values))))
    scenes = [replace(s, **{attribute: v}) for s, v in zip(scenes, spread(rng, values, len(scenes)))]
    if rng.random() < 0.5:
        return " ".join(f"the {getattr(s, attribute)} one is a {names[getattr(s, attribute)]}." for s in scenes)
    return "\n".join(f"{s.colour} {s.shape}: {names[getattr(s, attribute)]}" for s in scenes)


BINDING_KEYS = tuple(COLOURS) + tuple(SHAPES)


def binding_text_document(rng: random.Random) -> str:
    """Text-only LM pretraining: dense bindings of fresh words to keys ("red gorp, blue jiba, red gorp, ...").

    After a word's first use, every use is predictable only by finding the same key earlier in the
    document and copying what followed it: with the random repeats of :func:`~.backbones.pretrain_lm`,
    these documents are what makes the LM form induction heads, the copying the label-mapping task needs.
    """
    keys = rng.sample(BINDING_KEYS, k=rng.choice((2, 3, 4, 5)))
    names = dict(zip(keys, nonce_words(rng, len(keys))))
    sep, bind = rng.choice((" ", ", ", "\n", ". ")), rng.choice((" ", ": ", " is "))
    return sep.join(f"{k}{bind}{names[k]}" for k in spread(rng, keys, rng.randint(8, 16)))
