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


def run_banner(command: str, model: Any, *, device: Any, output: Any = None) -> str:
    """One line: ``flamingo train: output runs/x | parameters 1.20M trainable / 125.30M total | device cpu``."""
    trainable, total = parameter_counts(model)
    parts = [f"output {output}"] if output is not None else []
    parts += [f"parameters {_count(trainable)} trainable / {_count(total)} total", f"device {device}"]
    return f"flamingo {command}: " + " | ".join(parts)


__all__ = ["parameter_counts", "run_banner"]
