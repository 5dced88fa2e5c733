"""``flamingo bench [CONFIG] [key=value ...] [--peer-python PYTHON]``.

    flamingo bench benchmarks/configs/of-equal.yaml --peer-python /path/to/ofenv/bin/python --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parents[3] / "benchmarks" / "configs"


def resolve_preset(name: str | None) -> Path | None:
    """A YAML path, or the name of a preset in the repository's benchmarks/configs (e.g. ``of-equal``)."""
    if name is None:
        return None
    path = Path(name)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name}.yaml"
    if preset.is_file():
        return preset
    known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []
    raise FileNotFoundError(f"bench config {name!r} is neither a file nor a preset (presets: {known})")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="speed and memory of training and generation, beside OpenFlamingo")
    p.add_argument("config", nargs="?", default=None, help="YAML preset (path, or a name in benchmarks/configs: of-equal, gpu-1b, tiny)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override preset keys, e.g. repeats=5 workloads=[train]")
    p.add_argument("--peer-python", default=None,
                   help="python of an OpenFlamingo 2.0.1 environment (see benchmarks/README.md); without it only our side runs")
    p.add_argument("--out", default="bench-results", help="a .json file, or a directory for <preset name>.json")
    p.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    p.add_argument("--report", default=None, metavar="JSON", help="no runs: re-summarise a results JSON and print its table")
    p.set_defaults(func=run_bench_cli)
    return p


def run_bench_cli(args: argparse.Namespace) -> int:
    from .runner import run_bench, summarize, table, write_result
    from .spec import BenchConfig, load_bench_config

    if args.report:
        result = json.loads(Path(args.report).read_text())
        config = BenchConfig(**{k: v for k, v in result["config"].items() if k != "cache_dir"})
        result["summary"] = summarize(result["runs"], config)
        print(table(result))
        return 0

    config = load_bench_config(resolve_preset(args.config), args.overrides or [])
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_bench(config, peer_python=args.peer_python, log=log, on_run=lambda partial: write_result(partial, args.out))
    result["command"] = "flamingo " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    path = write_result(result, args.out)
    print(table(result))
    print(f"\nresults: {path}")
    return 0
