"""One run per output directory: a fresh run never writes into another run's directory, and a resumed run
continues only a run made with the same configuration.

At the start of a run its configuration is recorded in ``output_dir/run_config.json``; a later run into the
same directory must either resume it with an equal configuration (keys that do not change what is trained,
such as ``log_every`` or ``num_workers``, may differ) or be told to start over (``--overwrite``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

RUN_CONFIG_NAME = "run_config.json"
# Keys that change how a run is carried out or reported, not what it trains: they may differ on resume.
OPERATIONAL_KEYS = frozenset({
    "output_dir", "resume", "log_every", "tensorboard", "checkpoint_every", "keep_last", "save_final", "num_workers", "pin_memory",
    "prefetch_factor", "device", "compile", "compile_backend", "gradient_checkpointing",
    "cache_vision_features", "vision_feature_cache_mib", "pack_length", "pack_micro_batch_rows",  # the same objective, another layout
    # how the processes share the work: a checkpoint resumes on another layout or world size
    "distributed", "shard_size", "frozen_sharding", "reduce_every_micro_step", "sharded_construction", "async_checkpoint",
    "count_communication",
    # a run may be extended or stopped early (under a cosine schedule the rate follows the new total from there)
    "steps",
})
# What a directory written by a run holds (anything else in a non-empty directory: not ours to delete).
RUN_ENTRIES = frozenset({RUN_CONFIG_NAME, "metrics.jsonl", "checkpoints", "final", "tensorboard", "results.json"})


def run_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config (``TrainConfig.to_dict()``) that defines what a run trains, JSON-normalised."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in OPERATIONAL_KEYS}, sort_keys=True, default=str))


def _digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def _differences(saved: Any, current: Any, where: str = "") -> list[str]:
    """Dotted keys whose values differ (``lr: 0.001 -> 0.0001``, ``datasets.0.batch_size: 8 -> 4``)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [d for k in sorted(set(saved) | set(current), key=str)
                for d in _differences(saved.get(k), current.get(k), f"{where}.{k}" if where else str(k))]
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [d for i, (a, b) in enumerate(zip(saved, current)) for d in _differences(a, b, f"{where}.{i}")]
    return [] if saved == current else [f"{where or 'config'}: {saved!r} -> {current!r}"]


def _record_for(checkpoint: Path) -> Path | None:
    """The run record of the run a checkpoint belongs to: ``<run>/checkpoints/step-N`` -> ``<run>/run_config.json``."""
    for parent in (checkpoint, *checkpoint.parents[:3]):
        if (parent / RUN_CONFIG_NAME).is_file():
            return parent / RUN_CONFIG_NAME
    return None


def prepare_run_dir(config: dict[str, Any], *, overwrite: bool = False) -> str:
    """Check that a run with ``config`` (``TrainConfig.to_dict()``) may write into its ``output_dir``, then
    record its configuration there. Returns what was decided (``"new"``, ``"resume"`` or ``"overwrite"``).

    - an empty or missing directory: a new run;
    - a directory holding a run: refused unless ``config["resume"]`` (then its recorded configuration must
      equal this one, apart from :data:`OPERATIONAL_KEYS`) or ``overwrite`` (its run's files are deleted);
    - a non-empty directory that holds no run: refused, even with ``overwrite`` (nothing there is deleted).

    Call it in one process only (rank 0): the others would see the record it writes.
    """
    out = Path(config["output_dir"])
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file, not a directory")
    resume = config.get("resume")
    fingerprint = run_fingerprint(config)
    decision = "new"
    if entries:
        foreign = [e for e in entries if e not in RUN_ENTRIES]
        if overwrite:
            if foreign:
                raise ValueError(
                    f"--overwrite: output_dir {out} holds files no training run writes ({', '.join(foreign[:5])}); "
                    "refusing to delete them: choose another output_dir"
                )
            for name in entries:
                path = out / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            decision = "overwrite"
        elif not resume:
            raise ValueError(
                f"output_dir {out} is not empty ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}): a new run "
                "would mix with what is there. Pass --resume to continue the run in it, --overwrite to delete it and "
                "start over, or choose another output_dir"
            )
        else:
            decision = "resume"
    if resume and decision != "overwrite":
        record = out / RUN_CONFIG_NAME
        if isinstance(resume, str) and not isinstance(resume, bool):
            record = _record_for(Path(resume)) or record
        if record.is_file():
            saved = json.loads(record.read_text())
            if saved.get("sha256") != _digest(fingerprint):
                changes = _differences(saved.get("config", {}), fingerprint)
                raise ValueError(
                    f"cannot resume the run in {record.parent}: it was made with another configuration "
                    f"({'; '.join(changes[:8]) or 'see ' + str(record)}). Resume with the same configuration, "
                    "or start a new run (another output_dir, or --overwrite)"
                )
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RUN_CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps({"sha256": _digest(fingerprint), "config": fingerprint}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / RUN_CONFIG_NAME)
    return decision


__all__ = ["OPERATIONAL_KEYS", "RUN_CONFIG_NAME", "prepare_run_dir", "run_fingerprint"]
