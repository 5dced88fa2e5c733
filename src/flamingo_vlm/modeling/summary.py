"""What a run prints at its start: where it writes, how large the model is, where it runs."""

from __future__ import annotations

from typing import Any


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts of a FlamingoModel (trainable: the bridge's own parameters)."""
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


DEVICE_HELP = "cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)"


def default_device(device: Any = None) -> str:
    """``device`` as given, else ``"cuda"`` when available, else ``"cpu"`` (the default of every command)."""
    import torch

    return str(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")


def run_banner(command: str, model: Any, *, device: Any, output: Any = None) -> str:
    """One line: ``flamingo train: output runs/x | parameters 1.20M trainable / 125.30M total | device cpu``."""
    trainable, total = parameter_counts(model)
    parts = [f"output {output}"] if output is not None else []
    parts += [f"parameters {_count(trainable)} trainable / {_count(total)} total", f"device {device}"]
    return f"flamingo {command}: " + " | ".join(parts)


__all__ = ["default_device", "parameter_counts", "run_banner"]
