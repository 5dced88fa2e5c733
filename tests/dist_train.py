"""Run by tests/test_train_distributed.py under torchrun: `flamingo train` once per argument group
(groups separated by "::"), all in one process group, so one torchrun start covers several runs."""

import sys

import torch.distributed as dist

from flamingo_vlm.training.cli import _add_arguments, run_train_cli

if __name__ == "__main__":
    import argparse

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
