"""``flamingo convert``: OpenFlamingo and IDEFICS checkpoints to save_pretrained directories, and back."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _vision(args: argparse.Namespace, out: Path):
    """(vision argument, vision_type, vision_kwargs) for load_openflamingo; an open_clip state-dict file is
    mapped onto a transformers CLIP vision model saved under OUT/vision (no open_clip needed)."""
    if args.vision.endswith(STATE_DICT_SUFFIXES) and os.path.isfile(args.vision):
        from .clip_vision import clip_vision_from_open_clip

        model = clip_vision_from_open_clip(args.vision, head_width=args.vision_head_width, quick_gelu=args.vision_act == "quick_gelu")
        vision_dir = (out / "vision").resolve()
        model.save_pretrained(vision_dir)
        return str(vision_dir), "clip", {}
    if args.vision_type == "open_clip":
        return args.vision, "open_clip", {"pretrained": args.vision_pretrained}
    return args.vision, args.vision_type, {}


def _check_local_path(path: str, what: str) -> None:
    """A ``--vision``/``--checkpoint`` that can only be a local path (a state-dict file name, or a path that is
    absolute or starts with ./ ../ ~) but does not exist: say so, before anything tries it as a hub name."""
    explicit = path.endswith(STATE_DICT_SUFFIXES) or path.startswith(("/", "./", "../", "~")) or path.count("/") > 1
    if explicit and not os.path.exists(os.path.expanduser(path)):
        raise FileNotFoundError(f"{what} {path!r}: no such file or directory")


def cmd_from_openflamingo(args: argparse.Namespace) -> int:
    """Convert into a temporary directory beside --out, renamed to --out once everything is written: a failed
    conversion leaves nothing behind."""
    import shutil
    import tempfile

    import torch

    from .openflamingo import load_openflamingo, make_tokenizer_loadable_by_openflamingo

    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r}: no such file")
    _check_local_path(args.vision, "--vision")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} exists and is not an empty directory: remove it or choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        vision, vision_type, vision_kwargs = _vision(args, work)
        lm_kwargs = {"dtype": getattr(torch, args.dtype)}
        if args.trust_remote_code:
            lm_kwargs["trust_remote_code"] = True
        model, processor, report = load_openflamingo(
            args.checkpoint, args.lm, vision, args.tokenizer, vision_type=vision_type, vision_post_norm=args.vision_post_norm,
            lm_kwargs=lm_kwargs, vision_kwargs=vision_kwargs,
        )
        model.save_pretrained(work)  # a vision model under work/vision is recorded relative to it
        processor.save_pretrained(work)
        make_tokenizer_loadable_by_openflamingo(work)  # the docs give this directory as OpenFlamingo's tokenizer_path
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    c = model.config
    print(
        f"converted {args.checkpoint} -> {out}: xattn every {c.cross_attn_every_n_layers} layer(s) ({len(model.xattn_blocks)} blocks), "
        f"<image>={c.media_token_id} <|endofchunk|>={c.end_of_chunk_token_id}, LM in {c.lm_dtype}"
    )
    for line in report.lines():
        print(f"  note: {line}")
    return 0


def cmd_to_openflamingo(args: argparse.Namespace) -> int:
    """Write the checkpoint and, beside it, the tokenizer in a form OpenFlamingo's transformers loads."""
    import torch

    from .. import load_flamingo
    from .openflamingo import export_openflamingo, make_tokenizer_loadable_by_openflamingo

    model, processor = load_flamingo(args.model)
    state = export_openflamingo(model, frame_embs=args.frame_embs, check_architecture=not args.any_architecture)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    tokenizer_dir = Path(args.tokenizer_out) if args.tokenizer_out else out.with_name(out.stem + "_tokenizer")
    processor.tokenizer.save_pretrained(tokenizer_dir)
    make_tokenizer_loadable_by_openflamingo(tokenizer_dir)
    print(f"wrote {len(state)} tensors in OpenFlamingo's layout to {out}; its tokenizer (OpenFlamingo's tokenizer_path) to {tokenizer_dir}")
    return 0


def cmd_from_idefics(args: argparse.Namespace) -> int:
    import torch

    from .idefics import convert_idefics

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model, _, report = convert_idefics(args.source, args.out, args.tokenizer, dtype=dtype)
    c = model.config
    print(
        f"converted {args.source} -> {args.out}: xattn every {c.cross_attn_every_n_layers} layer(s) ({len(model.xattn_blocks)} blocks, "
        f"from layer 0), resampler {'on' if c.use_resampler else 'off'}, <image>={c.media_token_id}; LM in {args.out}/lm, "
        f"vision in {args.out}/vision"
    )
    for line in report.lines():
        print(f"  note: {line}")
    return 0


