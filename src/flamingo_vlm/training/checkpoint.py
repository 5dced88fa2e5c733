"""Sharded checkpoints that survive being killed, and exact resume on any number of processes.

    output_dir/checkpoints/step-00001000/
        state/                  torch.distributed.checkpoint (DCP): trained weights ("model.<flamingo name>")
                                and AdamW state ("optim.<flamingo name>.exp_avg" ...); each process writes
                                only its own shards, in parallel, and reads only the slices it needs
        flamingo_config.json    the bridge's config
        optimizer.pt            AdamW hyper-parameters per group (by parameter name) + the scheduler
        rng-rank00000.pt        each process's RNG states
        trainer_state.json      step, data position of every lane, skip counts, config (written last)

No process gathers whole tensors: a save holds no more than a process's own shards, so rank 0 needs no
more memory than the others. DCP reshards at load, so a checkpoint saved on N processes resumes on M
(weights and optimizer exactly; see ``flamingo_vlm.data.stream`` for the data lanes).
:func:`export_checkpoint` writes a checkpoint's weights in the ``save_pretrained`` layout
(``model.safetensors``) for ``load_flamingo``; the run's ``final/`` directory is already in it.

A checkpoint is written into ``.tmp-step-...`` (every file fsynced), and only then renamed into place,
so a kill while saving leaves the previous checkpoint as it was; ``keep_last`` prunes the oldest after
a successful save.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from ..config import CONFIG_NAME
from ..modeling.backbones import paths_for_saving, write_lm_signature
from ..modeling.flamingo import WEIGHTS_NAME
from .distributed import DistEnv, full_tensor

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
DCP_DIR = "state"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a trainer_state.json) under output_dir, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and (path / STATE_NAME).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


# ---- durable writes ------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync directories
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` and fsync it (the directory rename that publishes it comes later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---- state pieces --------------------------------------------------------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_weights(model, keep: bool = True) -> dict[str, torch.Tensor]:
    """The trained weights, whole, on CPU (a collective under FSDP: every process must call it).
    ``keep=False`` (processes that do not write) drops each tensor once gathered, so they never
    hold more than one whole tensor."""
    out = {}
    for k, v in model.flamingo_state_dict().items():
        whole = full_tensor(v.detach())
        if keep:
            out[k] = whole.cpu().contiguous()
    return out


def _param_names(optimizer: torch.optim.Optimizer) -> list[str]:
    return [n for g in optimizer.param_groups for n in g["names"]]


def optimizer_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The param groups' hyper-parameters and parameter names (no tensors)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def load_optimizer_groups(optimizer: torch.optim.Optimizer, saved: list[dict]) -> None:
    if [n for g in saved for n in g["names"]] != _param_names(optimizer):
        raise ValueError("the optimizer checkpoint holds other parameters than this model trains (other config?)")
    for group, values in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in values.items() if k != "params"})


def _adamw_state_template(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    """Zeros laid out as AdamW lays out a parameter's state (DTensor shards like ``param``)."""
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    on_device = group.get("fused") or group.get("capturable")
    step = torch.zeros((), dtype=torch.float32, device=param.device) if on_device else torch.tensor(0.0, dtype=torch.float32)
    return {"step": step, "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}


def sharded_state(model, optimizer: torch.optim.Optimizer | None, *, for_loading: bool = False, present: set[str] | None = None) -> dict:
    """The DCP state dict: {"model": {flamingo name: tensor}, "optim": {flamingo name: {step, exp_avg,
    exp_avg_sq}}}, tensors as the run holds them (DTensor shards under FSDP), sharing their storage.
    ``for_loading``: AdamW state a fresh optimizer has not created yet is made (zeros) for the names in
    ``present`` (those the checkpoint holds), to be loaded into."""
    state: dict[str, Any] = {"model": {k: v.detach() for k, v in model.flamingo_state_dict().items()}}
    if optimizer is None:
        return state
    optim = {}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for name, param in zip(_param_names(optimizer), params):
        entry = optimizer.state.get(param)
        if not entry and for_loading and present is not None and f"optim.{name}.exp_avg" in present:
            entry = optimizer.state[param] = _adamw_state_template(optimizer, param)
        if entry:
            optim[name] = entry
    state["optim"] = optim
    return state


def _single_process_quiet():
    """DCP warns that it assumes one process whenever no process group exists, which is meant here."""
    import contextlib
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    return stack


def _dcp_keys(path: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


# ---- save / load ---------------------------------------------------------------------------------
class PendingCheckpoint:
    """A checkpoint whose shards are still being written in the background (``async_checkpoint``):
    :meth:`wait` finishes the write and publishes it (every process must call it)."""

    def __init__(self, future, publish) -> None:
        self._future, self._publish, self.path = future, publish, None

    def wait(self) -> Path:
        if self.path is None:
            self._future.result()
            self.path = self._publish()
        return self.path

    def abandon(self) -> None:
        """Let the background write finish without publishing it (the run is failing: no collectives)."""
        try:
            self._future.result()
        except Exception:  # noqa: BLE001 - the run's own error is the one to report
            logger.exception("a background checkpoint write failed while the run was stopping")


_ASYNC_GROUPS: dict[int, Any] = {}


def _async_group(env: DistEnv):
    """A gloo group of its own for the background writes, so that they never interleave with the
    training's collectives on the default group (created once, on every process)."""
    import torch.distributed as dist

    if not env.distributed:
        return None
    key = id(dist.group.WORLD)
    if key not in _ASYNC_GROUPS:
        _ASYNC_GROUPS[key] = dist.new_group(backend="gloo")
    return _ASYNC_GROUPS[key]


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict,
    env: DistEnv,
    keep_last: int = 0,
    background: bool = False,
) -> Path | PendingCheckpoint:
    """Write the checkpoint of ``step`` atomically (see module doc); every process must call this.

    ``background``: copy the shards to memory now and write them in a background thread; returns a
    :class:`PendingCheckpoint` whose ``wait()`` (before the next save, and before the run ends) publishes it.
    """
    import torch.distributed.checkpoint as dcp

    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir()
    env.barrier()
    write_bytes(tmp / f"rng-rank{env.rank:05d}.pt", _torch_bytes(rng_state()))
    if env.is_main:
        write_bytes(tmp / CONFIG_NAME, json.dumps(model.config.to_dict(), indent=2, sort_keys=True).encode())
        write_bytes(tmp / OPTIMIZER_NAME, _torch_bytes({"param_groups": optimizer_groups(optimizer), "scheduler": scheduler.state_dict()}))
    state = sharded_state(model, optimizer)
    writer = dcp.FileSystemWriter(str(tmp / DCP_DIR), sync_files=True)
    trainer_state = {**trainer_state, "step": step, "world_size": env.world_size}

    def publish() -> Path:
        env.barrier()
        if env.is_main:
            write_bytes(tmp / STATE_NAME, json.dumps(trainer_state, indent=1).encode())
            _fsync_dir(tmp / DCP_DIR)
            _fsync_dir(tmp)
            trash = root / f".old-{final.name}"
            if final.exists():  # the same step saved again (e.g. the last step): replace it
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
            os.replace(tmp, final)
            _fsync_dir(root)
            shutil.rmtree(trash, ignore_errors=True)
            if keep_last > 0:
                for _, old in list_checkpoints(output_dir)[:-keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        env.barrier()
        return final

    # every process writes its own shards (a collective: the plan is agreed on first); DCP fsyncs its files
    with _single_process_quiet():
        if background:
            future = dcp.async_save(state, storage_writer=writer, process_group=_async_group(env), no_dist=not env.distributed)
            return PendingCheckpoint(future, publish)
        dcp.save(state, storage_writer=writer, no_dist=not env.distributed)
    return publish()


def load_checkpoint(path: str | os.PathLike, *, model, optimizer, scheduler, env: DistEnv) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG from ``path`` (saved on any number
    of processes); return the trainer state (step, data positions, ...)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    state_file = path / STATE_NAME
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_NAME})")
    trainer_state = json.loads(state_file.read_text())
    present = _dcp_keys(path / DCP_DIR)
    state = sharded_state(model, optimizer, for_loading=True, present=present)
    expected = {f"model.{k}" for k in state["model"]}
    missing, unexpected = sorted(expected - present), sorted(k for k in present - expected if k.startswith("model."))
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad(), _single_process_quiet():
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path / DCP_DIR)), no_dist=not env.distributed)
    saved = torch.load(path / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
    load_optimizer_groups(optimizer, saved["param_groups"])
    scheduler.load_state_dict(saved["scheduler"])
    rng_file = path / f"rng-rank{env.rank:05d}.pt"
    if trainer_state.get("world_size") == env.world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        logger.warning("resuming on %d processes from a checkpoint of %s: process RNG states are not restored", env.world_size, trainer_state.get("world_size"))
    return trainer_state


def checkpoint_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's trained weights, whole, on CPU, under flamingo names (one process, no model needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(Path(path) / DCP_DIR))
    meta = reader.read_metadata().state_dict_metadata
    weights = {
        key[len("model."):]: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for key, m in meta.items() if key.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    with _single_process_quiet():
        dcp.load({"model": weights}, storage_reader=reader, no_dist=True)
    return weights


def export_checkpoint(path: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Write a checkpoint's weights in the ``save_pretrained`` layout (``model.safetensors`` +
    ``flamingo_config.json``), which ``load_flamingo`` / ``FlamingoModel.from_pretrained`` read."""
    from ..config import FlamingoConfig

    path, directory = Path(path), Path(directory)
    weights = checkpoint_weights(path)
    config = FlamingoConfig.load(path)
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_bytes(tmp / WEIGHTS_NAME, safetensors_bytes({k: v.contiguous() for k, v in weights.items()}, metadata={"format": "pt", "library": "flamingo_vlm"}))
    paths_for_saving(config, directory).save(tmp)  # backbone paths relative to the new directory
    _fsync_dir(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def save_final(model, processor, directory: str | os.PathLike, env: DistEnv) -> Path:
    """The trained model in the ``save_pretrained`` layout (+ the processor), written atomically."""
    weights = gather_weights(model, keep=env.is_main)
    signature = model.lm_signature()  # a collective under FSDP: every rank computes it
    directory = Path(directory)
    if env.is_main:
        tmp = directory.with_name(f".tmp-{directory.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_bytes(tmp / WEIGHTS_NAME, safetensors_bytes(weights, metadata={"format": "pt", "library": "flamingo_vlm"}))
        paths_for_saving(model.config, directory).save(tmp)  # named as from the final directory
        write_lm_signature(signature, tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        _fsync_dir(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    env.barrier()
    return directory
