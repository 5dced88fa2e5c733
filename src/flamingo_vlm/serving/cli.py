"""``flamingo serve [MODEL_DIR]``: serve a saved model (by default the one ``flamingo demo`` trained)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_MODEL = Path("flamingo-demo") / "model"  # where `flamingo demo` (default --out) saves its model


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` command to a ``flamingo`` argparse subparsers object."""
    from ..modeling.sources import add_backbone_arguments
    from ..modeling.summary import DEVICE_HELP
    from .schemas import Limits

    d = Limits()
    p = subparsers.add_parser("serve", help="an HTTP API and a web page for few-shot prompting of a saved model")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL_DIR",
                   help=f"a directory written by save_pretrained (default: {DEFAULT_MODEL}, the model `flamingo demo` trains)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; mind who can reach it)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    add_backbone_arguments(p)
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--max-batch-size", type=int, default=8, help="requests per model call")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long the first request of a batch waits for more")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="the most a request may ask for")
    p.add_argument("--max-media", type=int, default=d.max_media, help="images + videos per request")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="the most pixels of one image or video frame (read from its header, before decoding)")
    p.add_argument("--max-request-pixels", type=int, default=d.max_request_pixels,
                   help="the most pixels of all images and frames of one request together (decompression bombs)")
    p.add_argument("--decode-budget-mb", type=float, default=d.decode_budget_bytes / 2**20,
                   help="memory for decoding and holding media across all requests at once; a request over what "
                        "is left waits, then gets 503")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20, help="the largest request body, in MiB (413 above)")
    p.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s,
                   help="a request whose body stalls this long between chunks gets 408 and its connection is closed")
    p.add_argument("--shutdown-grace-s", type=float, default=10.0,
                   help="on SIGTERM / Ctrl-C: how long running requests may finish before they are cut off")
    p.add_argument("--special-tokens-in-text", choices=("escape", "refuse", "allow"), default="escape",
                   help="the LM's special tokens (e.g. </s>) typed in prompts: tokenised as plain text (default), refused, or allowed")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level")
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
    from ..modeling.summary import default_device, run_banner
    from .schemas import Limits

    path = resolve_model_dir(args.model)
    print(f"loading {path} ...", flush=True)
    model, processor = load_flamingo(path, lm=getattr(args, "lm", None), vision=getattr(args, "vision", None))
    processor.special_tokens_in_text = args.special_tokens_in_text
    model.to(default_device(args.device))
    limits = Limits(max_new_tokens=args.max_new_tokens, max_media=args.max_media, max_image_pixels=args.max_image_pixels,
                    max_request_pixels=args.max_request_pixels, decode_budget_bytes=int(args.decode_budget_mb * 2**20),
                    max_body_bytes=int(args.max_body_mb * 2**20), body_timeout_s=args.body_timeout_s)
    app = create_app(model, processor, limits=limits, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                     model_name=path.resolve().name, presets=getattr(args, "presets", None))
    print(run_banner("serve", model, device=model.device), flush=True)
    print(f"flamingo serve: http://{args.host}:{args.port}/  (API: POST /v1/generate, /v1/score; GET /v1/model; docs: /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_grace_s)
    return 0
