"""Run under torchrun (or as one process) by tests/test_train_construct.py and benchmarks: build the model of
CONFIG (key=value overrides after it) the way `flamingo train` does, then run one forward on a fixed
batch. Rank 0 saves the logits to OUT.pt; every rank writes its peak resident memory while building and
loading (the kernel's high-water mark) to OUT.rank<r>.json."""

import json
import sys

import torch
import torch.distributed as dist
from PIL import Image

from flamingo_vlm.training import load_train_config
from flamingo_vlm.training.cli import build_model
from flamingo_vlm.training.distributed import init_distributed, prepare_model


def peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def fixed_batch(processor):
    red, green = Image.new("RGB", (40, 36), (220, 20, 30)), Image.new("RGB", (40, 36), (10, 200, 40))
    return processor(
        [["a red", red, "circle<|endofchunk|>", green, "two cats"], ["dog", green, "Output: a"]], padding_side="right"
    )


if __name__ == "__main__":
    config_path, out, *overrides = sys.argv[1:]
    config = load_train_config(config_path, overrides)
    env = init_distributed(config.device)
    model, processor = build_model(config)
    prepare_model(model, config, env)  # as train() does (nothing more for a sharded construction)
    peak = peak_kib()
    model.eval()
    batch = fixed_batch(processor)
    with torch.no_grad():
        logits = model(
            **{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values", "frame_mask")}
        ).logits
    if env.rank == 0:
        torch.save(logits.float().cpu(), f"{out}.pt")
    with open(f"{out}.rank{env.rank}.json", "w") as f:
        json.dump({"peak_kib": peak, "world_size": env.world_size}, f)
    if dist.is_initialized():
        dist.destroy_process_group()
