"""Run by tests/test_train_distributed.py under torchrun: `flamingo train` once per argument group
(groups separated by "::"), all in one process group, so one torchrun start covers several runs.

With FLAMINGO_SAVE_MEMORY_LOG=PATH, each process appends to PATH.rank<r> its resident memory before
and its peak during every checkpoint save (the kernel's high-water mark, reset just before the save)."""

import json
import os
import sys

import torch.distributed as dist

from flamingo_vlm.training.cli import _add_arguments, run_train_cli


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_saves(log: str) -> None:
    from flamingo_vlm.training import loop

    real = loop.save_checkpoint

    def measured(output_dir, step, **kwargs):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        before = _status_kib("VmRSS")
        path = real(output_dir, step, **kwargs)
        record = {"output_dir": str(output_dir), "step": step, "rss_kib": before, "peak_kib": _status_kib("VmHWM")}
        with open(f"{log}.rank{dist.get_rank()}", "a") as f:
            f.write(json.dumps(record) + "\n")
        return path

    loop.save_checkpoint = measured


if __name__ == "__main__":
    import argparse

    if os.environ.get("FLAMINGO_SAVE_MEMORY_LOG"):
        measure_saves(os.environ["FLAMINGO_SAVE_MEMORY_LOG"])

    groups, current = [], []
    for arg in sys.argv[1:] + ["::"]:
        if arg == "::":
            groups.append(current)
            current = []
        else:
            current.append(arg)
    dist.init_process_group("gloo")  # held across the runs (run_train_cli ends only a group it started)
    for group in groups:
        parser = argparse.ArgumentParser()
        _add_arguments(parser)
        run_train_cli(parser.parse_intermixed_args(group))
    dist.destroy_process_group()