def cmd_to_idefics(args: argparse.Namespace) -> int:
    from .. import load_flamingo
    from .idefics import export_idefics, idefics_processor

    model, processor = load_flamingo(args.model)
    export_idefics(model).save_pretrained(args.out)
    idefics_processor(model, processor).save_pretrained(args.out)
    print(f"wrote an IdeficsForVisionText2Text and its IdeficsProcessor to {args.out}")
    return 0


def add_convert_parser(sub) -> None:
    convert = sub.add_parser("convert", help="convert checkpoints from/to other Flamingo implementations")
    conv_sub = convert.add_subparsers(dest="convert_command", required=True)

    of = conv_sub.add_parser("openflamingo", help="an OpenFlamingo checkpoint.pt -> a save_pretrained directory")
    of.add_argument("checkpoint", help="OpenFlamingo checkpoint.pt (state dict; module./FSDP prefixes are fine)")
    of.add_argument("--lm", required=True, help="its language model: hub name or path (e.g. anas-awadalla/mpt-7b)")
    of.add_argument(
        "--vision", required=True,
        help="its CLIP ViT: a transformers CLIP name/path (openai/clip-vit-large-patch14 for ViT-L-14 'openai'), an "
        "open_clip vision state-dict file (.pt/.bin/.safetensors, loaded without open_clip), or with "
        "--vision-type open_clip an open_clip model name",
    )
    of.add_argument("--out", required=True, help="output directory (load it with flamingo_vlm.load_flamingo)")
    of.add_argument("--tokenizer", default=None, help="the LM's tokenizer, if not at --lm")
    of.add_argument("--vision-type", default=None, choices=["clip", "open_clip"], help="how to read --vision (default: guessed)")
    of.add_argument("--vision-pretrained", default="openai", help="open_clip pretrained tag (with --vision-type open_clip)")
    of.add_argument("--vision-head-width", type=int, default=64, help="channels per head of an open_clip state-dict ViT")
    of.add_argument("--vision-act", default="quick_gelu", choices=["quick_gelu", "gelu"], help="activation of an open_clip state-dict ViT")
    of.add_argument(
        "--vision-post-norm", action="store_true",
        help="apply ln_post to the patch tokens, as OpenFlamingo does when run with open_clip >= 2.23 (its released "
        "models were trained without)",
    )
    of.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="dtype of the LM, recorded in the saved config (load_flamingo loads it so again); the bridge stays float32",
    )
    of.add_argument("--trust-remote-code", action="store_true", help="for LMs with custom code (e.g. mpt-1b-redpajama-200b)")
    of.set_defaults(func=cmd_from_openflamingo)

    to = conv_sub.add_parser("to-openflamingo", help="a save_pretrained directory -> an OpenFlamingo checkpoint.pt")
    to.add_argument("model", help="a directory written by FlamingoModel.save_pretrained")
    to.add_argument("--out", required=True, help="checkpoint file to write (torch.save of a state dict)")
    to.add_argument("--tokenizer-out", default=None, help="directory for the tokenizer (default: OUT's name + _tokenizer, beside it)")
    to.add_argument("--frame-embs", action="store_true", help="write the resampler's time embeddings as perceiver.frame_embs")
    to.add_argument("--any-architecture", action="store_true", help="skip the check against the sizes OpenFlamingo's factory builds")
    to.set_defaults(func=cmd_to_openflamingo)

    ide = conv_sub.add_parser("idefics", help="an IdeficsForVisionText2Text (e.g. HuggingFaceM4/idefics-9b) -> a save_pretrained directory")
    ide.add_argument("source", help="hub id or local directory of an IdeficsForVisionText2Text checkpoint")
    ide.add_argument("--out", required=True, help="output directory (the LM under lm/, the vision tower under vision/)")
    ide.add_argument("--tokenizer", default=None, help="its tokenizer, if not at SOURCE")
    ide.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the frozen backbones (auto: the checkpoint's); the bridge is kept in float32",
    )
    ide.set_defaults(func=cmd_from_idefics)

    to_ide = conv_sub.add_parser("to-idefics", help="a save_pretrained directory -> an IdeficsForVisionText2Text directory")
    to_ide.add_argument("model", help="a directory written by FlamingoModel.save_pretrained (e.g. by `flamingo convert idefics`)")
    to_ide.add_argument("--out", required=True, help="directory for IdeficsForVisionText2Text.save_pretrained and the tokenizer")
    to_ide.set_defaults(func=cmd_to_idefics)
