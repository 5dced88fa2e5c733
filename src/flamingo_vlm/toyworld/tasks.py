"""The toy world's held-out tasks: skills that can only come from the shots in the prompt.

- :class:`NewFormatTask` (held-out a): report a picture's attributes under a prefix never seen in
  training ("Balt:"), in one of the 6 orders of (colour, size, position). The order is only given
  by the shots, so a 0-shot guess can match at most one layout; the score is the mean over all layouts.
- :class:`LabelMappingTask` (held-out b): two values of one attribute are bound to two words that exist only
  inside the prompt ("This is a gorp."); the query is ranked between the two words. Chance is 50%. The demo
  runs it on colours, the attribute the training mixture's naming documents bind to words (so its format
  is trained, its words are new), and on sizes, which no training document binds to a word.

Both read ``eval/heldout/scenes.json`` (scene attributes of support and query images).
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

from ..evaluation import Example, Task, exact_match_accuracy, register_task
from .text import HELDOUT_NONCE_WORDS, HELDOUT_PREFIX
from .world import COLOURS

LAYOUTS = tuple(itertools.permutations(("colour", "size", "position")))


def _read_scenes(scenes_json: str | Path, split: str) -> list[Example]:
    path = Path(scenes_json)
    rows = json.loads(path.read_text())[split]
    return [Example(id=i, media=[str(path.parent / row["image"])], fields=dict(row)) for i, row in enumerate(rows)]


@register_task("toy_new_format")
class NewFormatTask(Task):
    """Held-out (a): "Balt: <colour/size/position in the prompt's order>"; exact match, mean over layouts."""

    name = "heldout_new_format"
    kind = "generate"
    metric = "accuracy"
    prompt = f"{HELDOUT_PREFIX}:"
    max_new_tokens = 8
    num_beams = 1
    zero_shot_text_examples = False  # true 0-shot: text-only examples would give the layout away

    def __init__(self, name: str | None = None, *, scenes_json: str, **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.scenes_json = scenes_json

    def support(self) -> list[Example]:
        return _read_scenes(self.scenes_json, "support")

    def queries(self) -> list[Example]:
        return _read_scenes(self.scenes_json, "query")

    @staticmethod
    def with_layout(ex: Example, layout: int) -> Example:
        fields = {**ex.fields, "layout": layout, "answer": " ".join(ex.fields[a] for a in LAYOUTS[layout])}
        return replace(ex, fields=fields)

    def episode(self, query: Example, shots: list[Example], rng: random.Random) -> tuple[Example, list[Example]]:
        # The queries' colours come in turn (generate._write_eval): turning the layout one step further every
        # len(COLOURS) queries asks every layout about every colour (by id alone, each layout had one colour),
        # and each run of len(LAYOUTS) queries has every layout once.
        i = int(query.id)
        layout = (i + i // len(COLOURS)) % len(LAYOUTS)
        return self.with_layout(query, layout), [self.with_layout(s, layout) for s in shots]

    def score(self, predictions: list, examples: list[Example]) -> dict[str, float]:
        per_layout = {}
        for layout in range(len(LAYOUTS)):
            idx = [i for i, ex in enumerate(examples) if ex.fields["layout"] == layout]
            if idx:
                per_layout[layout] = 100.0 * exact_match_accuracy(
                    [predictions[i] for i in idx], [examples[i].fields["answer"] for i in idx], normalize=str.strip
                )
        scores = {f"layout_{'_'.join(LAYOUTS[k])}": v for k, v in per_layout.items()}
        scores[self.metric] = sum(per_layout.values()) / max(len(per_layout), 1)
        return scores


@register_task("toy_label_mapping")
class LabelMappingTask(Task):
    """Held-out (b): per-prompt words for two values of ``attribute`` (a scene field: colour, size, shape,
    position, background); the query is ranked between the two words."""

    name = "heldout_label_mapping"
    kind = "rank"
    metric = "accuracy"
    prompt = "This is a"
    zero_shot_text_examples = False
    attribute = "colour"  # what the prompt's words name

    def __init__(self, name: str | None = None, *, scenes_json: str, attribute: str | None = None, **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.scenes_json = scenes_json
        self.attribute = attribute or self.attribute
        self._support: list[Example] | None = None
        values = {ex.fields.get(self.attribute) for ex in self.support()}
        if None in values or len(values) < 2:
            raise ValueError(f"{self.name}: attribute {self.attribute!r} must be a field of every support scene in "
                             f"{scenes_json} with at least 2 values")

    def support(self) -> list[Example]:
        if self._support is None:
            self._support = _read_scenes(self.scenes_json, "support")
        return self._support

    def queries(self) -> list[Example]:
        return _read_scenes(self.scenes_json, "query")

    def answer(self, ex: Example) -> str:
        return f"{ex.fields['word']}."

    def candidates(self, ex: Example) -> list[str]:
        return [f"{w}." for w in ex.fields["words"]]

    def episode(self, query: Example, shots: list[Example], rng: random.Random) -> tuple[Example, list[Example]]:
        """Balanced shots of the query's value (of ``attribute``) and one other, and two fresh words bound to them."""
        key = self.attribute
        value = query.fields[key]
        other = rng.choice(sorted({ex.fields[key] for ex in self.support()} - {value}))
        words = rng.sample(HELDOUT_NONCE_WORDS, 2)
        names = {value: words[0], other: words[1]}
        k = len(shots)
        pools = {v: [ex for ex in self.support() if ex.fields[key] == v] for v in (value, other)}
        # sampled with replacement only when a pool is smaller than the shots asked for (tiny worlds)
        draw = lambda pool, n: rng.sample(pool, n) if len(pool) >= n else rng.choices(pool, k=n)  # noqa: E731
        chosen = draw(pools[value], k // 2) + draw(pools[other], k - k // 2)
        rng.shuffle(chosen)

        def bind(ex: Example) -> Example:
            return replace(ex, fields={**ex.fields, "word": names[ex.fields[key]], "words": sorted(words)})

        return bind(query), [bind(ex) for ex in chosen]

    def score(self, predictions: list, examples: list[Example]) -> dict[str, float]:
        references = [self.answer(ex) for ex in examples]
        return {self.metric: 100.0 * exact_match_accuracy(predictions, references, normalize=str.strip), "chance": 50.0}
