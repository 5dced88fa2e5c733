"""k-shot evaluation throughput with and without the run-wide media cache (issue 22).

    python -m flamingo_vlm.benchmark.kshot of-equal --queries 16 --shots 8 32 --out benchmarks/results/kshot-of-equal.json

The evaluation runner's answer path (``generate_texts`` with one :class:`MediaEncoder` for the run) on
random-init backbones of a bench preset's sizes: a support set of ``support`` images (preprocessed pixel
tensors, so no image decoding is timed) with VQA-style text, and ``queries`` query images; each query's
``k`` shots are drawn from the support set by its own seeded generator. Two encoders answer every query,
alternating (so load from other processes hits both):

- without: ``MediaEncoder(cache_size=0)``: every prompt batch runs the vision encoder and resampler on
  each distinct medium it shows, and projects their keys/values (k + 1 media per query at batch size 1);
- with: one cached ``MediaEncoder`` for the whole run, support images encoded once (timed apart as the
  one-off ``support_encode_s``), then per query only the query image and the text.

Per query and side: wall seconds, split into vision + resampler (``encode_media``), media keys/values
(``media_kv``), LM prefill (the first LM forward of the batch: the prompt) and the rest (decoding steps,
beam bookkeeping, tokenisation). The predictions of both sides are compared. ``per_query_amortized``
adds the one-off support encoding spread over a run of ``amortize_over`` queries (the issue's 256).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import torch

from ..inference import MediaEncoder, generate_texts
from .measure import autocast, environment, setup

EOC = "<|endofchunk|>"


def _words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(n))


def build_workload(spec: dict[str, Any], support: int, queries: int) -> tuple[list, list]:
    """(support items [(pixels [3, S, S], question, answer)], query items [(pixels, question)]), seeded."""
    size, vocab = spec["vision"]["image_size"], spec["lm"]["vocab_size"]
    g = torch.Generator().manual_seed(spec["seed"])
    rng = random.Random(spec["seed"])
    words = max(spec["tokens_per_shot"] - 6, 1)  # "Question: ... Short answer: <a><EOC>" ~ tokens_per_shot tokens with <image>
    shots = [(torch.randn(3, size, size, generator=g), _words(rng, words, vocab), _words(rng, 1, vocab)) for _ in range(support)]
    asked = [(torch.randn(3, size, size, generator=g), _words(rng, words, vocab)) for _ in range(queries)]
    return shots, asked


def kshot_prompt(support: list, query: tuple, k: int, rng: random.Random) -> list:
    """Interleaved prompt: k support examples drawn by ``rng``, each with its answer, then the query."""
    items: list = []
    for j in rng.sample(range(len(support)), k):
        pixels, question, answer = support[j]
        items += [pixels, f"Question: {question} Short answer: {answer}{EOC}"]
    pixels, question = query
    return items + [pixels, f"Question: {question} Short answer:"]


class _Timers:
    """Seconds spent in the model's encode_media and media_kv, and in the LM's first forward per batch."""

    def __init__(self, model) -> None:
        self.model = model
        self.seconds = {"vision_resampler": 0.0, "media_kv": 0.0, "prefill": 0.0}
        self.media = {"vision_resampler": 0, "media_kv": 0}  # media through encode_media / media_kv
        self._first = True
        self._start = 0.0

    def _wrap(self, name: str, field: str):
        original = getattr(self.model, name)

        def timed(x, *args, **kwargs):
            start = time.perf_counter()
            out = original(x, *args, **kwargs)
            self.seconds[field] += time.perf_counter() - start
            self.media[field] += x.shape[0]
            return out

        setattr(self.model, name, timed)  # an instance attribute: the class's method is untouched

    @contextmanager
    def installed(self):
        self._wrap("encode_media", "vision_resampler")
        self._wrap("media_kv", "media_kv")

        def pre(module, args, kwargs):
            self._start = time.perf_counter()

        def post(module, args, kwargs, out):
            if self._first:  # the prompt (beam search runs it once per prompt, then hands generate the cache)
                self.seconds["prefill"] += time.perf_counter() - self._start
                self._first = False

        hooks = [self.model.lm.register_forward_pre_hook(pre, with_kwargs=True), self.model.lm.register_forward_hook(post, with_kwargs=True)]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()
            del self.model.encode_media, self.model.media_kv

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.media = dict.fromkeys(self.media, 0)
        self._first = True


def run_kshot(
    spec: dict[str, Any], *, shots: Sequence[int] = (8, 32), queries: int = 16, support: int = 256, batch_size: int = 1,
    new_tokens: int = 5, num_beams: int = 3, amortize_over: int = 256, log=lambda msg: None,
) -> dict[str, Any]:
    """Both sides on every query at every shot count; returns per-query timings and the summary."""
    from .ours import build_backbones
    from .. import build_flamingo

    device = setup(spec)
    lm, vision, tokenizer = build_backbones(spec)
    torch.manual_seed(spec["seed"] + 1)
    model, processor = build_flamingo(lm, vision, tokenizer, **spec["flamingo"])
    model.to(device).eval()
    support_items, query_items = build_workload(spec, support, queries)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=num_beams)  # forced: equal decoding work
    timers = _Timers(model)
    result: dict[str, Any] = {
        "preset": spec["name"], "support": support, "queries": queries, "batch_size": batch_size, "new_tokens": new_tokens,
        "num_beams": num_beams, "amortize_over": amortize_over, "threads": torch.get_num_threads(), "environment": environment(device), "rows": [],
    }
    with timers.installed(), torch.inference_mode(), autocast(spec):
        for k in shots:
            prompts = [kshot_prompt(support_items, q, k, random.Random(f"{spec['seed']}/{k}/{i}")) for i, q in enumerate(query_items)]
            generate_texts(model, processor, prompts[:1], media=MediaEncoder(model, processor, cache_size=0), **kw)  # warm-up
            cached = MediaEncoder(model, processor)
            timers.reset()
            start = time.perf_counter()
            cached.prefetch([s[0] for s in support_items])  # once per run: the support set's tokens and keys/values
            once = {"support_encode_s": time.perf_counter() - start, **{f"support_{n}_s": v for n, v in timers.seconds.items()},
                    "support_images_encoded": timers.media["vision_resampler"]}
            sides: dict[str, list] = {"without": [], "with": []}
            texts: dict[str, list] = {"without": [], "with": []}
            for b in range(0, queries, batch_size):
                batch = prompts[b : b + batch_size]
                for side, media in (("without", MediaEncoder(model, processor, cache_size=0)), ("with", cached)):
                    timers.reset()
                    start = time.perf_counter()
                    texts[side] += generate_texts(model, processor, batch, media=media, **kw)
                    total = time.perf_counter() - start
                    parts = dict(timers.seconds)
                    parts["decode_other"] = total - sum(parts.values())
                    sides[side].append({
                        "total": total / len(batch), **{n: v / len(batch) for n, v in parts.items()},
                        "images_encoded": timers.media["vision_resampler"] / len(batch), "images_projected": timers.media["media_kv"] / len(batch),
                    })
                log(f"{k}-shot queries {b + len(batch)}/{queries}: without {sides['without'][-1]['total']:.2f} s, with {sides['with'][-1]['total']:.2f} s")
            row: dict[str, Any] = {"shots": k, **once, "identical_predictions": texts["without"] == texts["with"]}
            for side, per in sides.items():
                row[side] = {n: statistics.mean(p[n] for p in per) for n in per[0]}
                row[side]["median_total"] = statistics.median(p["total"] for p in per)
            row["with"]["per_query_amortized"] = row["with"]["total"] + once["support_encode_s"] / amortize_over
            row["speedup"] = row["without"]["total"] / row["with"]["total"]
            row["speedup_amortized"] = row["without"]["total"] / row["with"]["per_query_amortized"]
            result["rows"].append(row)
    return result


def table(result: dict[str, Any]) -> str:
    """Markdown rows: seconds per query by part, without and with the cache."""
    n = result["amortize_over"]
    lines = [
        "| shots | side | s/query | vision+resampler | media K/V | LM prefill | decode+other | support once (s) | s/query incl. support over "
        f"{n} queries | speed-up | identical |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        for side in ("without", "with"):
            s = row[side]
            once = f"{row['support_encode_s']:.1f}" if side == "with" else ""
            incl = f"{s['per_query_amortized']:.3f}" if side == "with" else f"{s['total']:.3f}"
            speed = f"{row['speedup']:.2f}x ({row['speedup_amortized']:.2f}x incl.)" if side == "with" else ""
            lines.append(
                f"| {row['shots']} | {side} | {s['total']:.3f} | {s['vision_resampler']:.3f} | {s['media_kv']:.3f} | {s['prefill']:.3f} | "
                f"{s['decode_other']:.3f} | {once} | {incl} | {speed} | {row['identical_predictions'] if side == 'with' else ''} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .cli import resolve_preset
    from .spec import load_bench_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="bench preset (name in benchmarks/configs or a YAML path), e.g. of-equal")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--shots", type=int, nargs="+", default=[8, 32])
    p.add_argument("--queries", type=int, default=16, help="queries timed per shot count (the issue's full run: 256)")
    p.add_argument("--support", type=int, default=256, help="support images the shots are drawn from")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--amortize-over", type=int, default=256, help="queries of a full run, to spread the one-off support encoding over")
    p.add_argument("--new-tokens", type=int, default=5)
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--out", default=None, help="write the result JSON here")
    args = p.parse_args(argv)
    if max(args.shots) > args.support:
        p.error("shots must not exceed the support set")
    spec = load_bench_config(resolve_preset(args.config), args.overrides).to_dict()
    result = run_kshot(
        spec, shots=args.shots, queries=args.queries, support=args.support, batch_size=args.batch_size,
        new_tokens=args.new_tokens, num_beams=args.num_beams, amortize_over=args.amortize_over, log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    result["command"] = "python -m flamingo_vlm.benchmark.kshot " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
