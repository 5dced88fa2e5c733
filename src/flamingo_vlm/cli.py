"""The ``flamingo`` command."""

from __future__ import annotations

import argparse
import json
import re
import sys

MEDIA_PLACEHOLDER = re.compile(r"<image:([^>]+)>")


def _parse_prompt(prompt: str) -> list:
    """'Two cats <image:cats.jpg> Output:' -> ['Two cats ', Path('cats.jpg'), ' Output:']."""
    from pathlib import Path

    items, pos = [], 0
    for m in MEDIA_PLACEHOLDER.finditer(prompt):
        if m.start() > pos:
            items.append(prompt[pos : m.start()])
        items.append(Path(m.group(1)))
        pos = m.end()
    if pos < len(prompt):
        items.append(prompt[pos:])
    return items


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from . import load_flamingo
    from .modeling.summary import default_device, run_banner

    model, processor = load_flamingo(args.model, lm=args.lm, vision=args.vision)
    model.to(default_device(args.device))
    print(run_banner("generate", model, device=model.device), file=sys.stderr, flush=True)  # stdout: the answer only
    batch = processor(_parse_prompt(args.prompt)).to(model.device)
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.temperature > 0,
            **({"temperature": args.temperature} if args.temperature > 0 else {}),
        )
    print(processor.decode(out[0, batch["input_ids"].shape[1] :]).strip())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from . import FlamingoConfig

    config = FlamingoConfig.load(args.model)
    print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .toyworld.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, cache_dir=args.cache_dir, progress=not args.no_progress, rebuild=args.rebuild)
    return 0


def _toy_presets() -> list[dict]:
    from .toyworld.presets import toy_presets

    return toy_presets()


def build_parser() -> argparse.ArgumentParser:
    from .benchmark.cli import add_bench_parser
    from .modeling.sources import add_backbone_arguments
    from .modeling.summary import DEVICE_HELP
    from .convert.cli import add_convert_parser
    from .evaluation.cli import add_eval_parser
    from .serving.cli import add_serve_parser
    from .training.cli import add_train_parser

    parser = argparse.ArgumentParser(prog="flamingo", description="Flamingo visual language models on any Hugging Face LM.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the whole pipeline on the built-in toy world (offline, CPU)")
    demo.add_argument("--quick", action="store_true", help="a smaller world and a shorter run")
    demo.add_argument("--out", default="flamingo-demo", help="where results.json, few_shot.png and the model go")
    demo.add_argument("--seed", type=int, default=0, help="seed of the bridge's training and the shot sampling")
    demo.add_argument("--cache-dir", default=None, help="toy world + backbones cache (default ~/.cache/flamingo-vlm)")
    demo.add_argument("--rebuild", action="store_true",
                      help="generate the toy world and pretrain its backbones here, instead of the backbones shipped with the package")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    add_train_parser(sub)
    add_eval_parser(sub)
    add_convert_parser(sub)
    add_serve_parser(sub).set_defaults(presets=_toy_presets)  # the page's examples: toy-world scenes
    add_bench_parser(sub)

    gen = sub.add_parser("generate", help="generate text for an interleaved prompt")
    gen.add_argument("--model", required=True, help="a directory written by FlamingoModel.save_pretrained")
    gen.add_argument("--prompt", required=True, help="text with images as <image:path>, e.g. '<image:cat.jpg>Output:'")
    gen.add_argument("--max-new-tokens", type=int, default=20, help="the most tokens to generate")
    gen.add_argument("--num-beams", type=int, default=3, help="beam search width (1: greedy); ignored when sampling")
    gen.add_argument("--temperature", type=float, default=0.0, help="> 0 samples instead of beam search")
    add_backbone_arguments(gen)
    gen.add_argument("--device", default=None, help=DEVICE_HELP)
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="print a saved model's configuration")
    info.add_argument("model", help="a directory written by FlamingoModel.save_pretrained")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"flamingo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
