"""``flamingo train CONFIG [key=value ...]``: build the model the config names and train it.

    flamingo train configs/train/flamingo-3b.yaml steps=1000 datasets.0.batch_size=32
    torchrun --nproc-per-node 8 -m flamingo_vlm.training.cli configs/train/flamingo-9b.yaml --resume
    flamingo train configs/train/flamingo-80b.yaml --dry-run --world-size 64   # check a launch, build nothing
"""

from __future__ import annotations

import argparse
import os
import sys


def build_model(config):
    """(model, processor) for a TrainConfig: a new bridge on ``lm`` + ``vision`` (seeded by ``seed``, so
    every process builds the same one), or the bridge saved in ``init_from``. With
    ``sharded_construction``, built already sharded over the torchrun processes (see ``construct``)."""
    import torch

    from .. import build_flamingo, load_flamingo

    if config.sharded_construction:
        from .construct import build_sharded_model
        from .distributed import init_distributed

        return build_sharded_model(config, init_distributed(config.device))

    from .finetune import apply_finetuning

    torch.manual_seed(config.seed)
    if config.init_from:
        model, processor = load_flamingo(config.init_from, lm=config.lm, vision=config.vision, tokenizer=config.tokenizer,
                                         lm_kwargs=config.lm_kwargs or None, vision_kwargs=config.vision_kwargs or None)
    elif not config.lm or not config.vision:
        raise ValueError("the config must name `lm` and `vision` backbones (or `init_from`, a saved Flamingo model)")
    else:
        model, processor = build_flamingo(config.lm, config.vision, config.tokenizer, lm_kwargs=config.lm_kwargs or None,
                                          vision_kwargs=config.vision_kwargs or None, **config.flamingo)
    apply_finetuning(model, processor, config)  # fine-tuning: backbone parts trained, input size
    return model, processor


def prefetch_backbones(config) -> None:
    """Fetch the hub backbones (and tokenizer) the config names into the local Hugging Face cache; local
    paths, open_clip and timm names are left to their loaders."""
    import os

    names = [config.lm, config.tokenizer]
    if config.flamingo.get("vision_type") in (None, "clip", "siglip"):
        names.append(config.vision)
    names = [n for n in dict.fromkeys(names) if n and not os.path.exists(os.path.expanduser(str(n)))]
    if not names:
        return
    from huggingface_hub import snapshot_download

    revision = (config.lm_kwargs or {}).get("revision")
    for name in names:
        snapshot_download(name, revision=revision if name == config.lm else None,
                          allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"])


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` command to a ``flamingo`` argparse subparsers object."""
    p = subparsers.add_parser("train", help="train a Flamingo bridge on a dataset mixture from a YAML config (see docs/training.md)")
    _add_arguments(p)
    p.set_defaults(func=run_train_cli)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML file: datasets, steps, lr, backbones, ... (see docs/training.md)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override config keys, e.g. steps=100 datasets.0.batch_size=8 (right after CONFIG, or with --set)")
    p.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of the whole run (overrides the config's `steps`)")
    p.add_argument("--output-dir", default=None,
                   help="where metrics.jsonl, checkpoints/ and final/ go (overrides `output_dir`); it must be empty unless resuming")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in output_dir from its latest checkpoint (same configuration only)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start over even if the config says resume")
    p.add_argument("--overwrite", action="store_true", help="delete the run already in output_dir and start a new one there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: a log line every `log_every` steps instead")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config at --world-size (batches, lanes, mesh, output_dir), build the model on the meta "
                        "device, print parameters, memory per rank and bytes communicated per step, and exit")
    p.add_argument("--world-size", type=int, default=None, help="processes the dry run plans for (default: WORLD_SIZE, or 1)")


def run_train_cli(args: argparse.Namespace) -> int:
    """``flamingo train``: load the config (+ overrides), build the model, train, report."""
    import torch.distributed as dist

    from ..modeling.card import write_model_card
    from ..modeling.summary import default_device, run_banner
    from .config import load_train_config
    from .loop import train
    from .rundir import prepare_run_dir
    from .distributed import init_distributed
    from .plan import check_launch, dry_run, world_size_from_env

    overrides = list(args.overrides or []) + list(getattr(args, "set_overrides", None) or [])
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume is not None:
        overrides.append(f"resume={str(args.resume).lower()}")
    config = load_train_config(args.config, overrides)
    world_size = args.world_size if getattr(args, "world_size", None) is not None else world_size_from_env()
    if getattr(args, "dry_run", False):
        dry_run(config, world_size)
        return 0
    if getattr(args, "world_size", None) is not None and args.world_size != world_size_from_env():
        raise ValueError(f"--world-size {args.world_size} is for --dry-run; this launch has {world_size_from_env()} process(es)")
    check_launch(config, world_size)  # before anything is downloaded or built
    owns_process_group = not dist.is_initialized()  # train() joins torchrun's group; this command ends it
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0:  # one process checks and records the run (the others would see its record)
        prepare_run_dir(config.to_dict(), overwrite=getattr(args, "overwrite", False))
    try:
        env = init_distributed(config.device)  # the group exists before anything is fetched
        if env.local_rank == 0:
            prefetch_backbones(config)  # one download per node; the other processes then read the cache
        env.barrier()
        model, processor = build_model(config)
        if rank == 0:
            print(run_banner("train", model, device=default_device(config.device), output=config.output_dir), flush=True)
        result = train(model, processor, config, progress=not args.no_progress)
        if not dist.is_initialized() or dist.get_rank() == 0:
            if result.history:
                last = result.history[-1]
                print(f"step {last['step']}: loss {last['loss']:.4f}")
            if result.final_dir:
                write_model_card(model, result.final_dir, training=config.to_dict())  # what it was trained on, for sharing
                print(f"model: {result.final_dir}")
    finally:
        if owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m flamingo_vlm.training.cli`` (what torchrun launches)."""
    parser = argparse.ArgumentParser(prog="flamingo train", description="Train a Flamingo bridge.")
    _add_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # KEY=VALUE overrides may come before or after the flags
    try:
        return run_train_cli(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"flamingo train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
