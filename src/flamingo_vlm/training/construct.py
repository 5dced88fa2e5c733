"""Sharded construction: no process ever holds the whole frozen LM or vision encoder.

    1. the backbones are built on the meta device (shapes only) and the bridge on the CPU, seeded, so it
       is the one :func:`~flamingo_vlm.training.cli.build_model` would build, on every process alike;
    2. frozen dtype, activation checkpointing, compile and FSDP2 as ``prepare_model`` applies them;
    3. ``to_empty`` allocates this process's shards only, and each is filled: the frozen weights from the
       backbones' safetensors files, reading only this process's rows (``safe_open(...).get_slice``);
       the bridge from its CPU copy (which is then dropped); the new token rows from the mean of the
       (sharded) embedding matrix, as the builder does; non-persistent buffers (rotary ``inv_freq``,
       position ids) recomputed by building their (small) module again.

The logits are those of the unsharded build (tested), and a process's peak memory is its shards plus
the bridge, not the whole model (see docs/training.md for measurements).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .distributed import DistEnv, apply_training_layout

logger = logging.getLogger(__name__)

# wrapper modules this package puts around the LM's own: their attribute names are not in its checkpoint
_WRAPPER_SEGMENTS = ("decoder_layer", "base")


class SafetensorsIndex:
    """Tensor name -> file of a checkpoint directory (``model.safetensors`` or a sharded index), read by
    slices of rows."""

    def __init__(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: str(directory / v) for k, v in weight_map.items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for path in sorted(directory.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), str(path)))
        if not self.files:
            raise FileNotFoundError(f"no safetensors weights in {directory}: sharded construction reads them by slices")

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def slice(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``key`` (the whole tensor without them), read from disk."""
        from safetensors import safe_open

        # opened for each read: safe_open maps the file, and the pages a mapping has touched count as this
        # process's resident memory until it is closed (kept open, they would add up to its whole share)
        with safe_open(self.files[key], framework="pt") as f:
            view = f.get_slice(key)
            rows = view[:] if start is None or not view.get_shape() else view[start:stop]
            return rows.clone()


def _resolve(name_or_path: str) -> str:
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"])


