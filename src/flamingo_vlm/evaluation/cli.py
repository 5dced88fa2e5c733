"""``flamingo eval CONFIG``: few-shot evaluation from a YAML config (see docs/evaluation.md).

    model: runs/flamingo            # a save_pretrained directory, loaded with flamingo_vlm.load_flamingo
    data_root: /data                # relative task paths resolve here (default: the config's folder)
    shots: [0, 4, 8]
    seeds: [0, 1, 2]
    selection: random               # or rices
    protocol: paper                 # or openflamingo (docs/evaluation.md, "Protocols")
    out: results/eval.json
    tasks:
      - type: coco_captioning
        karpathy_json: coco/dataset_coco.json
        image_dir: coco

Any key can be overridden by a flag (``--limit 20 --shots 0,4 --out x.json``) or by ``--set key.path=value``
(``--set tasks.0.image_dir=/data/coco``); unknown keys are errors that name the key.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from ..modeling.sources import add_backbone_arguments
from ..modeling.summary import DEVICE_HELP
from ..yaml_config import apply_overrides, from_dict, parse_override, read_yaml_mapping

PATH_KEY_SUFFIXES = ("json", "jsonl", "_dir", "_file", "_root", "folder")


@dataclass
class EvalConfig:
    """One ``flamingo eval`` run. Task specs stay mappings: each task type takes its own keys (see
    :func:`flamingo_vlm.evaluation.task.build_task`)."""

    model: str | None = None  # a save_pretrained directory
    tasks: list[dict[str, Any]] = field(default_factory=list)
    data_root: str | None = None  # relative task paths resolve here (default: the config's folder)
    shots: list[int] = field(default_factory=lambda: [0, 4, 8])
    seeds: list[int] = field(default_factory=lambda: [0])
    selection: Literal["random", "rices"] = "random"
    protocol: Literal["paper", "openflamingo"] = "paper"  # see flamingo_vlm.evaluation.protocol
    batch_size: int = 8
    max_rows: int = 64
    limit: int | None = None
    ensemble: int = 1
    out: str | None = None  # default: <config stem>-results.json in the working directory
    rices_cache_dir: str | None = None
    device: str | None = None
    lm: str | None = None  # the LM's location, if not where the saved model's config names it
    vision: str | None = None  # likewise for the vision encoder
    resume: bool = True
    progress: bool = True


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` command to a ``flamingo`` argparse subparsers object."""
    p = subparsers.add_parser("eval", help="few-shot evaluation on standard benchmarks from a YAML config")
    p.add_argument("config", help="YAML file: model, tasks, shots, seeds, ... (see docs/evaluation.md)")
    p.add_argument("--model", default=None, help="saved Flamingo directory (overrides the config's `model`)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only N queries of each task (the first N; a seeded random N per seed under --protocol openflamingo)")
    p.add_argument("--shots", type=_int_list, default=None, help="e.g. 0,4,8")
    p.add_argument("--seeds", type=_int_list, default=None, help="e.g. 0,1,2 (random shot selection)")
    p.add_argument("--selection", choices=["random", "rices"], default=None,
                   help="how shots are chosen: random (the paper's) or rices (retrieval by image similarity)")
    p.add_argument("--protocol", choices=["paper", "openflamingo"], default=None,
                   help="prompts, decoding, scoring and sampling choices: the paper's (default) or OpenFlamingo's eval code's")
    p.add_argument("--tasks", default=None, help="comma-separated task names: run only these")
    p.add_argument("--out", default=None, help="results JSON (a .txt table is written beside it)")
    p.add_argument("--batch-size", type=int, default=None, help="queries per model call (default 8)")
    p.add_argument("--ensemble", type=int, default=None, help="rank tasks: average over this many shot orders")
    p.add_argument("--no-resume", dest="resume", action="store_false", default=None, help="recompute runs already in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars (for logs)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    add_backbone_arguments(p)
    p.add_argument("--write-train-data", default=None, metavar="DIR",
                   help="evaluate nothing: write each task's training split as instruction records DIR/<task>.jsonl (the "
                        "eval prompt, the first --shots value as in-context shots, the first seed) for `flamingo train` "
                        "(format: instruct); no model needed")
    p.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set max_rows=32 --set tasks.0.image_dir=/data/coco (repeatable)")
    p.set_defaults(func=run_eval_cli)
    return p


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        return str(base / value)
    return str(Path(value).expanduser()) if isinstance(value, str) else value


def resolve_task_paths(spec: dict, base: Path) -> dict:
    """Relative paths in a task config (keys ending in json, jsonl, _dir, _file, _root, folder; a class_names
    file) are taken relative to ``base``."""
    out = dict(spec)
    for key, value in spec.items():
        if key.endswith(PATH_KEY_SUFFIXES) or (key == "class_names" and isinstance(value, str)):
            out[key] = _resolve(value, base)
    return out


def load_eval_config(path: str | Path, overrides: dict[str, Any] | None = None, sets: Sequence[str] = (), need_model: bool = True) -> EvalConfig:
    """The YAML config with ``key.path=value`` overrides (``sets``), then flag overrides (None values: flag not
    given) applied, and paths resolved.

    Paths written in the file are relative to its folder (task paths: to ``data_root``); paths given as
    overrides are the caller's, relative to the working directory.
    """
    path = Path(path)
    raw = read_yaml_mapping(path, "eval config")
    here = path.resolve().parent
    for key in ("model", "out", "rices_cache_dir", "data_root", "lm", "vision"):
        if raw.get(key):
            raw[key] = _resolve(raw[key], here)
    # a data_root given as an override (the caller's path, from the cwd) is where the file's task paths resolve
    root_override = next((v for k, v in map(parse_override, sets) if k == ["data_root"]), None)
    if (overrides or {}).get("data_root") is not None:
        root_override = overrides["data_root"]
    if root_override:
        raw["data_root"] = str(Path(root_override).expanduser().resolve())
    data_root = Path(raw["data_root"]) if raw.get("data_root") else here
    if isinstance(raw.get("tasks"), list):
        raw["tasks"] = [resolve_task_paths(spec, data_root) if isinstance(spec, dict) else spec for spec in raw["tasks"]]
    apply_overrides(raw, sets)
    apply_overrides(raw, {k: v for k, v in (overrides or {}).items() if v is not None})
    if root_override:
        raw["data_root"] = str(data_root)  # resolved, not the override's text
    config = from_dict(EvalConfig, raw)
    if not config.model and need_model:
        raise ValueError(f"{path}: no `model` (a saved Flamingo directory) in the config or --model")
    if not config.tasks:
        raise ValueError(f"{path}: no `tasks` in the config")
    if config.out is None:
        config.out = f"{path.stem}-results.json"
    return config


def run_eval_cli(args: argparse.Namespace) -> int:
    from .. import load_flamingo
    from ..modeling.summary import default_device, run_banner
    from .runner import evaluate, format_results_table
    from .task import build_task

    overrides = {
        "model": args.model, "limit": args.limit, "shots": args.shots, "seeds": args.seeds, "selection": args.selection,
        "protocol": getattr(args, "protocol", None), "out": args.out, "batch_size": args.batch_size, "ensemble": args.ensemble, "device": args.device,
        "lm": getattr(args, "lm", None), "vision": getattr(args, "vision", None),
        "resume": args.resume, "progress": args.progress,
    }
    write_dir = getattr(args, "write_train_data", None)
    config = load_eval_config(args.config, overrides, getattr(args, "set_overrides", None) or (), need_model=write_dir is None)
    specs = config.tasks
    if args.tasks:
        wanted = [t for t in args.tasks.split(",") if t]
        tasks = [build_task(spec) for spec in specs]
        unknown = sorted(set(wanted) - {t.name for t in tasks})
        if unknown:
            raise ValueError(f"--tasks names {unknown} not in the config (tasks: {[t.name for t in tasks]})")
        tasks = [t for t in tasks if t.name in wanted]
    else:
        tasks = [build_task(spec) for spec in specs]

    if write_dir is not None:
        return write_train_data(tasks, config, Path(write_dir))
    model, processor = load_flamingo(config.model, lm=config.lm, vision=config.vision)
    device = default_device(config.device)
    model.to(device)
    print(run_banner("eval", model, device=device, output=config.out), flush=True)
    results = evaluate(
        model, processor, tasks, shots=config.shots, seeds=config.seeds, selection=config.selection,
        batch_size=config.batch_size, limit=config.limit, results_path=config.out, resume=config.resume,
        progress=config.progress, ensemble=config.ensemble, max_rows=config.max_rows,
        rices_cache_dir=config.rices_cache_dir, model_name=str(config.model), protocol=config.protocol,
        config={k: v for k, v in dataclasses.asdict(config).items() if k not in ("resume", "progress")},
    )
    table = format_results_table(results)
    Path(config.out).with_suffix(".txt").write_text(table + "\n")
    print(table)
    print(f"results: {config.out}")
    return 0


def write_train_data(tasks: list, config: EvalConfig, directory: Path) -> int:
    """``flamingo eval CONFIG --write-train-data DIR``: every task's training split as instruction records."""
    from .protocol import get_protocol
    from .train_data import write_task_records

    protocol = get_protocol(config.protocol or "paper").name

    shots = config.shots[0] if config.shots else 0
    seed = config.seeds[0] if config.seeds else 0
    for task in tasks:
        task.use_protocol(protocol)  # the prompt flamingo eval will use with this config
        path = directory / f"{task.name}.jsonl"
        n = write_task_records(task, path, shots=shots, seed=seed, limit=config.limit)  # --limit: the first N examples
        print(f"{task.name}: {n} records ({shots} shots) -> {path}")
    return 0
