"""``flamingo bench``: training and generation speed and memory, side by side with OpenFlamingo 2.0.1.

spec.py (BenchConfig presets), measure.py (the workloads and their timing, shared by both sides),
ours.py / openflamingo_side.py (the two sides, each a subprocess), runner.py (interleaving, medians,
ratios, table, JSON), cli.py (the command).
"""

from .runner import run_bench, table
from .spec import BenchConfig, load_bench_config

__all__ = ["BenchConfig", "load_bench_config", "run_bench", "table"]
