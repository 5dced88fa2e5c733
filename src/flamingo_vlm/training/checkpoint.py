"""Checkpoints that survive being killed, and exact resume.

    output_dir/checkpoints/step-00001000/
        model.safetensors       trained weights under flamingo names (the save_pretrained layout, so
        flamingo_config.json    FlamingoModel.from_pretrained / load_flamingo can read a checkpoint)
        optimizer.pt            AdamW state keyed by parameter name + the scheduler state
        rng-rank00000.pt        each process's RNG states
        trainer_state.json      step, data position of every lane, skip counts, config (written last)

A checkpoint is written into ``.tmp-step-...`` (every file fsynced), and only then renamed into place,
so a kill while saving leaves the previous checkpoint as it was; ``keep_last`` prunes the oldest after
a successful save. Tensors are gathered whole (from FSDP shards) and loaded back into whatever layout
the resuming run uses, so a run may resume on another number of processes.
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
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..config import CONFIG_NAME
from ..modeling.backbones import paths_for_saving, write_lm_signature
from ..modeling.flamingo import WEIGHTS_NAME
from .distributed import DistEnv, copy_full_into, full_tensor, shard_like

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
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


def load_weights(model, state: dict[str, torch.Tensor]) -> None:
    """Load whole flamingo weights into the model, sharded or not; every key and shape must match."""
    own = model.flamingo_state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise ValueError(f"checkpoint weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]}")
    for k, v in own.items():
        copy_full_into(v, state[k])


def _param_names(optimizer: torch.optim.Optimizer) -> list[str]:
    return [n for g in optimizer.param_groups for n in g["names"]]


def gather_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict:
    """AdamW state keyed by flamingo parameter name, whole tensors on CPU (collective under FSDP;
    ``keep`` as in :func:`gather_weights`)."""
    sd = optimizer.state_dict()
    state = {}
    for index, name in enumerate(_param_names(optimizer)):
        if index in sd["state"]:
            entry = {k: full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in sd["state"][index].items()}
            if keep:
                state[name] = entry
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    names = _param_names(optimizer)
    saved_names = [n for g in saved["param_groups"] for n in g["names"]]
    if saved_names != names:
        raise ValueError("the optimizer checkpoint holds other parameters than this model trains (other config?)")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for index, (name, param) in enumerate(zip(names, params)):
        if name in saved["state"]:
            state[index] = {
                k: shard_like(v, param) if torch.is_tensor(v) and tuple(v.shape) == tuple(param.shape) and v.ndim > 0 else v
                for k, v in saved["state"][name].items()
            }
    current = optimizer.state_dict()["param_groups"]
    groups = [{**g_saved, "params": g_now["params"]} for g_saved, g_now in zip(saved["param_groups"], current)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- save / load ---------------------------------------------------------------------------------
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
) -> Path:
    """Write the checkpoint of ``step`` atomically (see module doc); every process must call this."""
    weights = gather_weights(model, keep=env.is_main)
    optim = gather_optimizer_state(optimizer, keep=env.is_main)
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
        write_bytes(tmp / WEIGHTS_NAME, safetensors_bytes(weights, metadata={"format": "pt", "library": "flamingo_vlm", "step": str(step)}))
        write_bytes(tmp / CONFIG_NAME, json.dumps(model.config.to_dict(), indent=2, sort_keys=True).encode())
        write_bytes(tmp / OPTIMIZER_NAME, _torch_bytes({"optimizer": optim, "scheduler": scheduler.state_dict()}))
    env.barrier()
    if env.is_main:
        write_bytes(tmp / STATE_NAME, json.dumps({**trainer_state, "step": step, "world_size": env.world_size}, indent=1).encode())
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


def load_checkpoint(path: str | os.PathLike, *, model, optimizer, scheduler, env: DistEnv) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG from ``path``; return the trainer
    state (step, data positions, ...)."""
    path = Path(path)
    state_file = path / STATE_NAME
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_NAME})")
    trainer_state = json.loads(state_file.read_text())
    load_weights(model, load_file(str(path / WEIGHTS_NAME)))
    saved = torch.load(path / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
    load_optimizer_state(optimizer, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng_file = path / f"rng-rank{env.rank:05d}.pt"
    if trainer_state.get("world_size") == env.world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        logger.warning("resuming on %d processes from a checkpoint of %s: process RNG states are not restored", env.world_size, trainer_state.get("world_size"))
    return trainer_state


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