def checkpoint_key(name: str, index: SafetensorsIndex, prefixes: tuple[str, ...]) -> str:
    """The checkpoint's name for a backbone parameter (its module path without this package's wrappers)."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    key = ".".join(parts)
    for candidate in (
        key,
        *(f"{p}.{key}" for p in prefixes),
        *(key[len(p) + 1 :] for p in prefixes if key.startswith(p + ".")),
    ):
        if candidate in index:
            return candidate
    raise KeyError(f"{name}: no tensor {key!r} in the checkpoint (tried the prefixes {prefixes})")


def _local_rows(param: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop) rows of dim 0 this process holds of a DTensor sharded on dim 0 (FSDP2's torch.chunk
    layout); None for a whole tensor."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return None
    placements = param.placements
    shard_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    if len(shard_dims) != 1 or placements[shard_dims[0]].dim != 0:
        raise ValueError(f"unexpected placements {placements}: FSDP2 shards dim 0 on one mesh dimension")
    mesh_dim = shard_dims[0]
    n, ways = param.shape[0], param.device_mesh.size(mesh_dim)
    chunk = math.ceil(n / ways)
    start = min(param.device_mesh.get_local_rank(mesh_dim) * chunk, n)
    return start, start + param.to_local().shape[0]


def _fill(param: torch.Tensor, rows: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor

    local = param.to_local() if isinstance(param, DTensor) else param
    if tuple(local.shape) != tuple(rows.shape):
        raise ValueError(
            f"checkpoint slice of shape {tuple(rows.shape)} for a local tensor of shape {tuple(local.shape)}"
        )
    local.copy_(rows.to(local.dtype))


def _load_backbone(module: nn.Module, index: SafetensorsIndex, prefixes: tuple[str, ...], skip: set[int]) -> None:
    """Fill every parameter and persistent buffer of ``module`` not in ``skip`` (ids) from ``index``."""
    for name, tensor in [
        *module.named_parameters(),
        *((n, b) for n, b in module.named_buffers() if _is_persistent(module, n)),
    ]:
        if id(tensor) in skip:
            continue
        key = checkpoint_key(name, index, prefixes)
        rows = _local_rows(tensor)
        _fill(tensor, index.slice(key, *(rows or (None, None))))


def _is_persistent(root: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    return leaf not in module._non_persistent_buffers_set


def recompute_buffers(module: nn.Module, config: Any, device: torch.device) -> None:
    """Non-persistent buffers (rotary ``inv_freq``, position ids...) from a fresh CPU instance of each
    module that owns one (such modules are small: they take the model config)."""
    for name, owner in module.named_modules():
        if not owner._non_persistent_buffers_set:
            continue
        fresh = None
        for args, kwargs in (((config,), {}), ((), {"config": config})):
            try:
                with torch.device("cpu"):
                    fresh = type(owner)(*args, **kwargs)
                break
            except TypeError:
                continue
        if fresh is None:
            raise ValueError(
                f"cannot recompute the buffers of {name} ({type(owner).__name__}): it does not take the model config"
            )
        for buffer in owner._non_persistent_buffers_set:
            value = getattr(fresh, buffer, None)
            if torch.is_tensor(value):
                setattr(owner, buffer, value.to(device))


def build_sharded_model(config: TrainConfig, env: DistEnv):
    """(model, processor) for ``config``, sharded over the processes of ``env`` as ``prepare_model`` does,
    built without any process holding the whole backbones (see the module doc)."""
    from .plan import build_meta_model

    if config.init_from or not config.lm or not config.vision:
        raise ValueError(
            "sharded construction builds a new bridge on `lm` and `vision` (local or hub safetensors); not init_from"
        )
    if config.backbone_training():
        raise ValueError("sharded construction builds a new bridge: fine-tuning settings (train_vision_blocks, train_lm_layers, "
                         "lora, image_size) start from a trained one (init_from), without sharded_construction")
    if config.flamingo.get("vision_type") not in (None, "clip", "siglip"):
        raise ValueError("sharded construction reads transformers vision encoders (clip, siglip)")
    lm_dir, vision_dir = _resolve(config.lm), _resolve(config.vision)
    torch.manual_seed(config.seed)  # as build_model: the bridge is drawn from the same stream on every process
    model, processor = build_meta_model(config, with_processor=True, bridge_device="cpu")
    # the bridge (parameters and buffers) is what was built on the CPU; its values are kept here
    bridge = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"}
    model.to("meta")
    apply_training_layout(model, config, env)
    model.to_empty(device=env.device)
    with torch.no_grad():
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for name, value in bridge.items():  # this process's rows of the bridge
            rows = _local_rows(tensors[name])
            _fill(tensors[name], value if rows is None else value[rows[0] : rows[1]])
        del bridge
        trained = {id(p) for p in model.parameters() if p.requires_grad}
        lm_index, vision_index = SafetensorsIndex(lm_dir), SafetensorsIndex(vision_dir)
        lm_prefixes = tuple(p for p in (getattr(model.lm, "base_model_prefix", ""),) if p)
        bridge_buffers = {id(b) for m in (model.resampler, *model.xattn_blocks) for b in m.buffers()}
        _load_backbone(model.lm, lm_index, lm_prefixes, trained | bridge_buffers)
        _load_backbone(model.vision_encoder.model, vision_index, ("vision_model",), trained)
        _init_new_token_rows(model, lm_index, lm_prefixes)
        text_config = model.lm.config.get_text_config()
        recompute_buffers(model.lm, text_config, env.device)
        recompute_buffers(model.vision_encoder.model, model.vision_encoder.model.config, env.device)
    model._flamingo_prepared = True
    return model, processor


def _init_new_token_rows(model, index: SafetensorsIndex, prefixes: tuple[str, ...]) -> None:
    """The new token rows start at the mean of the base vocabulary's embeddings, as the builder does:
    computed from the checkpoint's rows (in its dtype, before a frozen_dtype cast), summed over the shards."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    from ..modeling.lm import ExtendedEmbedding, ExtendedLMHead

    embed, head = model.lm.get_input_embeddings(), model.lm.get_output_embeddings()
    names = {id(p): n for n, p in model.lm.named_parameters(remove_duplicate=False)}
    pairs = []
    if isinstance(embed, ExtendedEmbedding):
        pairs.append((embed.new.weight, embed.base.weight))
    if isinstance(head, ExtendedLMHead) and head.new_weight is not None:
        pairs.append((head.new_weight, head.base.weight))
    for new, base in pairs:
        rows = _local_rows(base)
        local = index.slice(checkpoint_key(names[id(base)], index, prefixes), *(rows or (None, None))).float()
        total = local.sum(0, keepdim=True)
        if isinstance(base, DTensor):
            mesh_dim = next(i for i, p in enumerate(base.placements) if isinstance(p, Shard))
            dist.all_reduce(total, group=base.device_mesh.get_group(mesh_dim))
        full = (total / base.shape[0]).expand(new.shape[0], -1)
        rows = _local_rows(new)
        _fill(new, full if rows is None else full[rows[0] : rows[1]])
