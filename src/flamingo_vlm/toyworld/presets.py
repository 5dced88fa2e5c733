"""Example few-shot prompts from the toy world, for the web page: rendered scenes with their answers, in
the formats the toy-world model was trained and evaluated on (``Output: {caption}``, ``Question: ...
Answer: ...``)."""

from __future__ import annotations

import base64
import io
import random

from .text import caption, question
from .world import render_scene, sample_scene


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _qa(kind: str):
    def text(scene) -> tuple[str, str]:
        q, a = question(scene, kind)
        return f"Question: {q} Answer:", f" {a}"

    return text


def _caption(scene) -> tuple[str, str]:
    return "Output:", f" {caption(scene)}"


# name -> (description, prompt text and answer of a scene, single objects only (position questions))
TASKS = {
    "captioning": ("describe the picture", _caption, False),
    "colour": ("what colour is the shape?", _qa("colour"), False),
    "shape": ("what shape is in the picture?", _qa("shape"), False),
    "count": ("how many shapes are there?", _qa("count"), False),
    "position": ("where is the shape?", _qa("position"), True),
}


def toy_presets(shots: int = 3, seed: int = 0) -> list[dict]:
    """[{name, description, examples: [{image, text}], query: {image, text}, answer}] with PNG data URLs.

    An example's text is its prompt and answer (the page ends it with ``<|endofchunk|>``); the query's text
    is the prompt alone; ``answer`` is the query's ground truth.
    """
    presets = []
    for i, (name, (description, text_of, single)) in enumerate(TASKS.items()):
        rng = random.Random(seed * 1000 + i)
        scenes = [sample_scene(rng, count=1 if single else None) for _ in range(shots + 1)]
        examples = [{"image": png_data_url(render_scene(s)), "text": "".join(text_of(s))} for s in scenes[:-1]]
        prompt, answer = text_of(scenes[-1])
        presets.append({
            "name": name, "description": description, "examples": examples,
            "query": {"image": png_data_url(render_scene(scenes[-1])), "text": prompt}, "answer": answer.strip(),
        })
    return presets
