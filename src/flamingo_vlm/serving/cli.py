"""``flamingo serve [MODEL_DIR]``: serve a saved model (by default the one ``flamingo demo`` trained)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_MODEL = Path("flamingo-demo") / "model"  # where `flamingo demo` (default --out) saves its model


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` command to a ``flamingo`` argparse subparsers object."""
    from .schemas import Limits

    d = Limits()
    p = subparsers.add_parser("serve", help="an HTTP API and a web page for few-shot prompting of a saved model")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL_DIR",
                   help=f"a directory written by save_pretrained (default: {DEFAULT_MODEL}, the model `flamingo demo` trains)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="e.g. cuda; default: cpu")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests per model call")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long the first request of a batch waits for more")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="the most a request may ask for")
    p.add_argument("--max-media", type=int, default=d.max_media, help="images + videos per request")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20)
    p.add_argument("--special-tokens-in-text", choices=("escape", "refuse", "allow"), default="escape",
                   help="the LM's special tokens (e.g. </s>) typed in prompts: tokenised as plain text (default), refused, or allowed")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run_serve_cli)
    return p


def resolve_model_dir(model: str | None) -> Path:
    if model is not None:
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"no model directory {path}: pass a directory written by FlamingoModel.save_pretrained")
        return path
    if not DEFAULT_MODEL.is_dir():
        raise FileNotFoundError(
            f"no MODEL_DIR given and no {DEFAULT_MODEL} here: run `flamingo demo` first (it trains the toy-world model "
            f"and saves it to {DEFAULT_MODEL}), or pass a directory written by save_pretrained"
        )
    return DEFAULT_MODEL


def run_serve_cli(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise ValueError(f"flamingo serve needs FastAPI and uvicorn ({e}): pip install 'fastapi>=0.110' 'uvicorn>=0.29'") from e
    from .. import load_flamingo
    from .schemas import Limits

    path = resolve_model_dir(args.model)
    print(f"loading {path} ...", flush=True)
    model, processor = load_flamingo(path)
    processor.special_tokens_in_text = args.special_tokens_in_text
    if args.device:
        model.to(args.device)
    limits = Limits(max_new_tokens=args.max_new_tokens, max_media=args.max_media, max_image_pixels=args.max_image_pixels,
                    max_body_bytes=int(args.max_body_mb * 2**20))
    app = create_app(model, processor, limits=limits, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                     model_name=str(path), presets=getattr(args, "presets", None))
    print(f"flamingo serve: http://{args.host}:{args.port}/  (API: POST /v1/generate, /v1/score; GET /v1/model)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
